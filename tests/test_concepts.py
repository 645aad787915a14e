"""Concepts from the feature store: the reservoir is a seeded uniform sample that merges exactly over shards, the
NMF on it recovers planted concepts (and equals the NMF on all rows when they fit), per-shard sums merge to the
one-pass numbers, the importance of a concept the head relies on beats its random baseline, and the job writes
montages, sample figures and index.json for the shown classes, reuses finished classes, and runs on Ray."""
from __future__ import annotations

import json
import runpy
import shutil
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import ray
import torch
from PIL import Image
from sklearn.decomposition import MiniBatchNMF
from torch import nn

from catdog.classes import classes_shown
from catdog.cluster import ShardJob, map_shards
from catdog.concepts import (ScanStats, _NodeTasks, class_reservoirs, coefficient_maps, crop_box,
                             fit_class, importance_batch, importance_shard, merge_samples, positions,
                             random_directions, reservoir_keys, run_concepts, sample_shard, scan_shard, transform)
from catdog.config import load_config
from catdog.errors import CatdogError
from catdog.io import read_json
from catdog.store import FeatureStore, decode_paths
from conftest import REPO
from synthetic_store import write_store

CLASSES = ["ant", "bee", "cow"]  # three classes, none of them cat or dog
CHANNELS, GRID, K = 12, (3, 4), 3


