import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import ray
from PIL import Image

from catdog.cluster import _run_shard
from catdog.config import load_config
from catdog.errors import CatdogError
from catdog.store import FeatureStore
from catdog.topact import (draw_feature, empty_topk, merge_topk, run_topact, search_top_activations, shard_topk,
                           update_topk)
from conftest import make_image_folder
from synthetic_store import write_rankings, write_store

CLASSES = ["cat", "dog"]
DIM, PER_CLASS = 6, 6
RANKINGS = {"cat": [2, 0, 5], "dog": [4, 2, 1]}  # feature 2 is in both lists
OVERRIDES = ["topact.features_per_class=2", "topact.images_per_feature=4", "topact.selectivity_top=8"]


def brute_force(values: np.ndarray, k: int) -> np.ndarray:
    """Per feature (column), the row ids of the k highest values; ties to the lower row id."""
    return np.argsort(-values, axis=0, kind="stable")[:k].T


@pytest.mark.parametrize("k", [1, 7, 50, 200])
def test_running_topk_over_shards_equals_a_stable_argsort(k):
    rng = np.random.default_rng(k)
    values = rng.integers(-2, 3, size=(103, 4)).astype(np.float32)  # 5 distinct values: ties everywhere
    rows = np.arange(103)
    parts = []
    for lo, hi in [(0, 40), (40, 41), (41, 103)]:  # shards
        state = empty_topk(4, k)
        for start in range(lo, hi, 7):  # batches within a shard
            stop = min(start + 7, hi)
            state = update_topk(state, values[start:stop], rows[start:stop])
        parts.append(state)
    merged = merge_topk(parts[::-1])
    expected = brute_force(values, k)
    assert np.array_equal(merged.rows, expected)
    assert np.array_equal(merged.values, np.take_along_axis(values.T, expected, axis=1))


@pytest.fixture(scope="module")
def topact_run(tmp_path_factory) -> tuple[Path, Path]:
    """Images on disk, a 3-shard train store with integer activations (many ties) and per-class rankings."""
    root = make_image_folder(tmp_path_factory.mktemp("images"), {"train": PER_CLASS}, size=(36, 44))
    paths = [f"train/{name}/{name}.{i}.jpg" for name in CLASSES for i in range(PER_CLASS)]
    n = len(paths)
    rng = np.random.default_rng(3)
    spatial = rng.integers(0, 4, size=(n, DIM, 3, 3)).astype(np.float32)
    train = {"features": spatial.mean(axis=(2, 3)).round(), "labels": np.repeat([0, 1], PER_CLASS),
             "paths": np.array(paths, dtype=object), "spatial": spatial}
    run = tmp_path_factory.mktemp("topact") / "run"
    write_store(run / "features", {"train": train}, CLASSES, shard_size=5, spatial_shape=(DIM, 3, 3))
    write_rankings(run / "forest", list(range(DIM)), RANKINGS)
    return run, root


def test_search_over_shards_on_ray_equals_brute_force(ray_local, topact_run):
    store = FeatureStore(topact_run[0] / "features")
    features = store.features("train")
    chosen = np.array([0, 2, 4])
    top, info, nodes = search_top_activations(store, "train", chosen, k=5, in_flight=1)
    assert len(store.shards("train")) == 3
    assert [n["file"] for n in nodes] == [p.name for p in store.shards("train")]
    assert {n["node"] for n in nodes} == {ray.util.get_node_ip_address()}
    assert {n["read"] for n in nodes} == {"file"}  # this node sees the run directory
    assert len(np.unique(features[:, chosen])) < features.shape[0]  # ties are present
    assert np.array_equal(top.rows, brute_force(features[:, chosen], 5))
    labels, paths = store.labels("train"), store.paths("train")
    assert info == {int(r): (int(labels[r]), paths[r]) for r in np.unique(top.rows)}


