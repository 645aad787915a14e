"""Any timm CNN and any labelled folder with 2+ classes through every stage; the whole pipeline on three classes."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from catdog.cam import gradcam
from catdog.classes import classes_shown
from catdog.extract import extract
from catdog.forest import run_forest
from catdog.run import RunDir
from catdog.store import FeatureStore
from catdog.train import train
from conftest import REPO, make_image_folder, tiny_config

CLASSES = ("apple", "banana", "cherry")


@pytest.fixture(scope="module")
def three_classes(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("fruit"), {"train": 10, "test": 4, "val": 3}, classes=CLASSES)


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto"])
def test_another_timm_family_trains_extracts_forests_and_explains(name, three_classes, tmp_path):
    """Random init (their ImageNet weights are not on this machine), one epoch, then every stage that runs the model."""
    config = tiny_config(f"model.name={name}", "model.pretrained=none", "model.freeze_stages=0",
                         "train.mixed_precision=no", "extract.mixed_precision=no", "extract.shard_size=16",
                         "gradcam.images_per_class=2", "gradcam.faithfulness_images=6")
    run = tmp_path / name
    summary = train(config, three_classes, run)
    assert summary["classes"] == list(CLASSES) and summary["val_images"] == 9 and summary["test_images"] == 12
    saved = RunDir(run).config()
    assert saved.data.mean == (0.485, 0.456, 0.406) and saved.data.interpolation == "bicubic"  # from timm's config

    extract(saved, run, three_classes)
    store = FeatureStore(run / "features")
    network, _ = RunDir(run).load_model()
    assert store.features("train").shape == (30, network.feature_dim)
    assert store.manifest["layer"] == f"backbone.{network.cam_layer_name}"

    forest = run_forest(saved, run)
    assert set(forest["top10"]) == {"global", *CLASSES}

    cams = gradcam([run], three_classes, tmp_path / "out", saved)
    assert cams["models"][0]["cam_layer"] == network.cam_layer_name
    assert len(cams["grid_images"]) == 2 * len(CLASSES) and cams["grid_classes"] == list(CLASSES)  # 3 <= max_classes
    assert (tmp_path / "out" / "gradcam" / "grid.png").is_file()


@pytest.mark.slow
def test_launch_runs_every_stage_on_three_classes(three_classes, tmp_path):
    """./launch.sh on a 3-class folder with --set overrides: every stage runs, and the per-class pictures of every
    stage and the report are of the same two classes (figures.max_classes=2), the most confused first."""
    out = tmp_path / "runs"
    sets = ["data.image_size=64", "data.batch_size=8", "data.eval_batch_size=8", "data.num_workers=0",
            "optim.epochs=1", "extract.batch_size=8", "extract.num_workers=0", "extract.shard_size=16",
            "gradcam.images_per_class=2", "gradcam.faithfulness_images=6", "sweep.ks=[4,all]",
            "topact.features_per_class=2", "topact.images_per_feature=4", "topact.selectivity_top=10",
            "concepts.concepts=2", "concepts.passes=1", "concepts.images_per_concept=4", "concepts.random_directions=2",
            "figures.max_classes=2"]
    command = ["./launch.sh", "--data", str(three_classes), "--models", "efficientnet_lite0", "--out", str(out)]
    for item in sets:
        command += ["--set", item]
    env = {**os.environ, "RAY_ADDRESS": "local", "CATDOG_PROGRESS_SECONDS": "5"}
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = RunDir(out / "efficientnet_lite0")
    for stage in ("train", "robustness", "extract", "forest", "sweep", "topact", "concepts"):
        assert run.stage_marker(stage).is_file(), stage
    assert run.config().optim.epochs == 1
    shown = [CLASSES[c] for c in classes_shown(run.path, list(CLASSES), 2)]
    assert list(json.loads(run.topact_index.read_text())["classes"]) == shown
    assert list(json.loads(run.concepts_index.read_text())["classes"]) == shown
    assert json.loads((out / "gradcam" / "summary.json").read_text())["grid_classes"] == shown
    report = json.loads((out / "report" / "summary.json").read_text())
    assert report["runs"][0]["training"]["classes"] == list(CLASSES)
    page = (out / "report" / "index.html").read_text()
    assert all(f"<h4>{name}</h4>" in page for name in shown) and page.count("2 of 3 classes shown") == 3
    assert "\r" not in done.stderr and max(map(len, done.stderr.splitlines())) < 300

    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0 and again.stdout.count("complete, skipping") == 10, again.stdout[-2000:]