def planted_store(folder: Path, per_class: int = 30, seed: int = 0) -> tuple[Path, np.ndarray]:
    """A store whose spatial maps are exactly U W: each class has K concepts, non-negative directions W (K, C)
    with disjoint supports; each position shows one concept (sparse U). Returns the folder and each class's W."""
    rng = np.random.default_rng(seed)
    directions = np.zeros((len(CLASSES), K, CHANNELS))
    for c in range(len(CLASSES)):
        channels = rng.permutation(CHANNELS).reshape(K, -1)
        for j in range(K):
            directions[c, j, channels[j]] = rng.uniform(0.5, 1.5, channels.shape[1])
    splits = {}
    for split, n in (("train", per_class), ("val", per_class // 3)):
        maps, labels = [], []
        for c in range(len(CLASSES)):
            which = rng.integers(0, K, (n, *GRID))
            strength = rng.uniform(0.5, 2.0, (n, *GRID))
            u = np.eye(K)[which] * strength[..., None]  # (n, h, w, K)
            maps.append(np.einsum("nhwk,kc->nchw", u, directions[c]))
            labels += [c] * n
        maps = np.concatenate(maps).astype(np.float32)
        paths = [f"{split}/{CLASSES[c]}/{CLASSES[c]}.{i}.jpg" for c in range(len(CLASSES)) for i in range(n)]
        splits[split] = {"features": maps.mean(axis=(2, 3)), "labels": np.array(labels),
                         "paths": np.array(paths, dtype=object), "spatial": maps}
    write_store(folder, splits, CLASSES, shard_size=7, spatial_shape=(CHANNELS, *GRID))
    return folder, directions


def cosine_match(found: np.ndarray, planted: np.ndarray) -> np.ndarray:
    """For each planted direction, the best cosine similarity among the found ones."""
    a = found / np.linalg.norm(found, axis=1, keepdims=True)
    b = planted / np.linalg.norm(planted, axis=1, keepdims=True)
    return (b @ a.T).max(axis=1)


def test_positions_and_coefficient_maps_round_trip():
    maps = np.random.default_rng(0).standard_normal((2, 5, 3, 4)).astype(np.float32)
    rows = positions(maps)
    assert rows.shape == (2 * 12, 5) and rows.min() == 0  # clipped for the NMF
    assert np.array_equal(rows[4 + 2], np.maximum(maps[0, :, 1, 2], 0))  # image 0, row 1, column 2
    back = coefficient_maps(rows, 2, (3, 4))
    assert np.array_equal(back, np.maximum(maps, 0))


def test_crop_box_stays_inside_the_image():
    assert crop_box((3, 3), (7, 7), 224, 3) == (64, 64, 160, 160)
    assert crop_box((0, 6), (7, 7), 224, 3) == (128, 0, 224, 96)  # shifted in at the corner
    assert crop_box((1, 1), (2, 2), 64, 3) == (0, 0, 64, 64)  # a grid smaller than the crop: all of it


def test_random_directions_are_non_negative_with_the_concepts_norms():
    components = np.abs(np.random.default_rng(0).standard_normal((3, 8))) * [[1], [2], [5]]
    directions = random_directions(components, 4, seed=1)
    assert directions.shape == (3, 4, 8) and directions.min() >= 0
    np.testing.assert_allclose(np.linalg.norm(directions, axis=2),
                               np.repeat(np.linalg.norm(components, axis=1)[:, None], 4, axis=1))
    assert np.array_equal(directions, random_directions(components, 4, seed=1))


def test_transform_solves_the_nmf_coefficients():
    rng = np.random.default_rng(0)
    w = np.abs(rng.standard_normal((4, 10)))
    u = np.abs(rng.standard_normal((50, 4)))
    np.testing.assert_allclose(transform(w, u @ w), u, atol=1e-3)  # exact data: the planted coefficients
    noisy = np.abs(u @ w + 0.1 * rng.standard_normal((50, 10)))
    nmf = MiniBatchNMF(n_components=4, init="nndsvda", random_state=0, max_iter=500).fit(noisy)
    ours, theirs = transform(nmf.components_, noisy), nmf.transform(noisy)
    assert np.abs(ours - theirs).max() < 0.05 * theirs.max()  # scikit-learn's own (iterative, with a tolerance)


def class_rows(store: FeatureStore, split: str, label: int) -> np.ndarray:
    return store.row_ids(split)[store.labels(split) == label]


def shard_parts(store: FeatureStore, split: str, fn, *args) -> list:
    """``fn``'s result on each shard of the split, in shard order (in this process)."""
    jobs = [ShardJob(str(store.path), info, fn, args) for info in store.shard_infos(split)]
    return [part for _, part, _ in sorted(map_shards(jobs, "test", use_ray=False), key=lambda done: done[0])]


def test_store_reads_rows_in_the_order_given_opening_each_shard_once(tmp_path, monkeypatch):
    folder, _ = planted_store(tmp_path / "features")  # 90 train rows in shards of 7
    store = FeatureStore(folder)
    every, paths = store.spatial("train", np.arange(90)), np.array(store.paths("train"))
    rows = np.array([89, 3, 3, 50, 0, 51, 52, 89])  # any order, repeats, contiguous runs
    opened = []
    real_file = h5py.File
    monkeypatch.setattr(h5py, "File", lambda path, *args, **kw: opened.append(path) or real_file(path, *args, **kw))
    assert np.array_equal(store.spatial("train", rows), every[rows])
    assert sorted(map(str, opened)) == sorted({str(folder / f"train-{r // 7:04d}.h5") for r in rows})  # once each
    assert decode_paths(store.take("train", "paths", rows)) == paths[rows].tolist()
    assert store.spatial("train", []).shape == (0, CHANNELS, *GRID)


def test_reservoir_is_a_seeded_uniform_sample_that_merges_exactly(tmp_path):
    folder, _ = planted_store(tmp_path / "features", per_class=40)
    store = FeatureStore(folder)
    keys = reservoir_keys(np.arange(100_000), seed=5)
    assert keys.min() >= 0 and keys.max() < 1 and abs(keys.mean() - 0.5) < 0.01
    assert np.array_equal(keys, reservoir_keys(np.arange(100_000), seed=5))
    assert not np.array_equal(keys[:100], reservoir_keys(np.arange(100), seed=6))
    parts = shard_parts(store, "train", sample_shard, [0, 2], 10, 5)
    merged = {}
    for part in parts[::-1]:  # any order: the same sample
        merged = merge_samples(merged, part, 10)
    for label in (0, 2):
        rows = class_rows(store, "train", label)
        expected = rows[np.lexsort((rows, reservoir_keys(rows, 5)))[:10]]  # the 10 smallest keys of all its rows
        assert np.array_equal(merged[label][1], expected)
    # uniform: over many seeds every row of a class is drawn about equally often (10 of 40: a quarter)
    rows = class_rows(store, "train", 1)
    drawn = np.zeros(len(rows))
    for seed in range(400):
        sample = {}
        for part in shard_parts(store, "train", sample_shard, [1], 10, seed):
            sample = merge_samples(sample, part, 10)
        drawn += np.isin(rows, sample[1][1])
    assert drawn.sum() == 400 * 10 and 0.15 < drawn.min() / 400 and drawn.max() / 400 < 0.35


def test_nmf_on_a_reservoir_equals_the_nmf_on_all_rows_when_they_fit(tmp_path):
    folder, planted = planted_store(tmp_path / "features")
    store = FeatureStore(folder)
    cfg = load_config(None, [f"concepts.concepts={K}", "concepts.batch_images=4", "concepts.passes=15",
                             "concepts.reservoir_images=1000"]).concepts
    reservoirs = class_reservoirs(store, [0, 1, 2], cfg, False, _NodeTasks())
    for c in range(len(CLASSES)):
        maps = store.spatial("train", class_rows(store, "train", c))
        assert np.array_equal(reservoirs[c], maps)  # every row, in row order
        components, _ = fit_class(reservoirs[c], cfg)
        reference, _ = fit_class(maps, cfg)  # the NMF on every row of the class, read straight from the store
        np.testing.assert_array_equal(components, reference)
        assert cosine_match(components, planted[c]).min() > 0.95


def test_nmf_on_a_smaller_reservoir_recovers_planted_concepts(tmp_path, monkeypatch):
    folder, planted = planted_store(tmp_path / "features")
    store = FeatureStore(folder)
    cfg = load_config(None, [f"concepts.concepts={K}", "concepts.batch_images=4", "concepts.passes=15",
                             "concepts.reservoir_images=12"]).concepts
    reservoirs = class_reservoirs(store, [0, 2], cfg, False, _NodeTasks())
    assert sorted(reservoirs) == [0, 2]
    for c in (0, 2):
        assert reservoirs[c].shape == (12, CHANNELS, *GRID)
        every = store.spatial("train", class_rows(store, "train", c))
        assert all(any(np.array_equal(m, e) for e in every) for m in reservoirs[c])  # the class's own maps
        assert cosine_match(fit_class(reservoirs[c], cfg)[0], planted[c]).min() > 0.95
    other = class_reservoirs(store, [0], cfg.model_copy(update={"seed": 1}), False, _NodeTasks())
    assert not np.array_equal(other[0], reservoirs[0])  # another seed, another sample


def test_scan_sums_over_shards_equal_one_pass_over_all_rows(tmp_path, monkeypatch):
    folder, planted = planted_store(tmp_path / "features")
    store = FeatureStore(folder)
    components = {c: planted[c] for c in range(len(CLASSES))}
    largest = []
    read_rows = FeatureStore.read_rows

    def recording(dataset, local):
        if dataset.name == "/spatial":
            largest.append(len(local))
        return read_rows(dataset, local)

    monkeypatch.setattr(FeatureStore, "read_rows", staticmethod(recording))
    parts = shard_parts(store, "train", scan_shard, components, 5, 4)
    assert max(largest) <= 4  # never more than batch_images images' maps at once
    for c in range(len(CLASSES)):
        merged = None
        for part in parts:
            if c in part:
                merged = part[c] if merged is None else merged.merge(part[c])
        rows = class_rows(store, "train", c)
        whole = ScanStats.empty(K, 5).add(store.spatial("train", rows).astype(np.float32), rows, planted[c])
        assert np.array_equal(merged.top.rows, whole.top.rows) and merged.positions == whole.positions == 30 * 12
        assert set(merged.top.rows.ravel()) <= set(rows.tolist())
        np.testing.assert_allclose(merged.sums, whole.sums, rtol=1e-9)
        assert merged.residual / merged.total < 1e-6  # the planted directions reconstruct the maps


class MeanPoolHead(nn.Module):
    """A trained-network stand-in: average pooling and a linear head that reads one direction for class 0."""

    def __init__(self, direction: np.ndarray):
        super().__init__()
        self.head = nn.Linear(len(direction), 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor(np.stack([direction, -direction]), dtype=torch.float32))
            self.head.bias.zero_()

    def pool(self, fmap):
        return fmap.mean(dim=(2, 3))


def test_a_concept_the_head_reads_beats_its_random_baseline(tmp_path):
    folder, planted = planted_store(tmp_path / "features")
    store = FeatureStore(folder)
    components = planted[0]  # class 0's true concepts; the head reads only concept 1's channels
    network = MeanPoolHead(components[1] / np.linalg.norm(components[1]))
    baselines = random_directions(components, 20, seed=0)
    merged = None
    for part in shard_parts(store, "val", importance_shard, network, {0: components}, {0: baselines}, 4):
        if 0 in part:
            merged = part[0] if merged is None else merged.merge(part[0])
    result = merged.summary()
    assert result["images"] == 10
    importance, random = result["importance"], result["random_importance"]
    assert importance[1] > 1.5 * random[1] > 0  # the concept the head relies on
    assert importance[1] > 10 * max(abs(importance[0]), abs(importance[2]))  # the others barely matter
    assert result["beats_random"][1] == 1.0
    # the sums over shards give the numbers of all the class's images at once
    maps = store.spatial("val", class_rows(store, "val", 0)).astype(np.float32)
    whole = importance_batch(network, maps, 0, components, baselines).summary()
    for key in ("importance", "importance_std", "random_importance", "random_importance_std", "beats_random"):
        np.testing.assert_allclose(result[key], whole[key], rtol=1e-6, atol=1e-9 * np.abs(whole["importance"]).max())
    # removing the whole concept 1 part, through the mean pool and the linear head, is linear in the maps
    logits = network.head(network.pool(torch.from_numpy(maps)))[:, 0].detach().numpy()
    assert result["logit"] == pytest.approx(float(logits.mean()), rel=1e-4)


@pytest.fixture(scope="module")
def concept_run(tiny_run, synthetic_root, tmp_path_factory) -> Path:
    """The tiny run with a float32 feature store (spatial maps) extracted from the synthetic images."""
    from catdog.extract import extract

    run = tmp_path_factory.mktemp("concepts") / "run"
    shutil.copytree(tiny_run, run)
    extract(load_config(run / "config.yaml", ["extract.shard_size=10", "extract.mixed_precision='no'"]), run,
            synthetic_root)
    return run


def run_config(run: Path, *overrides: str):
    """The run's own config (as the job reads it) with the test's settings."""
    return load_config(run / "config.yaml", [*SETTINGS, *overrides])


SETTINGS = ("concepts.concepts=3", "concepts.batch_images=5", "concepts.passes=2", "concepts.images_per_concept=4",
            "concepts.random_directions=3", "gradcam.images_per_class=2")


def test_concepts_job_writes_montages_index_and_reuses_finished_classes(concept_run, synthetic_root, tmp_path):
    run = Path(shutil.copytree(concept_run, tmp_path / "run"))
    config = run_config(concept_run)
    index = run_concepts([run], synthetic_root, config, use_ray=False)[str(run)]
    out = run / "concepts"
    assert read_json(out / "index.json") == json.loads(json.dumps(index))
    assert load_config(out / "config.yaml") == config
    store = FeatureStore(run / "features")
    assert list(index["classes"]) == store.classes == ["cat", "dog"] and index["classes_total"] == 2
    train_shards, val_shards = len(store.shards("train")), len(store.shards("val"))
    assert index["nodes"] == {"local": {"sample": train_shards, "gather": train_shards, "fit": 2,
                                        "measure": train_shards + val_shards}}
    for name, entry in index["classes"].items():
        assert entry["images"] == entry["reservoir_images"] == 24 and entry["importance_images"] == 5
        assert entry["positions"] == 24 * 4
        concepts = entry["concepts"]
        assert [c["concept"] for c in concepts] == [1, 2, 3]
        assert [c["importance"] for c in concepts] == sorted((c["importance"] for c in concepts), reverse=True)
        for c in concepts:
            assert len(c["images"]) == 4 and all(image["label"] == name for image in c["images"])
            assert [image["value"] for image in c["images"]] == sorted((i["value"] for i in c["images"]), reverse=True)
            assert all(image["path"] == store.paths("train")[image["row"]] for image in c["images"])
            assert 0 <= c["beats_random"] <= 1 and len(c["top_channels"]) == 5
            with Image.open(out / c["montage"]) as montage:
                assert montage.width > 400
        assert [path.split("/")[1] for path in entry["sample_images"]] == [name, name]
        with Image.open(out / entry["sample_figure"]) as figure:
            assert figure.width > 5 * 150 and figure.height > 2 * 150  # photo, CAM, 3 concepts; 2 images
    parts = sorted((out / "parts").glob("*.json"))
    assert [p.name for p in parts] == ["cat.json", "dog.json"]

    stamps = [p.stat().st_mtime_ns for p in parts]
    again = run_concepts([run], synthetic_root, config, use_ray=False)[str(run)]
    assert [p.stat().st_mtime_ns for p in parts] == stamps and again["nodes"] == {}  # finished classes are reused
    assert again["classes"]["cat"]["concepts"] == index["classes"]["cat"]["concepts"]
    (out / "parts" / "dog.json").unlink()
    third = run_concepts([run], synthetic_root, config, use_ray=False)[str(run)]
    assert (out / "parts" / "cat.json").stat().st_mtime_ns == stamps[0]  # only dog is computed again
    assert (out / "parts" / "dog.json").is_file() and third["nodes"]["local"]["fit"] == 1
    assert third["classes"]["dog"]["concepts"] == index["classes"]["dog"]["concepts"]


def test_only_the_shown_classes_get_concepts_and_pictures(concept_run, synthetic_root, tmp_path):
    run = Path(shutil.copytree(concept_run, tmp_path / "run"))
    store = FeatureStore(run / "features")
    [shown] = [store.classes[c] for c in classes_shown(run, store.classes, 1)]
    index = run_concepts([run], synthetic_root, run_config(concept_run, "figures.max_classes=1"), use_ray=False)
    assert list(index[str(run)]["classes"]) == [shown]
    out = run / "concepts"
    assert [p.name for p in (out / "parts").glob("*.json")] == [f"{shown}.json"]
    assert {p.name.split("-")[0] for p in out.glob("*.png")} == {shown}


def test_classes_run_as_ray_tasks_with_the_same_result(ray_local, concept_run, synthetic_root, tmp_path):
    local = Path(shutil.copytree(concept_run, tmp_path / "local"))
    remote = Path(shutil.copytree(concept_run, tmp_path / "remote"))
    config = run_config(concept_run)
    expected = run_concepts([local], synthetic_root, config, use_ray=False)[str(local)]
    found = run_concepts([remote], synthetic_root, config)[str(remote)]
    for name in ("cat", "dog"):
        for a, b in zip(expected["classes"][name]["concepts"], found["classes"][name]["concepts"]):
            assert a["importance"] == pytest.approx(b["importance"], rel=1e-4, abs=1e-6)
            assert [i["row"] for i in a["images"]] == [i["row"] for i in b["images"]]
    [(node, tasks)] = found["nodes"].items()
    assert node == ray.util.get_node_ip_address()
    assert tasks == expected["nodes"]["local"]  # every step's tasks ran on Ray (all files seen: none sent)


def test_concepts_refuses_a_store_without_maps_and_a_missing_data_root(concept_run, synthetic_root, tmp_path):
    with pytest.raises(CatdogError, match="no such directory"):
        run_concepts([concept_run], tmp_path / "nowhere", run_config(concept_run), use_ray=False)
    flat = Path(shutil.copytree(concept_run, tmp_path / "flat", ignore=shutil.ignore_patterns("features")))
    store = FeatureStore(concept_run / "features")
    splits = {split: {"features": store.features(split), "labels": store.labels(split),
                      "paths": np.array(store.paths(split), dtype=object)} for split in ("train", "val")}
    write_store(flat / "features", splits, store.classes, shard_size=10)
    with pytest.raises(CatdogError, match="without spatial maps"):
        run_concepts([flat], synthetic_root, run_config(concept_run), use_ray=False)
    assert not (flat / "concepts").exists()  # nothing written
    with pytest.raises(CatdogError, match="concepts.concepts"):
        run_config(concept_run, "concepts.concepts=0")


def test_concepts_job_reports_misplaced_overrides(concept_run, synthetic_root, monkeypatch):
    job = runpy.run_path(str(REPO / "jobs" / "concepts.py"))
    monkeypatch.setattr(sys, "argv", ["concepts.py", "--data", str(synthetic_root), "--run", str(concept_run),
                                      "concepts.concepts=2"])
    with pytest.raises(CatdogError, match="put overrides before --run"):
        job["main"]()
