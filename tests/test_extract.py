"""Extraction into the feature store: shard planning, features equal to the network's, resuming after a
crash, refusing another checkpoint, and two processes under ``accelerate launch``."""
from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from catdog import extract as extract_module
from catdog.config import load_config
from catdog.data import build_transform, load_rgb
from catdog.errors import CatdogError
from catdog import models
from catdog.extract import attr_conflict, batch_plan, deal, extract, fold_batchnorm, plan_shards
from catdog.run import RunDir
from catdog.io import file_sha256
from catdog.store import MANIFEST, FeatureStore, read_shard

REPO = Path(__file__).resolve().parents[1]
SPLITS = ("train", "test", "val")


def config_for(run: Path, *overrides: str):
    return load_config(RunDir(run).config_path, list(overrides))


def copy_run(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("features"))
    return dest


def all_features(run: Path) -> dict[str, np.ndarray]:
    store = FeatureStore(run / "features")
    return {split: store.features(split) for split in SPLITS}


def test_plan_deal_and_batches():
    tasks = plan_shards({"train": 25, "test": 10}, 10)
    assert [(t.file, t.first_row, t.rows) for t in tasks] == [
        ("train-0000.h5", 0, 10), ("train-0001.h5", 10, 10), ("train-0002.h5", 20, 5), ("test-0000.h5", 0, 10)]
    shares = [deal(tasks, rank, 3) for rank in range(3)]
    assert sorted(t.file for share in shares for t in share) == sorted(t.file for t in tasks)
    assert [len(share) for share in shares] == [2, 1, 1]

    batches = batch_plan(tasks, {"train": 0, "test": 25}, batch_size=4)
    for task, indices in batches:
        start = {"train": 0, "test": 25}[task.split] + task.first_row
        assert start <= indices[0] and indices[-1] < start + task.rows and len(indices) <= 4
    assert [i for _, indices in batches for i in indices] == list(range(35))
    with pytest.raises(CatdogError, match="shard_size"):
        plan_shards({"train": 3}, 0)


def test_attr_conflict_ignores_per_shard_attributes():
    expected = {"checkpoint_sha256": "a", "split": "train", "first_row": 0, "rows": 10}
    assert attr_conflict({"checkpoint_sha256": "a", "split": "val", "first_row": 9, "rows": 1}, expected) is None
    assert attr_conflict({"checkpoint_sha256": "b"}, expected) == "checkpoint_sha256"


