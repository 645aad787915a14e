"""The HDF5 feature store: round trips over several shards, the store's rules (names, attributes, checks),
and clear errors for broken stores."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from catdog.errors import CatdogError
from catdog.io import atomic_path, file_sha256, is_temp_path, temp_path
from catdog.store import (MANIFEST, FeatureStore, ShardInfo, ShardWriter, attr_conflict, check_store, clear_store,
                          decode_paths, is_shard_file, manifest_metadata, shard_damage, shard_name, store_attrs,
                          write_manifest)
from synthetic_store import DAMAGES, damage_shard
from synthetic_store import write_store as write_synthetic_store

CLASSES = ["cat", "dog"]


def random_splits(rows: dict[str, int], feature_dim: int = 6, seed: int = 0) -> dict:
    """Random features and alternating labels, per split."""
    rng = np.random.default_rng(seed)
    return {split: (rng.normal(size=(n, feature_dim)), np.arange(n) % len(CLASSES)) for split, n in rows.items()}


def write_store(folder: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], shard_size: int,
                spatial_shape: tuple[int, int, int] | None = (2, 3, 3), seed: int = 0) -> dict:
    """A store of the given ``(features, labels)`` per split, with random spatial maps, written two rows at a
    time into shards of ``shard_size`` rows; returns the arrays written, per split."""
    rng = np.random.default_rng(seed)
    written, shards = {}, []
    feature_dim = next(iter(splits.values()))[0].shape[1]
    for split, (features, labels) in splits.items():
        n = len(labels)
        data = {"features": features.astype(np.float32), "labels": np.asarray(labels), "row_ids": np.arange(n),
                "paths": [f"{split}/{CLASSES[label]}/{i}.jpg" for i, label in enumerate(labels)]}
        if spatial_shape is not None:
            data["spatial"] = rng.normal(size=(n, *spatial_shape)).astype(np.float16)
        written[split] = data
        for index, first in enumerate(range(0, n, shard_size)):
            stop = min(first + shard_size, n)
            path = folder / shard_name(split, index)
            with ShardWriter(path, stop - first, feature_dim, spatial_shape, {"split": split}) as writer:
                for start in range(first, stop, 2):
                    end = min(start + 2, stop)
                    writer.write(data["features"][start:end], data["labels"][start:end], data["row_ids"][start:end],
                                 data["paths"][start:end], data["spatial"][start:end] if spatial_shape else None)
            shards.append(ShardInfo.of_file(path, split, first, stop - first))
    metadata = {"model": "synthetic", "checkpoint_sha256": "0" * 64, "classes": CLASSES, "feature_dim": feature_dim,
                "spatial_shape": list(spatial_shape) if spatial_shape else None}
    write_manifest(folder, metadata, shards)
    return written


def test_round_trip_over_several_shards(tmp_path):
    written = write_store(tmp_path, random_splits({"train": 11, "test": 5}), shard_size=4)
    store = FeatureStore(tmp_path)
    assert [p.name for p in store.shards("train")] == ["train-0000.h5", "train-0001.h5", "train-0002.h5"]
    assert store.splits == ["test", "train"] and store.classes == CLASSES and store.feature_dim == 6
    for split, data in written.items():
        assert store.num_rows(split) == len(data["labels"])
        np.testing.assert_array_equal(store.features(split), data["features"])
        np.testing.assert_array_equal(store.labels(split), data["labels"])
        np.testing.assert_array_equal(store.row_ids(split), data["row_ids"])
        assert store.paths(split) == data["paths"]

    batches = list(store.iter_spatial("train", batch_size=3))
    assert max(len(rows) for rows, _ in batches) == 3
    np.testing.assert_array_equal(np.concatenate([rows for rows, _ in batches]), np.arange(11))
    np.testing.assert_array_equal(np.concatenate([maps for _, maps in batches]), written["train"]["spatial"])

    rows = [10, 0, 5, 5, 3]
    np.testing.assert_array_equal(store.spatial("train", rows), written["train"]["spatial"][rows])


def test_store_without_spatial_maps(tmp_path):
    write_store(tmp_path, random_splits({"train": 3}), shard_size=2, spatial_shape=None)
    store = FeatureStore(tmp_path)
    assert not store.has_spatial and store.features("train").shape == (3, 6)
    with pytest.raises(CatdogError, match="without spatial maps"):
        next(store.iter_spatial("train"))


def test_bad_requests_are_clear_errors(tmp_path):
    write_store(tmp_path, random_splits({"train": 5}), shard_size=2)
    store = FeatureStore(tmp_path)
    with pytest.raises(CatdogError, match="no split 'val'"):
        store.features("val")
    with pytest.raises(CatdogError, match=r"0\.\.4"):
        store.spatial("train", [5])


def test_missing_manifest_means_unfinished_extraction(tmp_path):
    write_store(tmp_path, random_splits({"train": 5}), shard_size=2)
    (tmp_path / MANIFEST).unlink()
    with pytest.raises(CatdogError, match="did not finish"):
        FeatureStore(tmp_path)


def test_missing_shard_is_reported(tmp_path):
    write_store(tmp_path, random_splits({"train": 5}), shard_size=2)
    (tmp_path / "train-0001.h5").unlink()
    with pytest.raises(CatdogError, match=r"shard train-0001\.h5 listed in manifest\.json is missing; rebuild it "
                                          r"with jobs/extract\.py --run \S+ --data DATA_ROOT"):
        FeatureStore(tmp_path)


def damaged_store(folder: Path, how: str) -> Path:
    """A two-split store whose shard val-0000.h5 is damaged ``how``; returns the shard."""
    write_store(folder, random_splits({"train": 5, "val": 3}), shard_size=2)
    damage_shard(folder / "val-0000.h5", how)
    return folder / "val-0000.h5"


def test_truncated_shard_is_reported(tmp_path):
    shard = damaged_store(tmp_path / "features", "truncated")
    size, listed = shard.stat().st_size, json.loads((tmp_path / "features" / MANIFEST).read_text())["shards"]
    expected = next(s["size"] for s in listed if s["file"] == "val-0000.h5")
    folder = tmp_path / "features"
    message = (f"feature store {folder}: shard val-0000.h5 is damaged or was altered ({size} bytes, manifest.json "
               f"says {expected}); rebuild it with jobs/extract.py --run {tmp_path} --data DATA_ROOT, which rewrites "
               "shards that fail this check")
    with pytest.raises(CatdogError) as caught:
        FeatureStore(folder)
    assert str(caught.value) == message


def test_shard_with_a_flipped_header_byte_is_reported(tmp_path):
    damaged_store(tmp_path, "header")
    with pytest.raises(CatdogError, match=r"shard val-0000\.h5 is damaged or was altered \(its first 8 bytes are "
                                          r".*not the HDF5 signature\); rebuild it with jobs/extract\.py"):
        FeatureStore(tmp_path)


def test_shard_with_a_flipped_data_byte_is_found_only_with_verify(tmp_path):
    damaged_store(tmp_path, "data")
    FeatureStore(tmp_path)  # same size, same header: the cheap check cannot tell
    with pytest.raises(CatdogError, match=r"shard val-0000\.h5 is damaged or was altered \(sha256 [0-9a-f]{12}\.\.\., "
                                          r"manifest\.json says [0-9a-f]{12}\.\.\.\); rebuild it with "
                                          r"jobs/extract\.py --run \S+ --data DATA_ROOT --verify, which"):
        FeatureStore(tmp_path, verify=True)


def test_manifest_without_sizes_is_checked_by_sha256_with_verify(tmp_path):
    """Manifests written before sizes were recorded: only the header without ``verify``, the sha256 with it."""
    damaged_store(tmp_path, "truncated")
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    for shard in manifest["shards"]:
        del shard["size"]
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    assert FeatureStore(tmp_path).num_rows("val") == 3
    with pytest.raises(CatdogError, match=r"shard val-0000\.h5 is damaged or was altered \(sha256"):
        FeatureStore(tmp_path, verify=True)


def test_undamaged_store_passes_verify(tmp_path):
    write_store(tmp_path, random_splits({"train": 5, "val": 3}), shard_size=2)
    assert FeatureStore(tmp_path, verify=True).num_rows("train") == 5
    for shard in FeatureStore(tmp_path).manifest["shards"]:
        path = tmp_path / shard["file"]
        assert (shard["size"], shard["sha256"]) == (path.stat().st_size, file_sha256(path))
        assert shard_damage(path, ShardInfo(**shard), verify=True) is None


@pytest.mark.parametrize("how", DAMAGES)
def test_shard_damage_names_what_differs(tmp_path, how):
    shard = damaged_store(tmp_path, how)
    info = next(ShardInfo(**s) for s in json.loads((tmp_path / MANIFEST).read_text())["shards"]
                if s["file"] == shard.name)
    found = shard_damage(shard, info), shard_damage(shard, info, verify=True)
    expected = {"truncated": "bytes, manifest.json says", "header": "not the HDF5 signature", "data": "sha256"}[how]
    assert found[1] is not None and expected in found[1]
    assert (found[0] is None) == (how == "data")
    if how == "header":  # the signature needs no manifest entry
        assert "HDF5 signature" in shard_damage(shard, None)


def test_unreadable_manifest_is_reported(tmp_path):
    write_store(tmp_path, random_splits({"train": 2}), shard_size=2)
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(CatdogError, match="not a catdog manifest"):
        FeatureStore(tmp_path)


def test_half_written_shard_leaves_no_file(tmp_path):
    path = tmp_path / "train-0000.h5"
    with pytest.raises(RuntimeError):
        with ShardWriter(path, 4, 3, None, {}) as writer:
            writer.write(np.zeros((2, 3)), np.zeros(2), np.arange(2), ["a", "b"])
            raise RuntimeError("killed")
    with pytest.raises(ValueError, match="only 2 of 4 rows"):
        with ShardWriter(path, 4, 3, None, {}) as writer:
            writer.write(np.zeros((2, 3)), np.zeros(2), np.arange(2), ["a", "b"])
    assert list(tmp_path.iterdir()) == []


def test_shard_and_temporary_names():
    assert shard_name("train", 3) == "train-0003.h5" and shard_name("val", 12345) == "val-12345.h5"
    for name in ("train-0003.h5", "val-12345.h5", "hold-out-0000.h5"):
        assert is_shard_file(name) and is_shard_file(Path("/x") / name) and not is_temp_path(name)
    tmp = temp_path(Path("/x/train-0003.h5"), pid=42)
    assert tmp == Path("/x/.train-0003.h5.tmp-42") and is_temp_path(tmp) and not is_shard_file(tmp)
    for name in ("manifest.json", "config.yaml", "train.h5", "train-03.h5", ".train-0003.h5"):
        assert not is_shard_file(name) and not is_temp_path(name)
    assert decode_paths([b"train/cat/1.jpg", "train/dog/2.jpg"]) == ["train/cat/1.jpg", "train/dog/2.jpg"]


def test_atomic_path_writes_under_the_temporary_name(tmp_path):
    with atomic_path(tmp_path / "a.txt") as tmp:
        assert tmp == temp_path(tmp_path / "a.txt") and is_temp_path(tmp)
        tmp.write_text("x")
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_clear_store_removes_temporaries_and_with_everything_the_store(tmp_path):
    write_store(tmp_path, random_splits({"train": 3}), shard_size=2)
    temp_path(tmp_path / "train-0002.h5", pid=7).write_bytes(b"left by a killed run")
    (tmp_path / "config.yaml").write_text("extract: {}\n")
    clear_store(tmp_path, everything=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", MANIFEST, "train-0000.h5", "train-0001.h5"]
    clear_store(tmp_path, everything=True)
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]
    clear_store(tmp_path / "absent", everything=True)


def test_attr_conflict_ignores_per_shard_attributes():
    expected = {"checkpoint_sha256": "a", "split": "train", "first_row": 0, "rows": 10}
    assert attr_conflict({"checkpoint_sha256": "a", "split": "val", "first_row": 9, "rows": 1}, expected) is None
    assert attr_conflict({"checkpoint_sha256": "b"}, expected) == "checkpoint_sha256"


def test_manifest_metadata_reads_back_the_store_attributes():
    attrs = synthetic_attrs(spatial_shape=[4, 2, 2])
    assert attrs["classes"] == '["cat", "dog"]' and attrs["spatial_shape"] == "[4, 2, 2]"  # HDF5 attributes
    assert manifest_metadata(attrs) == {
        "model": "synthetic", "checkpoint_sha256": "0" * 64, "classes": CLASSES, "feature_dim": 4,
        "spatial_shape": [4, 2, 2], "layer": "synthetic", "transform": "none", "shard_size": 2, "image_size": 32,
        "precision": "no"}


def synthetic_attrs(**changes) -> dict:
    """Store attributes matching the metadata ``synthetic_store.write_store`` puts in the manifest."""
    return store_attrs(**{"model": "synthetic", "checkpoint_sha256": "0" * 64, "layer": "synthetic",
                          "transform": "none", "image_size": 32, "shard_size": 2, "precision": "no",
                          "classes": CLASSES, "feature_dim": 4, "spatial_shape": None, **changes})


def checked_store(folder: Path) -> tuple[dict, dict[str, list[str]]]:
    """A synthetic store of 5 train and 3 val rows in shards of 2, written with ``synthetic_attrs()``; returns
    the attributes and the plan (``check_store``'s arguments) of an extraction that matches it."""
    rng = np.random.default_rng(0)
    splits = {split: {"features": rng.normal(size=(n, 4)).astype(np.float32), "labels": np.arange(n) % 2,
                      "paths": np.array([f"{split}/{CLASSES[i % 2]}/{i}.jpg" for i in range(n)])}
              for split, n in {"train": 5, "val": 3}.items()}
    write_synthetic_store(folder, splits, CLASSES, shard_size=2, attrs=synthetic_attrs())
    planned = {shard_name(split, i): list(data["paths"][first:first + 2])
               for split, data in splits.items() for i, first in enumerate(range(0, len(data["paths"]), 2))}
    return synthetic_attrs(), planned


def test_check_store_keeps_whole_shards_with_their_manifest_entries(tmp_path):
    attrs, planned = checked_store(tmp_path)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    complete, damaged = check_store(tmp_path, attrs, planned, verify=True)
    assert damaged == {} and complete == {s["file"]: ShardInfo(**s) for s in manifest["shards"]}
    (tmp_path / MANIFEST).unlink()  # as after a killed extraction: shards without a manifest
    complete, damaged = check_store(tmp_path, attrs, planned)
    assert damaged == {} and complete == dict.fromkeys(planned)
    del planned["val-0001.h5"]  # no longer planned (e.g. another split list): neither kept nor rebuilt
    assert "val-0001.h5" not in check_store(tmp_path, attrs, planned)[0]


@pytest.mark.parametrize("verify", [False, True])
@pytest.mark.parametrize("how", DAMAGES)
def test_check_store_finds_damaged_shards(tmp_path, how, verify):
    attrs, planned = checked_store(tmp_path)
    damage_shard(tmp_path / "val-0000.h5", how)
    complete, damaged = check_store(tmp_path, attrs, planned, verify)
    if how == "data" and not verify:
        assert damaged == {} and "val-0000.h5" in complete
    else:
        assert list(damaged) == ["val-0000.h5"] and "val-0000.h5" not in complete
        assert {"truncated": "bytes, manifest.json says", "header": "HDF5 signature", "data": "sha256"}[how] \
            in damaged["val-0000.h5"]
    assert len(complete) + len(damaged) == len(planned)


def test_check_store_finds_unreadable_shards_without_a_manifest(tmp_path):
    attrs, planned = checked_store(tmp_path)
    (tmp_path / MANIFEST).unlink()
    damage_shard(tmp_path / "train-0001.h5", "truncated")
    complete, damaged = check_store(tmp_path, attrs, planned)
    assert list(damaged) == ["train-0001.h5"] and len(complete) == len(planned) - 1
    assert damaged["train-0001.h5"].startswith("cannot be read as a whole HDF5 shard")


def test_check_store_refuses_another_checkpoint_settings_or_images(tmp_path):
    attrs, planned = checked_store(tmp_path)
    with pytest.raises(CatdogError, match=r"manifest\.json was extracted from another checkpoint.*--overwrite"):
        check_store(tmp_path, synthetic_attrs(checkpoint_sha256="1" * 64), planned)
    with pytest.raises(CatdogError, match=re.escape("train-0000.h5 was made with shard_size=2, this extraction "
                                                    "uses 3; pass --overwrite")):
        check_store(tmp_path, synthetic_attrs(shard_size=3), planned)
    planned["val-0001.h5"] = ["val/cat/9.jpg"]
    with pytest.raises(CatdogError, match=r"val-0001\.h5 holds other images than this extraction plans for it "
                                          r"\(its row 0 is 'val/cat/2\.jpg', expected 'val/cat/9\.jpg'\)"):
        check_store(tmp_path, attrs, planned)


def test_a_rewrite_removes_temporary_files_that_a_killed_writer_left(tmp_path):
    from catdog.io import write_text

    target = tmp_path / "ranking.csv"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".ranking.csv.tmp-{int(dead.stdout)}"
    stale.write_text("left by a killed run")
    other = tmp_path / f".summary.json.tmp-{int(dead.stdout)}"
    other.write_text("another file's")
    write_text(target, "rank,feature\n")
    assert target.read_text() == "rank,feature\n"
    assert not stale.exists() and other.exists()