def test_montages_and_index(ray_local, topact_run, tmp_path):
    run = Path(shutil.copytree(topact_run[0], tmp_path / "run"))
    config = load_config(None, OVERRIDES)
    index = run_topact(run, topact_run[1], config)

    out = run / "topact"
    assert json.loads((out / "index.json").read_text()) == index
    assert load_config(out / "config.yaml") == config
    store = FeatureStore(run / "features")
    features, labels, paths = store.features("train"), store.labels("train"), store.paths("train")
    for name in CLASSES:
        entries = index["classes"][name]
        assert [e["feature"] for e in entries] == RANKINGS[name][:2]
        for entry in entries:
            f = entry["feature"]
            expected = brute_force(features[:, [f]], 8)[0]
            assert [image["row"] for image in entry["images"]] == expected[:4].tolist()
            assert [image["activation"] for image in entry["images"]] == features[expected[:4], f].tolist()
            assert [image["path"] for image in entry["images"]] == [paths[r] for r in expected[:4]]
            assert [image["label"] for image in entry["images"]] == [CLASSES[labels[r]] for r in expected[:4]]
            counts = np.bincount(labels[expected], minlength=2) / 8
            assert entry["class_shares"] == {"cat": counts[0], "dog": counts[1]}
            with Image.open(out / entry["montage"]) as montage:
                assert montage.width > 500 and montage.height > 200
    assert sorted(p.name for p in out.glob("*.png")) == ["cat-f0.png", "cat-f2.png", "dog-f2.png", "dog-f4.png"]
    here = ray.util.get_node_ip_address()
    assert index["nodes"] == {here: {"shards": 3, "shards_sent": 0, "montages": 4}}
    assert [s["rows"] for s in index["shards"]] == [5, 5, 2]


def test_only_the_shown_classes_get_montages(ray_local, topact_run, tmp_path):
    run = Path(shutil.copytree(topact_run[0], tmp_path / "run"))
    index = run_topact(run, topact_run[1], load_config(None, [*OVERRIDES, "figures.max_classes=1"]))
    # no val predictions in this run: the first class is shown
    assert list(index["classes"]) == ["cat"] and index["classes_total"] == 2
    assert sorted(p.name for p in (run / "topact").glob("*.png")) == ["cat-f0.png", "cat-f2.png"]


def test_a_task_whose_node_does_not_see_the_shard_gets_its_bytes(ray_local, topact_run, tmp_path):
    """The rule of catdog.cluster: a task reads the shard file where its node sees it; where it does not, it asks
    for the file's bytes (the namespace cluster of test_multinode.py runs it across hosts)."""
    store = FeatureStore(topact_run[0] / "features")
    info, path = store.shard_infos("train")[1], store.shards("train")[1]
    chosen = np.array([1, 3])
    seen, found, where = _run_shard(shard_topk, str(path), info, None, chosen, 3)
    assert seen and where["read"] == "file"
    unseen = _run_shard(shard_topk, str(tmp_path / "elsewhere" / info.file), info, None, chosen, 3)
    assert unseen[:2] == (False, None)
    (tmp_path / "other.h5").write_bytes(path.read_bytes()[:-1])  # a file there, but not the manifest's
    assert _run_shard(shard_topk, str(tmp_path / "other.h5"), info, None, chosen, 3)[0] is False
    seen, sent, where = _run_shard(shard_topk, str(tmp_path / "elsewhere" / info.file), info, path.read_bytes(),
                                   chosen, 3)
    assert seen and where["read"] == "object store"
    assert np.array_equal(sent[0].rows, found[0].rows) and sent[1] == found[1]


def test_montages_drawn_on_ray_equal_montages_drawn_here(ray_local, topact_run, tmp_path):
    """The montage tasks get images and spatial maps from the object store and return PNG bytes (a worker
    without the run directory is tested in test_multinode.py); the bytes equal a montage drawn in-process."""
    run = Path(shutil.copytree(topact_run[0], tmp_path / "run"))
    config = load_config(None, OVERRIDES)
    index = run_topact(run, topact_run[1], config)
    store = FeatureStore(run / "features")
    for name, entries in index["classes"].items():
        for entry in entries:
            local = tmp_path / f"local-{entry['montage']}"
            draw_feature(entry, name, store, config.topact, topact_run[1], local)
            assert local.read_bytes() == (run / "topact" / entry["montage"]).read_bytes()


def test_clear_errors_for_missing_images_spatial_maps_and_colormaps(ray_local, topact_run, tmp_path):
    run, root = topact_run
    with pytest.raises(CatdogError, match="no such directory"):
        run_topact(run, tmp_path / "nowhere", load_config(None, OVERRIDES))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CatdogError, match="missing under"):
        run_topact(Path(shutil.copytree(run, tmp_path / "a")), tmp_path / "empty", load_config(None, OVERRIDES))
    with pytest.raises(CatdogError, match="topact.colormap"):
        run_topact(run, root, load_config(None, [*OVERRIDES, "topact.colormap=rainbowish"]))

    flat = tmp_path / "flat"
    store = FeatureStore(run / "features")
    train = {"features": store.features("train"), "labels": store.labels("train"),
             "paths": np.array(store.paths("train"), dtype=object)}
    write_store(flat / "features", {"train": train}, CLASSES, shard_size=5)
    with pytest.raises(CatdogError, match="without spatial maps"):
        run_topact(flat, root, load_config(None, OVERRIDES))