def test_fold_batchnorm_is_exact_and_leaves_the_original_alone():
    torch.manual_seed(0)
    network = models.create("efficientnet_lite0", 2, pretrained="none").eval()
    for bn in (m for m in network.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_(0.5, 2)
    probe, image = torch.randn(2, 3, 64, 64), torch.randn(3, 3, 64, 64)
    folded, count = fold_batchnorm(network, probe)
    batchnorms = [m for m in network.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert count == len(batchnorms) > 40
    assert not [m for m in folded.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        np.testing.assert_allclose(folded.features(image), network.features(image), rtol=1e-4, atol=1e-4)


def test_fold_batchnorm_keeps_the_original_when_folding_would_change_it():
    class Branchy(torch.nn.Module):
        name = "branchy"

        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.bn = torch.nn.BatchNorm2d(4)

        def spatial(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    network = Branchy().eval()
    network.bn.running_mean.fill_(2.0)
    folded, count = fold_batchnorm(network, torch.randn(1, 3, 8, 8))
    assert folded is network and count == 0


@pytest.fixture(scope="module")
def extracted(tiny_run, tmp_path_factory, synthetic_root) -> Path:
    """The tiny run with a complete store: shards of 10 images, spatial maps included (read-only: copy it)."""
    run = copy_run(tiny_run, tmp_path_factory.mktemp("extracted") / "run")
    result = extract(config_for(run, "extract.shard_size=10"), run, synthetic_root)
    assert result["written"] == {0: [t.file for t in plan_shards({"train": 48, "test": 14, "val": 10}, 10)]}
    return run


def test_store_layout_and_manifest(extracted):
    folder = extracted / "features"
    store = FeatureStore(folder)
    assert [p.name for p in store.shards("train")] == [f"train-000{i}.h5" for i in range(5)]
    assert {s: store.num_rows(s) for s in SPLITS} == {"train": 48, "test": 14, "val": 10}
    manifest = store.manifest
    assert manifest["checkpoint_sha256"] == file_sha256(extracted / "best.safetensors")
    assert manifest["model"] == "efficientnet_lite0" and manifest["classes"] == ["cat", "dog"]
    assert manifest["feature_dim"] == 1280 and manifest["spatial_shape"] == [1280, 2, 2]
    assert manifest["image_size"] == 64 and manifest["shard_size"] == 10 and "Resize" in manifest["transform"]
    for shard in manifest["shards"]:
        assert shard["sha256"] == file_sha256(folder / shard["file"])
    assert (folder / "config.yaml").is_file()
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]


def test_features_equal_the_networks_output(extracted, synthetic_root):
    run = RunDir(extracted)
    network, _ = run.load_model()
    config = run.config()
    transform = build_transform(config.data, train=False)
    store = FeatureStore(extracted / "features")
    for split in ("test", "val"):
        paths = store.paths(split)
        images = torch.stack([transform(load_rgb(synthetic_root / p, config.data.image_size)) for p in paths])
        with torch.no_grad():
            fmap = network.spatial(images)
            pooled = network.pool(fmap)
        features = store.features(split)
        assert features.std() > 0
        np.testing.assert_allclose(features, pooled.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(store.spatial(split, np.arange(len(paths))).astype(np.float32), fmap.numpy(),
                                   rtol=1e-2, atol=1e-2)
        np.testing.assert_array_equal(store.row_ids(split), np.arange(len(paths)))
        assert store.labels(split).tolist() == [int(p.split("/")[1] == "dog") for p in paths]
        assert paths == sorted(paths, key=lambda p: (p.split("/")[1], p))


def test_rerun_writes_only_missing_shards(extracted, tmp_path, synthetic_root):
    run = Path(shutil.copytree(extracted, tmp_path / "run"))
    (run / "features" / "train-0003.h5").unlink()
    (run / "features" / MANIFEST).unlink()
    (run / "features" / ".val-0000.h5.tmp-12345").write_bytes(b"left by a killed run")
    result = extract(config_for(run, "extract.shard_size=10"), run, synthetic_root)
    assert result["written"] == {0: ["train-0003.h5"]} and len(result["kept"]) == 7
    assert not (run / "features" / ".val-0000.h5.tmp-12345").exists()
    for split, features in all_features(extracted).items():
        np.testing.assert_array_equal(all_features(run)[split], features)


def test_crash_midway_then_resume(extracted, tiny_run, tmp_path, synthetic_root, monkeypatch):
    run = copy_run(tiny_run, tmp_path / "run")
    config = config_for(run, "extract.shard_size=10", "extract.num_workers=1")
    real_write, calls = extract_module.ShardWriter.write, []

    def crash_on_fourth_batch(self, *args, **kwargs):
        calls.append(self.path.name)
        if len(calls) == 4:
            raise KeyboardInterrupt
        real_write(self, *args, **kwargs)

    monkeypatch.setattr(extract_module.ShardWriter, "write", crash_on_fourth_batch)
    with pytest.raises(KeyboardInterrupt):
        extract(config, run, synthetic_root)
    monkeypatch.undo()
    assert sorted(p.name for p in (run / "features").iterdir()) == ["train-0000.h5"]
    with pytest.raises(CatdogError, match="did not finish"):
        FeatureStore(run / "features")

    result = extract(config, run, synthetic_root)
    assert result["kept"] == ["train-0000.h5"] and "train-0000.h5" not in result["written"][0]
    assert len(result["written"][0]) == 7
    for split, features in all_features(extracted).items():
        np.testing.assert_array_equal(all_features(run)[split], features)


def test_store_from_another_checkpoint_is_refused(extracted, tmp_path, synthetic_root):
    run = Path(shutil.copytree(extracted, tmp_path / "run"))
    weights = load_file(run / "best.safetensors")
    name = next(k for k in weights if k.endswith("classifier.weight"))
    weights[name] = weights[name] + 0.5
    save_file(weights, run / "best.safetensors")
    config = config_for(run, "extract.shard_size=10")
    before = (run / "features" / MANIFEST).read_text()
    with pytest.raises(CatdogError, match="another checkpoint.*--overwrite"):
        extract(config, run, synthetic_root)
    assert (run / "features" / MANIFEST).read_text() == before

    result = extract(config, run, synthetic_root, overwrite=True)
    assert len(result["written"][0]) == 8 and result["kept"] == []
    assert FeatureStore(run / "features").manifest["checkpoint_sha256"] == file_sha256(run / "best.safetensors")
    np.testing.assert_array_equal(read_shard(run / "features" / "val-0000.h5")["features"],
                                  read_shard(extracted / "features" / "val-0000.h5")["features"])

    with pytest.raises(CatdogError, match="shard_size=10, this extraction uses 12"):
        extract(config_for(run, "extract.shard_size=12"), run, synthetic_root)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_write_their_own_shards(extracted, tiny_run, tmp_path, synthetic_root):
    run = copy_run(tiny_run, tmp_path / "run")
    command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), "jobs/extract.py", "--run", str(run),
               "--data", str(synthetic_root), "extract.shard_size=10"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    wrote = {int(rank): int(n) for rank, n in re.findall(r"rank (\d) wrote (\d+) shard", done.stdout)}
    assert wrote == {0: 4, 1: 4}
    for split, features in all_features(extracted).items():
        np.testing.assert_allclose(all_features(run)[split], features, rtol=1e-4, atol=1e-5)


def test_bad_input_is_a_clear_error(extracted, tmp_path, synthetic_root):
    with pytest.raises(CatdogError, match="extract.splits: give one or more distinct split names"):
        extract(config_for(extracted, "extract.splits=[train, train]"), extracted, synthetic_root)
    with pytest.raises(CatdogError, match="missing split folder"):
        extract(config_for(extracted, "extract.splits=[train, holdout]"), extracted, synthetic_root)
    with pytest.raises(CatdogError, match="no summary.json"):
        extract(config_for(extracted), tmp_path, synthetic_root)
