"""Extraction into the feature store: shard planning, features equal to the network's, resuming after a
crash, rebuilding damaged shards, refusing another checkpoint, and two processes under ``accelerate launch``.

Numbers are compared with tolerances scaled to their magnitude where two different computations meet (the
BatchNorm-folded network against the unfolded one, float16 maps against float32), and exactly where one
computation is repeated on the same machine (a rerun against the first run). Extraction is pinned to float32
(``extract.mixed_precision=no``): ``auto`` picks bf16 on CPUs with AVX512-BF16 or AMX.
"""
from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from catdog import extract as extract_module
from catdog import models
from catdog.config import SPLITS, load_config
from catdog.data import build_transform, load_rgb
from catdog.errors import CatdogError
from catdog.extract import batch_plan, deal, extract, plan_shards
from catdog.io import file_sha256, temp_path
from catdog.models import fold_batchnorm
from catdog.run import RunDir
from catdog.store import COMPRESSION, MANIFEST, FeatureStore, ShardInfo, read_shard
from synthetic_store import DAMAGES, damage_shard

REPO = Path(__file__).resolve().parents[1]
EXTRACT = ("extract.shard_size=10", "extract.mixed_precision='no'")  # quoted: YAML reads a bare no as false
"""The settings of every extraction here: float32, so that features can be compared with the network's."""
FP16_EPS = float(np.finfo(np.float16).eps)


def assert_close_fp32(found, expected) -> None:
    """Two float32 computations of the same values by different routes (~50 folded layers): relative error 1e-3,
    absolute error 1e-4 of the largest value (accumulated rounding scales with the magnitudes, not with each
    value: small values are sums of large terms that cancel)."""
    found, expected = np.asarray(found, dtype=np.float32), np.asarray(expected, dtype=np.float32)
    np.testing.assert_allclose(found, expected, rtol=1e-3, atol=1e-4 * float(np.abs(expected).max()))


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


@pytest.mark.parametrize("override, field", [
    ("extract.shard_size=0", "extract.shard_size"), ("extract.batch_size=0", "extract.batch_size"),
    ("extract.num_workers=-1", "extract.num_workers"), ("extract.splits=[]", "extract.splits"),
    ("extract.splits=[train, train]", "extract.splits")])
def test_range_checks_are_config_errors(override, field):
    """The extraction trusts its config: ranges are checked when it is loaded, in catdog.config."""
    with pytest.raises(CatdogError, match=re.escape(field)):
        load_config(None, [override])


def test_fold_batchnorm_matches_the_network_and_leaves_the_original_alone():
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
        assert_close_fp32(folded.features(image), network.features(image))


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


def never_read_back(*args, **kwargs):
    pytest.fail("a shard was read back to hash it")


@pytest.fixture(scope="module")
def extracted(tiny_run, tmp_path_factory, synthetic_root) -> Path:
    """The tiny run with a complete store: shards of 10 images, spatial maps included (read-only: copy it). Each
    shard's manifest entry comes from the bytes its writer wrote: no shard is read back."""
    run = copy_run(tiny_run, tmp_path_factory.mktemp("extracted") / "run")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ShardInfo, "of_file", never_read_back)
        result = extract(config_for(run, *EXTRACT), run, synthetic_root)
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
    assert manifest["precision"] == "no" and "load_rgb v" in manifest["transform"]
    for shard in manifest["shards"]:  # hashed from the bytes written: equal to a re-read
        path = folder / shard["file"]
        assert (shard["sha256"], shard["size"]) == (file_sha256(path), path.stat().st_size)
        assert shard["unreadable"] == [] and read_shard_readable(path).all()
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
        assert_close_fp32(features, pooled)  # folded (the store) against unfolded (here), both float32
        # float16 storage: rounding within half an epsilon of each value; the rest covers the folding
        maps, scale = store.spatial(split, np.arange(len(paths))).astype(np.float32), float(fmap.abs().max())
        np.testing.assert_allclose(maps, fmap.numpy(), rtol=FP16_EPS, atol=FP16_EPS * scale)
        np.testing.assert_array_equal(store.row_ids(split), np.arange(len(paths)))
        assert store.labels(split).tolist() == [int(p.split("/")[1] == "dog") for p in paths]
        assert paths == sorted(paths, key=lambda p: (p.split("/")[1], p))


