"""File names that are not UTF-8 (a photo copied from an old camera card, named in Latin-1): kept, and written to
CSV, JSON and HDF5 so that they map back to the file (``catdog.io``'s rule), through every stage."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from catdog.io import open_text, path_from_bytes, path_to_bytes, printable_path, read_json, write_json, write_text
from catdog.store import FeatureStore
from conftest import REPO, make_image_folder
from synthetic_store import write_store

LATIN1 = os.fsdecode(b"chat_\xe9t\xe9.jpg")
"""``chat_été.jpg`` in Latin-1: 0xe9 alone is not UTF-8, so Python lists it with surrogate escapes."""


def test_the_rule_maps_every_name_back(tmp_path):
    names = [LATIN1, "cat ü 猫.jpg", "plain.jpg"]
    assert [path_from_bytes(path_to_bytes(name)) for name in names] == names
    assert printable_path(LATIN1) == "chat_\\xe9t\\xe9.jpg" and printable_path("cat ü.jpg") == "cat ü.jpg"
    write_text(tmp_path / "rows.csv", "path\n" + "\n".join(names) + "\n")
    assert (tmp_path / "rows.csv").read_bytes().count(b"chat_\xe9t\xe9.jpg") == 1  # the name's own bytes
    with open_text(tmp_path / "rows.csv") as handle:
        assert [row["path"] for row in csv.DictReader(handle)] == names
    write_json(tmp_path / "names.json", names)
    assert (tmp_path / "names.json").read_bytes().isascii() and read_json(tmp_path / "names.json") == names


def test_the_feature_store_keeps_any_name(tmp_path):
    paths = [f"train/cat/{LATIN1}", "train/cat/ü.jpg", "train/dog/d.jpg"]
    rng = np.random.default_rng(0)
    split = {"features": rng.random((3, 4), dtype=np.float32), "labels": np.array([0, 0, 1]), "paths": paths}
    store = FeatureStore(write_store(tmp_path / "features", {"train": split}, ["cat", "dog"], shard_size=2))
    assert store.paths("train") == paths


@pytest.fixture(scope="module")
def latin1_data(tmp_path_factory) -> Path:
    """The synthetic folder with one photo of each split's cat class renamed to ``LATIN1``."""
    root = make_image_folder(tmp_path_factory.mktemp("latin1"), {"train": 10, "test": 3, "val": 4})
    for split in ("train", "test", "val"):
        os.rename(root / split / "cat" / "cat.0.jpg", root / split / "cat" / LATIN1)
    return root


def job(script: str, *args) -> str:
    """``python jobs/SCRIPT ARGS`` as a user runs it (stdout and stderr as bytes: names are printed as they are);
    its stdout, after asserting it ended well."""
    env = {**os.environ, "RAY_ADDRESS": "local", "PYTHONIOENCODING": "utf-8"}  # stdout strict, as on many terminals
    done = subprocess.run([sys.executable, f"jobs/{script}", *map(str, args)], cwd=REPO, capture_output=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
    return done.stdout.decode(errors="surrogateescape")


@pytest.mark.slow
def test_every_stage_keeps_a_latin1_name(latin1_data, tmp_path):
    """Train, Grad-CAM, robustness, extraction, forest, sweep, top activations, concepts, the comparison, the report
    and prediction, on a folder holding a Latin-1 name: each ends well, and what it writes names the photo so that
    it opens."""
    sets = ["gradcam.images_per_class=4", "gradcam.faithfulness_images=4", "gradcam.sanity_images_per_class=1",
            "sweep.ks=[4,all]", "topact.features_per_class=1", "topact.images_per_feature=10",
            "topact.selectivity_top=10", "concepts.concepts=2", "concepts.passes=1", "concepts.images_per_concept=10",
            "concepts.random_directions=2", "compare.cka_shuffles=2"]
    run, out = tmp_path / "lite0", tmp_path / "out"
    job("train.py", "--model", "efficientnet_lite0", "--data", latin1_data, "--out", run, "data.image_size=64",
        "data.batch_size=8", "data.eval_batch_size=8", "data.num_workers=0", "optim.epochs=1", "extract.batch_size=8",
        "extract.num_workers=0", *sets)  # the run's config.yaml: every later stage's settings
    with open_text(run / "val_predictions.csv") as handle:
        assert (latin1_data / next(r["path"] for r in csv.DictReader(handle) if "chat" in r["path"])).is_file()
    job("extract.py", "--run", run, "--data", latin1_data)
    store = FeatureStore(run / "features")
    for split in ("train", "test", "val"):
        assert f"{split}/cat/{LATIN1}" in store.paths(split)
    job("forest.py", "--run", run)
    job("sweep.py", "--run", run)
    job("topact.py", "--run", run, "--data", latin1_data)
    shown = {image["path"] for entries in read_json(run / "topact" / "index.json")["classes"].values()
             for entry in entries for image in entry["images"]}
    assert f"train/cat/{LATIN1}" in shown and all((latin1_data / path).is_file() for path in shown)
    job("concepts.py", "--no-ray", "--run", run, "--data", latin1_data)
    job("robustness.py", "--run", run, "--data", latin1_data)
    twin = Path(shutil.copytree(run, tmp_path / "twin"))  # a second run to compare: the same model, another folder
    job("gradcam.py", "--runs", run, twin, "--data", latin1_data, "--out", out)
    assert LATIN1 in json.dumps(read_json(out / "gradcam" / "summary.json"), ensure_ascii=False)
    job("compare.py", "--runs", run, twin, "--data", latin1_data, "--out", out)
    job("report.py", "--runs", run, twin, "--gradcam", out / "gradcam", "--compare", out / "compare",
        "--out", out / "report")
    printed = job("predict.py", "--run", run, "--out", out / "predicted", "--cam", latin1_data / "val" / "cat")
    assert "4 image(s) predicted" in printed
    with open_text(out / "predicted" / "predictions.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert str(latin1_data / "val" / "cat" / LATIN1) in [row["path"] for row in rows]
    assert all(Path(row["path"]).is_file() and (out / "predicted" / row["cam"]).is_file() for row in rows)
