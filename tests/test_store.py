"""The HDF5 feature store: round trips over several shards, and clear errors for broken stores."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from catdog.errors import CatdogError
from catdog.io import file_sha256
from catdog.store import MANIFEST, FeatureStore, ShardInfo, ShardWriter, shard_name, write_manifest

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
            shards.append(ShardInfo(path.name, split, first, stop - first, file_sha256(path)))
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
    with pytest.raises(CatdogError, match="train-0001.h5"):
        FeatureStore(tmp_path)


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