def test_rerun_writes_only_missing_shards(extracted, tmp_path, synthetic_root):
    run = Path(shutil.copytree(extracted, tmp_path / "run"))
    (run / "features" / "train-0003.h5").unlink()
    (run / "features" / MANIFEST).unlink()
    left = temp_path(run / "features" / "val-0000.h5", pid=12345)
    left.write_bytes(b"left by a killed run")
    result = extract(config_for(run, *EXTRACT), run, synthetic_root)
    assert result["written"] == {0: ["train-0003.h5"]} and len(result["kept"]) == 7
    assert not left.exists()
    for split, features in all_features(extracted).items():
        np.testing.assert_array_equal(all_features(run)[split], features)


def test_a_store_may_mix_compressions(extracted, tmp_path, synthetic_root):
    """A shard rewritten with lzf (the default before lz4) beside lz4 shards: every map reads back the same bits."""
    run = Path(shutil.copytree(extracted, tmp_path / "run"))
    (run / "features" / "train-0001.h5").unlink()
    (run / "features" / MANIFEST).unlink()
    extract(config_for(run, *EXTRACT, "extract.compression=lzf"), run, synthetic_root)

    def map_filter(name: str) -> int:
        with h5py.File(run / "features" / name, "r") as f:
            return f["spatial"].id.get_create_plist().get_filter(0)[0]

    assert map_filter("train-0001.h5") == h5py.h5z.FILTER_LZF
    assert map_filter("train-0000.h5") == dict(COMPRESSION["lz4"])["compression"]
    rows = np.arange(48)
    np.testing.assert_array_equal(FeatureStore(run / "features").spatial("train", rows),
                                  FeatureStore(extracted / "features").spatial("train", rows))


def test_crash_midway_then_resume(extracted, tiny_run, tmp_path, synthetic_root, monkeypatch):
    run = copy_run(tiny_run, tmp_path / "run")
    config = config_for(run, *EXTRACT, "extract.num_workers=1")
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
    assert sorted(p.name for p in (run / "features").glob("*.h5")) == ["train-0000.h5"]
    with pytest.raises(CatdogError, match="did not finish"):
        FeatureStore(run / "features")

    monkeypatch.setattr(ShardInfo, "of_file", never_read_back)  # the killed run's journal has its hash
    result = extract(config, run, synthetic_root)
    assert result["kept"] == ["train-0000.h5"] and "train-0000.h5" not in result["written"][0]
    assert len(result["written"][0]) == 7
    shard = next(s for s in FeatureStore(run / "features").manifest["shards"] if s["file"] == "train-0000.h5")
    assert shard["sha256"] == file_sha256(run / "features" / "train-0000.h5")
    assert not [p.name for p in (run / "features").iterdir() if p.name.startswith(".")]
    for split, features in all_features(extracted).items():
        np.testing.assert_array_equal(all_features(run)[split], features)


def read_shard_readable(path: Path) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f["readable"][:]


def test_unreadable_images_keep_their_row_flagged_and_excluded_ones_are_left_out(extracted, tiny_run, tmp_path,
                                                                                synthetic_root, caplog):
    """Nothing is opened before the extraction: a file PIL cannot use is found by the worker that decodes it, keeps
    its row (zeros, ``readable`` False, listed in the manifest) and is named in the one warning; ``data.exclude``'s
    files are not listed at all. The other rows are the images' features."""
    data = tmp_path / "data"
    shutil.copytree(synthetic_root / "val", data / "val")
    (data / "val" / "cat" / "cat.broken.jpg").write_bytes(b"not a jpeg")  # sorted after cat.4.jpg: row 5
    exclude = tmp_path / "suspects.csv"
    exclude.write_text("path\nval/dog/dog.0.jpg\n")
    run = copy_run(tiny_run, tmp_path / "run")
    extract(config_for(run, *EXTRACT, "extract.splits=[val]", f"data.exclude={exclude}"), run, data)

    warnings = [r.getMessage() for r in caplog.records if "PIL cannot use" in r.getMessage()]
    assert len(warnings) == 1 and "skipped 1 image file(s)" in warnings[0] and "cat.broken.jpg" in warnings[0]
    store = FeatureStore(run / "features")
    paths = store.paths("val")
    assert len(paths) == 10 and paths[5] == "val/cat/cat.broken.jpg" and "val/dog/dog.0.jpg" not in paths
    np.testing.assert_array_equal(store.row_ids("val"), np.arange(10))
    assert [s["unreadable"] for s in store.manifest["shards"]] == [[5]]
    assert read_shard_readable(run / "features" / "val-0000.h5").tolist() == [True] * 5 + [False] + [True] * 4
    features = store.features("val")
    assert not features[5].any() and not store.spatial("val", [5]).any()
    clean = FeatureStore(extracted / "features")
    row_of = {path: row for row, path in enumerate(clean.paths("val"))}
    others = [row for row in range(10) if row != 5]
    assert_close_fp32(features[others], clean.features("val")[[row_of[paths[row]] for row in others]])


