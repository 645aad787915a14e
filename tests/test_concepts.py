"""Concepts from the feature store: the streamed NMF recovers planted concepts without holding every map, the
importance of a concept the head relies on beats its random baseline, and the job writes montages, sample figures
and index.json, reuses finished classes, and runs classes as Ray tasks."""
from __future__ import annotations

import json
import runpy
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.decomposition import MiniBatchNMF
from torch import nn

from catdog.concepts import (class_rows, coefficient_maps, concept_importance, crop_box, fit_nmf, positions,
                             random_directions, run_concepts, scan_concepts, transform)
from catdog.config import load_config
from catdog.errors import CatdogError
from catdog.io import read_json
from catdog.store import FeatureStore
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


def test_streamed_nmf_recovers_planted_concepts_one_batch_at_a_time(tmp_path, monkeypatch):
    folder, planted = planted_store(tmp_path / "features")
    store = FeatureStore(folder)
    largest = []
    spatial = FeatureStore.spatial

    def recording(self, split, rows):
        largest.append(len(rows))
        return spatial(self, split, rows)

    monkeypatch.setattr(FeatureStore, "spatial", recording)
    cfg = load_config(None, [f"concepts.concepts={K}", "concepts.batch_images=4", "concepts.passes=15"]).concepts
    for c in range(len(CLASSES)):
        rows = class_rows(store, "train", c)
        assert len(rows) == 30 and (store.labels("train")[rows] == c).all()
        nmf = fit_nmf(store, "train", rows, cfg)
        assert cosine_match(nmf.components_, planted[c]).min() > 0.95
        scan = scan_concepts(store, "train", rows, nmf.components_, 5, cfg.batch_images)
        assert scan["reconstruction_error"] < 0.1 and scan["positions"] == 30 * 12
        assert scan["top"].rows.shape == (K, 5) and set(scan["top"].rows.ravel()) <= set(rows.tolist())
    assert max(largest) == 4  # never more than batch_images images' maps at once


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
    result = concept_importance(network, store, "val", class_rows(store, "val", 0), 0, components, baselines, 4)
    assert result["images"] == 10
    importance, random = result["importance"], result["random_importance"]
    assert importance[1] > 1.5 * random[1] > 0  # the concept the head relies on
    assert importance[1] > 10 * max(abs(importance[0]), abs(importance[2]))  # the others barely matter
    assert result["beats_random"][1] == 1.0
    # removing the whole concept 1 part, through the mean pool and the linear head, is linear in the maps
    maps = store.spatial("val", class_rows(store, "val", 0)).astype(np.float32)
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
    assert list(index["classes"]) == store.classes == ["cat", "dog"]
    for name, entry in index["classes"].items():
        assert entry["images"] == 24 and entry["importance_images"] == 5 and entry["positions"] == 24 * 4
        concepts = entry["concepts"]
        assert [c["concept"] for c in concepts] == [1, 2, 3]
        assert [c["importance"] for c in concepts] == sorted((c["importance"] for c in concepts), reverse=True)
        for c in concepts:
            assert len(c["images"]) == 4 and all(image["label"] == name for image in c["images"])
            assert [image["value"] for image in c["images"]] == sorted((i["value"] for i in c["images"]), reverse=True)
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
    assert [p.stat().st_mtime_ns for p in parts] == stamps  # finished classes are reused
    assert again["classes"]["cat"]["concepts"] == index["classes"]["cat"]["concepts"]
    (out / "parts" / "dog.json").unlink()
    run_concepts([run], synthetic_root, config, use_ray=False)
    assert (out / "parts" / "cat.json").stat().st_mtime_ns == stamps[0]  # only dog is computed again
    assert (out / "parts" / "dog.json").is_file()


def test_classes_run_as_ray_tasks_with_the_same_result(ray_local, concept_run, synthetic_root, tmp_path):
    local = Path(shutil.copytree(concept_run, tmp_path / "local"))
    remote = Path(shutil.copytree(concept_run, tmp_path / "remote"))
    config = run_config(concept_run)
    expected = run_concepts([local], synthetic_root, config, use_ray=False)[str(local)]
    found = run_concepts([remote], synthetic_root, config)[str(remote)]  # 2 pending classes: Ray tasks
    for name in ("cat", "dog"):
        for a, b in zip(expected["classes"][name]["concepts"], found["classes"][name]["concepts"]):
            assert a["importance"] == pytest.approx(b["importance"], rel=1e-4, abs=1e-6)
            assert [i["row"] for i in a["images"]] == [i["row"] for i in b["images"]]


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
