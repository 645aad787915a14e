"""The forest: backend choice, importances (cuML's trees read like scikit-learn's), per-class rankings, the job."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.ensemble import RandomForestClassifier

from catdog.config import load_config, save_config
from catdog.errors import CatdogError
from catdog.forest import (CUML_DEPTH_CAP, choose_backend, class_means, impurity_importances, max_depth_for,
                           per_class_csv, rank_descending, ranking_csv, read_rows, run_forest, signed_importances)
from catdog.sampling import stratified_rows
from catdog.store import FeatureStore
from test_store import CLASSES, write_store

REPO = Path(__file__).resolve().parents[1]


def test_backend_choice():
    assert choose_backend("auto", gpu_forest=False) == "sklearn"
    assert choose_backend("auto", gpu_forest=True) == "cuml"
    assert choose_backend("sklearn", gpu_forest=True) == "sklearn"
    assert choose_backend("cuml", gpu_forest=True) == "cuml"
    with pytest.raises(CatdogError, match="forest.backend=cuml needs a CUDA GPU"):
        choose_backend("cuml", gpu_forest=False)


def test_max_depth_per_backend():
    unlimited, capped = load_config(None).forest, load_config(None, ["forest.max_depth=12"]).forest
    assert max_depth_for(unlimited, "sklearn") is None and max_depth_for(unlimited, "cuml") == CUML_DEPTH_CAP
    assert max_depth_for(capped, "sklearn") == max_depth_for(capped, "cuml") == 12


def cuml_json(tree, node: int = 0) -> dict:
    """A fitted scikit-learn tree in the JSON form cuML's ``get_json`` writes."""
    t = tree.tree_
    left, right = t.children_left[node], t.children_right[node]
    weight = t.weighted_n_node_samples[node]
    if left == -1:
        return {"nodeid": int(node), "leaf_value": 0, "instance_count": float(weight)}
    gain = (t.impurity[node] - t.weighted_n_node_samples[left] / weight * t.impurity[left]
            - t.weighted_n_node_samples[right] / weight * t.impurity[right])
    return {"nodeid": int(node), "split_feature": int(t.feature[node]), "split_threshold": float(t.threshold[node]),
            "gain": float(gain), "instance_count": float(weight), "yes": int(left), "no": int(right),
            "children": [cuml_json(tree, left), cuml_json(tree, right)]}


def test_impurity_importances_from_tree_json_match_sklearn():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 7))
    y = (x[:, 2] + 0.5 * x[:, 5] + 0.3 * rng.normal(size=200) > 0).astype(int)
    forest = RandomForestClassifier(n_estimators=8, random_state=0).fit(x, y)
    trees = json.loads(json.dumps([cuml_json(tree) for tree in forest.estimators_]))
    importances = impurity_importances(trees, 7)
    np.testing.assert_allclose(importances, forest.feature_importances_, atol=1e-12)
    assert rank_descending(importances)[0] == 2


def test_signed_importances_give_each_class_its_own_ranking(tmp_path):
    labels = np.array([0, 0, 0, 1, 1, 1])
    features = np.zeros((6, 4))
    features[labels == 0, 0] = 3.0          # fires for class 0
    features[labels == 1, 1] = 2.0          # fires for class 1
    features[:, 3] = 1.0                    # the same for both
    write_store(tmp_path / "features", {"train": (features, labels)}, shard_size=4, spatial_shape=None)
    store = FeatureStore(tmp_path / "features")
    mean_in, mean_out = class_means(store, "train", 2)  # streamed over two shards
    np.testing.assert_allclose(mean_in[0], [3, 0, 0, 1])
    np.testing.assert_allclose(mean_out[0], [0, 2, 0, 1])
    signed = signed_importances(np.array([0.2, 0.5, 0.1, 0.2]), mean_in, mean_out)
    np.testing.assert_allclose(signed, [[0.2, -0.5, 0.0, 0.0], [-0.2, 0.5, 0.0, 0.0]])
    assert rank_descending(signed[0])[0] == 0 and rank_descending(signed[1])[0] == 1


