"""Rows the extraction could not decode (zeros, ``readable`` False, listed in the manifest) are left out by every
stage that reads the store: the forest's and the sweep's samples and streams, the top-k, the concepts' reservoir
and sums, the comparison's matched rows, the audit's rows. Each split of the synthetic store has one such row, whose
zeros would otherwise come first (every readable feature is negative) or be counted."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

from catdog.audit import normalised_features, pooled_rows
from catdog.cluster import ShardJob, map_shards
from catdog.compare import feature_comparison, linear_cka, readable_blocks
from catdog.concepts import _NodeTasks, class_reservoirs, merge_samples, sample_shard, scan_shard
from catdog.config import CompareConfig, ConceptsConfig, SweepConfig
from catdog.forest import accuracy, class_means, stratified_readable_rows
from catdog.store import FeatureStore, ShardInfo, ShardWriter, shard_attrs, shard_name, write_manifest
from catdog.sweep import sample_rows
from catdog.topact import empty_topk, merge_topk, shard_topk

CLASSES = ["cat", "dog"]
ROWS = {"train": 30, "test": 12, "val": 14}
UNREADABLE = {"train": 11, "test": 4, "val": 9}
"""The row id of each split's undecodable image."""
SHARD_ROWS = 8
SPATIAL = (3, 2, 2)


def split_arrays(split: str, seed: int) -> dict:
    """Labels alternate; feature 0 is ``-(label + 1)`` (a predictor reads the label from it), the others negative
    noise; the unreadable row is zeros, as the extraction writes it."""
    rng = np.random.default_rng([seed, len(split)])
    n = ROWS[split]
    labels = np.arange(n) % 2
    features = -rng.uniform(0.5, 1.5, size=(n, 4)).astype(np.float32)
    features[:, 0] = -(labels + 1)
    spatial = rng.uniform(0.1, 1.0, size=(n, *SPATIAL)).astype(np.float32)
    readable = np.ones(n, dtype=bool)
    readable[UNREADABLE[split]] = False
    features[~readable], spatial[~readable] = 0, 0
    paths = [f"{split}/{CLASSES[y]}/{i:03d}.jpg" for i, y in enumerate(labels)]
    return {"features": features, "labels": labels, "paths": paths, "spatial": spatial, "readable": readable}


def write_unreadable_store(folder: Path, seed: int = 0) -> tuple[FeatureStore, dict]:
    """A store written as the extraction writes one, with ``readable`` given to ``ShardWriter``."""
    folder.mkdir(parents=True)
    splits, shards = {split: split_arrays(split, seed) for split in ROWS}, []
    for split, arrays in splits.items():
        for index, first in enumerate(range(0, ROWS[split], SHARD_ROWS)):
            rows = slice(first, min(ROWS[split], first + SHARD_ROWS))
            count = rows.stop - rows.start
            path = folder / shard_name(split, index)
            with ShardWriter(path, count, 4, SPATIAL, shard_attrs({}, split, first, count)) as writer:
                writer.write(arrays["features"][rows], arrays["labels"][rows], np.arange(rows.start, rows.stop),
                             arrays["paths"][rows], arrays["spatial"][rows], arrays["readable"][rows])
            sha256, size = _file_hash(path)
            shards.append(ShardInfo(path.name, split, first, count, sha256, size, tuple(writer.unreadable)))
    write_manifest(folder, {"model": "synthetic", "checkpoint_sha256": "0" * 64, "classes": CLASSES,
                            "feature_dim": 4, "spatial_shape": list(SPATIAL), "layer": "synthetic",
                            "transform": "none", "shard_size": SHARD_ROWS, "image_size": 32}, shards)
    return FeatureStore(folder), splits


def _file_hash(path: Path) -> tuple[str, int]:
    info = ShardInfo.of_file(path, "", 0, 0)
    return info.sha256, info.size


@pytest.fixture
def store(tmp_path):
    return write_unreadable_store(tmp_path / "features")


def test_the_store_tells_the_readable_rows_from_its_manifest_alone(store, monkeypatch):
    store, splits = store
    monkeypatch.setattr(h5py, "File", None)  # no shard is opened
    for split in ROWS:
        np.testing.assert_array_equal(store.readable(split), splits[split]["readable"])
        assert UNREADABLE[split] not in store.readable_rows(split).tolist()
        assert len(store.readable_rows(split)) == ROWS[split] - 1