def test_store_from_another_checkpoint_is_refused(extracted, tmp_path, synthetic_root):
    run = Path(shutil.copytree(extracted, tmp_path / "run"))
    weights = load_file(run / "best.safetensors")
    name = next(k for k in weights if k.endswith("classifier.weight"))
    weights[name] = weights[name] + 0.5
    save_file(weights, run / "best.safetensors")
    config = config_for(run, *EXTRACT)
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
        extract(config_for(run, *EXTRACT, "extract.shard_size=12"), run, synthetic_root)


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
               "--data", str(synthetic_root), *EXTRACT]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    wrote = {int(rank): int(n) for rank, n in re.findall(r"rank (\d) wrote (\d+) shard", done.stdout)}
    assert wrote == {0: 4, 1: 4}
    for split, features in all_features(extracted).items():  # other thread counts: other rounding
        assert_close_fp32(all_features(run)[split], features)


def test_bad_input_is_a_clear_error(extracted, tmp_path, synthetic_root):
    with pytest.raises(CatdogError, match="missing split folder"):
        extract(config_for(extracted, "extract.splits=[train, holdout]"), extracted, synthetic_root)
    with pytest.raises(CatdogError, match="no summary.json"):
        extract(config_for(extracted), tmp_path, synthetic_root)


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_shard_is_rebuilt(extracted, tmp_path, synthetic_root, capsys, how):
    """A truncated shard, or one with a flipped header byte, is rebuilt by a plain rerun; one with a flipped data
    byte (same size and header) by a rerun with ``verify``. The store then equals the undamaged one."""
    run = Path(shutil.copytree(extracted, tmp_path / "run"))
    folder = run / "features"
    damage_shard(folder / "val-0000.h5", how)
    with pytest.raises(CatdogError, match="shard val-0000.h5 is damaged or was altered"):
        FeatureStore(folder, verify=True)
    capsys.readouterr()
    result = extract(config_for(run, *EXTRACT), run, synthetic_root, verify=how == "data")
    assert result["rebuilt"] == ["val-0000.h5"] and result["written"] == {0: ["val-0000.h5"]}
    reason = {"truncated": "bytes, manifest.json says", "header": "HDF5 signature", "data": "sha256"}[how]
    assert re.search(rf"features: rebuilding val-0000\.h5, which is damaged or was altered \(.*{reason}",
                     capsys.readouterr().out)
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest == json.loads((extracted / "features" / MANIFEST).read_text())  # sizes and sha256 included
    store = FeatureStore(folder, verify=True)
    for split, features in all_features(extracted).items():
        np.testing.assert_array_equal(store.features(split), features)


def test_data_damage_is_kept_without_verify_but_stays_detectable(extracted, tmp_path, synthetic_root):
    """The cheap check cannot see a flipped data byte; the new manifest keeps the sha256 recorded when the shard
    was written (not the damaged file's), so ``--verify`` still finds it later."""
    run = Path(shutil.copytree(extracted, tmp_path / "run"))
    folder = run / "features"
    damage_shard(folder / "val-0000.h5", "data")
    result = extract(config_for(run, *EXTRACT), run, synthetic_root)
    assert result["rebuilt"] == [] and result["written"] == {0: []} and len(result["kept"]) == 8
    FeatureStore(folder)
    with pytest.raises(CatdogError, match=r"val-0000\.h5 is damaged.*--data DATA_ROOT --verify, which rewrites"):
        FeatureStore(folder, verify=True)
    extract(config_for(run, *EXTRACT), run, synthetic_root, verify=True)
    FeatureStore(folder, verify=True)


def test_unreadable_shard_without_a_manifest_is_rebuilt(extracted, tmp_path, synthetic_root, capsys):
    """After a killed run there is no manifest to compare with: a shard that cannot be read is rebuilt."""
    run = Path(shutil.copytree(extracted, tmp_path / "run"))
    folder = run / "features"
    (folder / MANIFEST).unlink()
    damage_shard(folder / "test-0001.h5", "truncated")
    result = extract(config_for(run, *EXTRACT), run, synthetic_root)
    assert result["rebuilt"] == ["test-0001.h5"] and result["written"] == {0: ["test-0001.h5"]}
    assert "rebuilding test-0001.h5, which is damaged or was altered (cannot be read" in capsys.readouterr().out
    assert json.loads((folder / MANIFEST).read_text()) == json.loads((extracted / "features" / MANIFEST).read_text())