def test_a_stratified_sample_keeps_every_class_and_its_proportions():
    rng = np.random.default_rng(3)
    labels = rng.permutation(np.repeat([0, 1, 2, 3], [7000, 2300, 690, 10]))  # 70%, 23%, 6.9%, 0.1%
    rows = stratified_rows(labels, 1000, seed=0)
    assert np.all(np.diff(rows) > 0)  # distinct row ids, in shard order
    counts = np.bincount(labels[rows], minlength=4)
    np.testing.assert_array_equal(counts, [700, 230, 69, 1])  # each share, to the row
    assert len(rows) == 1000
    rows_of_five = stratified_rows(labels, 5, seed=0)  # class 3's share rounds to 0 rows: it keeps one
    assert set(labels[rows_of_five]) == {0, 1, 2, 3} and len(rows_of_five) <= 7
    np.testing.assert_array_equal(stratified_rows(labels, 1000, seed=0), rows)  # seeded
    assert not np.array_equal(stratified_rows(labels, 1000, seed=1), rows)
    np.testing.assert_array_equal(stratified_rows(labels, len(labels), seed=0), np.arange(len(labels)))
    np.testing.assert_array_equal(stratified_rows(labels, None, seed=0), np.arange(len(labels)))


def test_read_rows_takes_rows_and_columns_across_shards(tmp_path):
    rng = np.random.default_rng(0)
    features, labels = rng.normal(size=(23, 6)).astype(np.float32), np.arange(23) % 2
    write_store(tmp_path / "features", {"train": (features, labels)}, shard_size=5, spatial_shape=None)
    store = FeatureStore(tmp_path / "features")
    rows, columns = np.array([0, 4, 5, 6, 12, 22]), np.array([5, 0, 3])
    x, y = read_rows(store, "train", rows, columns)
    np.testing.assert_array_equal(x, features[rows][:, columns])
    np.testing.assert_array_equal(y, labels[rows])
    assert x.dtype == np.float32 and x.flags.f_contiguous
    x, y = read_rows(store, "train", np.arange(23))  # whole shards, every column
    np.testing.assert_array_equal(x, features)
    np.testing.assert_array_equal(y, labels)


def test_rank_descending_keeps_lower_index_first_on_ties():
    np.testing.assert_array_equal(rank_descending(np.array([0.1, 0.3, 0.3, 0.0])), [1, 2, 0, 3])


def test_ranking_csvs():
    importances = np.array([0.1, 0.6, 0.3])
    rows = list(csv.DictReader(ranking_csv(importances).splitlines()))
    assert [(r["rank"], r["feature"]) for r in rows] == [("1", "1"), ("2", "2"), ("3", "0")]
    signed = np.array([[0.1, -0.6, 0.3], [-0.1, 0.6, -0.3]])
    rows = list(csv.DictReader(per_class_csv(["cat", "dog"], importances, signed, np.ones((2, 3)),
                                             np.zeros((2, 3))).splitlines()))
    assert [r["feature"] for r in rows if r["class"] == "cat"] == ["2", "0", "1"]
    assert [r["feature"] for r in rows if r["class"] == "dog"] == ["1", "0", "2"]


def separable_splits(seed: int = 0) -> dict:
    """Features 0-1 fire for cats, 2-3 for dogs, 4-7 are noise."""
    rng = np.random.default_rng(seed)
    splits = {}
    for split, n in {"train": 60, "test": 20, "val": 20}.items():
        labels = np.arange(n) % 2
        features = rng.normal(size=(n, 8))
        features[labels == 0, 0:2] += 3.0
        features[labels == 1, 2:4] += 3.0
        splits[split] = (features, labels)
    return splits