def test_forest_and_sweep_samples_and_streams_leave_the_row_out(store):
    store, splits = store
    for max_rows in (None, 10):
        rows = stratified_readable_rows(store, "train", max_rows, seed=0)
        assert UNREADABLE["train"] not in rows.tolist() and (np.diff(rows) > 0).all()
    assert len(stratified_readable_rows(store, "train", None, seed=0)) == ROWS["train"] - 1
    sample = sample_rows(store, SweepConfig(max_train_rows=10, max_eval_rows=100))
    assert all(UNREADABLE[split] not in ids.tolist() for split, ids in sample.items())
    assert len(sample["val"]) == ROWS["val"] - 1

    def predict(features):
        return np.rint(-features[:, 0] - 1).astype(np.int64)  # a zero row would come out -1: wrong

    assert all(accuracy(store, split, predict) == 1.0 for split in ROWS)
    train = splits["train"]
    keep = train["readable"]
    mean_in, mean_out = class_means(store, "train", 2)
    for c in range(2):
        np.testing.assert_allclose(mean_in[c], train["features"][keep & (train["labels"] == c)].mean(axis=0),
                                   rtol=1e-6)
        np.testing.assert_allclose(mean_out[c], train["features"][keep & (train["labels"] != c)].mean(axis=0),
                                   rtol=1e-6)


def test_an_unreadable_row_never_enters_a_top_k(store):
    store, _ = store
    feature_idx, k = np.arange(4), 5
    jobs = [ShardJob(str(store.path), info, shard_topk, (feature_idx, k, store.shard_readable(info)))
            for info in store.shard_infos("train")]
    parts = [part for _, part, _ in map_shards(jobs, "test", use_ray=False)]
    top = merge_topk([empty_topk(len(feature_idx), k), *[p[0] for p in parts]])
    assert top.rows.shape == (4, k) and UNREADABLE["train"] not in top.rows.ravel().tolist()
    assert (top.values < 0).all()  # every readable feature is negative: the zeros would have come first
    assert UNREADABLE["train"] not in set().union(*[p[1] for p in parts])


def test_concepts_reservoir_and_sums_leave_the_row_out(store):
    store, splits = store
    cfg = ConceptsConfig(concepts=2, reservoir_images=100, batch_images=3)
    label = UNREADABLE["train"] % 2
    sample = {}
    jobs = [ShardJob(str(store.path), info, sample_shard, ([0, 1], 100, cfg.seed, store.shard_readable(info)))
            for info in store.shard_infos("train")]
    for _, part, _ in map_shards(jobs, "test", use_ray=False):
        sample = merge_samples(sample, part, 100)
    assert UNREADABLE["train"] not in sample[label][1].tolist()
    assert len(sample[label][1]) == int((splits["train"]["labels"] == label).sum()) - 1

    reservoirs = class_reservoirs(store, [0, 1], cfg, False, _NodeTasks())  # Ray-free, end to end
    members = splits["train"]["readable"] & (splits["train"]["labels"] == label)
    assert len(reservoirs[label]) == members.sum() and (reservoirs[label] > 0).all()  # no zero map

    components = {label: np.abs(np.random.default_rng(0).normal(size=(2, SPATIAL[0])))}
    jobs = [ShardJob(str(store.path), info, scan_shard, (components, 3, 2, store.shard_readable(info)))
            for info in store.shard_infos("train")]
    scans = [part[label] for _, part, _ in map_shards(jobs, "test", use_ray=False) if label in part]
    assert sum(s.positions for s in scans) == members.sum() * SPATIAL[1] * SPATIAL[2]
    assert all(UNREADABLE["train"] not in s.top.rows.ravel().tolist() for s in scans)


def test_compare_matches_only_rows_both_stores_could_decode(tmp_path):
    store_a, splits_a = write_unreadable_store(tmp_path / "a", seed=0)
    store_b, splits_b = write_unreadable_store(tmp_path / "b", seed=1)
    blocks = list(readable_blocks(store_a, store_b, "val"))
    rows = np.concatenate([r for r, *_ in blocks])
    keep = splits_a["val"]["readable"]
    np.testing.assert_array_equal(rows, np.flatnonzero(keep))
    np.testing.assert_array_equal(np.concatenate([a for _, a, _, _ in blocks]), splits_a["val"]["features"][keep])
    cfg = CompareConfig(cka_shuffles=2, cka_sample_rows=6, regression_sample_rows=10)
    found = feature_comparison(SimpleNamespace(store=store_a), SimpleNamespace(store=store_b), cfg,
                               SimpleNamespace(update=lambda steps: None))
    assert found["images"] == ROWS["val"] - 1
    expected = linear_cka(splits_a["val"]["features"][keep], splits_b["val"]["features"][keep])
    assert found["cka"] == pytest.approx(expected, rel=1e-6)
    assert found["logistic_regression"]["fit_rows"] == 10


def test_the_audit_rows_and_features_leave_the_row_out(store, tmp_path):
    store, splits = store
    rows = pooled_rows([store, store])
    assert len(rows) == sum(ROWS.values()) - len(ROWS)
    assert not {splits[split]["paths"][UNREADABLE[split]] for split in ROWS} & set(rows.paths)
    features = normalised_features([store], rows, tmp_path / "features.npy")
    expected = np.concatenate([splits[split]["features"][splits[split]["readable"]] for split in rows.splits])
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(features, expected, rtol=1e-6, atol=1e-7)
    assert np.all(np.linalg.norm(features, axis=1) > 0.99)  # no zero row