def test_forest_writes_summary_importances_and_per_class_rankings(tmp_path):
    write_store(tmp_path / "features", separable_splits(), shard_size=25, spatial_shape=None)
    config = load_config(None, ["forest.n_estimators=25", "forest.n_jobs=1"])
    summary = run_forest(config, tmp_path)

    out = tmp_path / "forest"
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["backend"] == "sklearn" and summary["n_estimators"] == 25 and summary["train_rows"] == 60
    for split in ("train", "test", "val"):
        assert 0.0 <= summary[f"{split}_accuracy"] <= 1.0
    assert summary["train_accuracy"] == 1.0 and summary["test_accuracy"] >= 0.9 and summary["val_accuracy"] >= 0.9
    importances = np.load(out / "importances.npy")
    assert importances.shape == (8,) and importances.sum() == pytest.approx(1.0)
    assert set(rank_descending(importances)[:4]) == {0, 1, 2, 3}
    assert [int(r["feature"]) for r in csv.DictReader((out / "ranking.csv").open())] == \
        rank_descending(importances).tolist()

    per_class = list(csv.DictReader((out / "ranking_per_class.csv").open()))
    top = {name: [int(r["feature"]) for r in per_class if r["class"] == name][:2] for name in CLASSES}
    assert set(top["cat"]) == {0, 1} and set(top["dog"]) == {2, 3}
    assert summary["top10"]["cat"][:2] == top["cat"] and summary["top10"]["cat"] != summary["top10"]["dog"]
    assert (out / "config.yaml").is_file()


def test_forest_on_a_sample_fits_the_sample_and_scores_every_row(tmp_path):
    splits = separable_splits()
    features, labels = splits["train"]
    write_store(tmp_path / "features", splits, shard_size=25, spatial_shape=None)
    config = load_config(None, ["forest.n_estimators=25", "forest.n_jobs=1", "forest.max_train_rows=30"])
    summary = run_forest(config, tmp_path)
    assert summary["train_rows"] == 60 and summary["fit_rows"] == 30

    rows = stratified_rows(labels, 30, config.forest.random_state)
    assert np.bincount(labels[rows]).tolist() == [15, 15]
    direct = RandomForestClassifier(n_estimators=25, random_state=config.forest.random_state, n_jobs=1)
    direct.fit(features[rows].astype(np.float32), labels[rows])
    importances = np.load(tmp_path / "forest" / "importances.npy")
    np.testing.assert_allclose(importances, direct.feature_importances_, rtol=1e-6, atol=1e-12)
    for split, (x, y) in splits.items():  # every row scored, not only the sample
        assert summary[f"{split}_accuracy"] == pytest.approx(np.mean(direct.predict(x.astype(np.float32)) == y))
    per_class = list(csv.DictReader((tmp_path / "forest" / "ranking_per_class.csv").open()))
    cat_means = {int(r["feature"]): float(r["mean_in_class"]) for r in per_class if r["class"] == "cat"}
    np.testing.assert_allclose([cat_means[j] for j in range(8)], features[labels == 0].mean(axis=0), rtol=1e-5,
                               atol=1e-6)  # the means cover all 60 train rows


def test_forest_without_a_store_is_a_clear_error(tmp_path):
    with pytest.raises(CatdogError, match="no manifest.json.*jobs/extract.py"):
        run_forest(load_config(None), tmp_path)


@pytest.mark.slow
def test_forest_job_command_line(tmp_path):
    run = tmp_path / "run"
    save_config(load_config(None, ["forest.n_estimators=10", "forest.backend=sklearn"]), run / "config.yaml")
    write_store(run / "features", separable_splits(), shard_size=40, spatial_shape=None)
    done = subprocess.run([sys.executable, "jobs/forest.py", "--run", str(run), "forest.random_state=7"], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "backend sklearn" in done.stdout
    summary = json.loads((run / "forest" / "summary.json").read_text())
    assert summary["n_estimators"] == 10 and summary["random_state"] == 7
    assert (run / "forest" / "config.yaml").read_text().count("random_state: 7") == 1
