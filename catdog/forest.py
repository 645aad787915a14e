"""A random forest on the feature store's pooled features, its feature importances and per-class rankings.

Backend: cuML's RandomForestClassifier on a CUDA GPU when cuML is installed, else scikit-learn on all cores.
Importance is the impurity importance (mean decrease in Gini impurity, scikit-learn's ``feature_importances_``);
on cuML it is read from ``feature_importances_`` where the installed cuML has it, else derived from the
fitted trees (``get_json``) with the same definition. The per-class ranking signs each feature's importance
by the class its activation favours (see ``signed_importances``), so each class gets its own list.

A forest fits on rows held in memory, so it fits on a stratified sample of at most ``forest.max_train_rows`` train
rows (``stratified_rows``, read shard by shard with ``read_rows``); its accuracies and the per-class means behind
the signed importances are streamed over every row of the store, one shard at a time. Rows whose image could not be
decoded (``FeatureStore.readable``) are left out of all of them.
"""
from __future__ import annotations

import csv
import io
import json
import os
import time
from typing import Callable, Iterator

import h5py
import numpy as np

from catdog.config import Config, ForestConfig, save_config
from catdog.errors import CatdogError
from catdog.io import atomic_path, write_json, write_text
from catdog.run import RunDir
from catdog.sampling import stratified_rows
from catdog.store import FeatureStore

Predict = Callable[[np.ndarray], np.ndarray]
CUML_DEPTH_CAP = 64
"""cuML before 26.02 cannot grow trees without a depth limit; ``forest.max_depth: null`` means this there."""


def cuml_available() -> bool:
    """A CUDA GPU and an importable cuML."""
    import torch

    if not torch.cuda.is_available():
        return False
    try:
        import cuml  # noqa: F401
    except ImportError:
        return False
    return True


def choose_backend(setting: str, gpu_forest: bool) -> str:
    """``auto`` -> cuml when ``gpu_forest`` (GPU and cuML present), else sklearn; ``cuml`` needs ``gpu_forest``."""
    if setting == "cuml" and not gpu_forest:
        raise CatdogError("forest.backend=cuml needs a CUDA GPU and cuML (pip install 'catdog[gpu]'); "
                          "use forest.backend=auto or forest.backend=sklearn")
    if setting == "auto":
        return "cuml" if gpu_forest else "sklearn"
    return setting


def impurity_importances(trees: list[dict], n_features: int) -> np.ndarray:
    """scikit-learn's impurity importance from trees in cuML's JSON form (``RandomForestClassifier.get_json``).

    A split node carries ``split_feature``, ``gain`` (impurity decrease, children weighted by their share of
    the node) and ``instance_count``; its feature earns ``instance_count * gain``. Each tree's importances are
    normalised to sum to 1, averaged over the trees that split at all, and normalised again.
    """
    per_tree = []
    for root in trees:
        importance = np.zeros(n_features)
        stack = [root]
        while stack:
            node = stack.pop()
            if "children" in node:
                importance[node["split_feature"]] += node["instance_count"] * node["gain"]
                stack.extend(node["children"])
        if importance.sum() > 0:
            per_tree.append(importance / importance.sum())
    if not per_tree:
        return np.zeros(n_features)
    mean = np.mean(per_tree, axis=0)
    return mean / mean.sum()


def signed_importances(importances: np.ndarray, mean_in: np.ndarray, mean_out: np.ndarray) -> np.ndarray:
    """Per class c and feature j: ``importance_j * sign(mean_j on class c - mean_j on the other classes)``, as
    (n_classes, D), from the means ``class_means`` gives."""
    return importances[None, :] * np.sign(mean_in - mean_out)


def stratified_readable_rows(store: FeatureStore, split: str, max_rows: int | None, seed: int) -> np.ndarray:
    """Ascending row ids of ``stratified_rows``'s sample of the split's readable rows (``FeatureStore.readable``)."""
    readable = store.readable_rows(split)
    return readable[stratified_rows(store.labels(split)[readable], max_rows, seed)]


def read_rows(store: FeatureStore, split: str, rows: np.ndarray,
              columns: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A split's ``rows`` (ascending row ids) with only ``columns`` (in the order given; all by default), and
    their labels, read shard by shard (one shard's rows in memory besides the result). The features come as one
    float32 array in Fortran order: each column contiguous, so its first k columns are a view, which
    scikit-learn's trees use as it is (they copy any other dtype)."""
    width = store.feature_dim if columns is None else len(columns)
    features = np.empty((len(rows), width), dtype=np.float32, order="F")
    labels = np.empty(len(rows), dtype=np.int64)
    for info in store.shard_infos(split):
        lo, hi = np.searchsorted(rows, [info.first_row, info.first_row + info.rows])
        if lo == hi:
            continue
        selection = slice(None) if hi - lo == info.rows else rows[lo:hi] - info.first_row
        with h5py.File(store.path / info.file, "r") as f:
            block = f["features"][selection]
            labels[lo:hi] = f["labels"][selection]
        features[lo:hi] = block if columns is None else block[:, columns]
    return features, labels


def iter_shards(store: FeatureStore, split: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """A split's readable rows' ``(features, labels)`` (``FeatureStore.shard_readable``), one shard at a time, in
    row order."""
    for info in store.shard_infos(split):
        readable = store.shard_readable(info)
        with h5py.File(store.path / info.file, "r") as f:
            yield f["features"][:][readable], f["labels"][:][readable]


def class_means(store: FeatureStore, split: str, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Each feature's mean on each class and on the other classes, ``(mean_in, mean_out)``, each (n_classes, D),
    over every readable row of the split (streamed; sums in float64)."""
    sums = np.zeros((n_classes, store.feature_dim))
    counts = np.zeros(n_classes)
    for features, labels in iter_shards(store, split):
        np.add.at(sums, labels, features.astype(np.float64))
        counts += np.bincount(labels, minlength=n_classes)
    with np.errstate(divide="ignore", invalid="ignore"):  # a class without rows: NaN, as numpy's mean gives
        return sums / counts[:, None], (sums.sum(axis=0) - sums) / (counts.sum() - counts)[:, None]


def accuracy(store: FeatureStore, split: str, predict: Predict) -> float:
    """The share of a split's readable rows that ``predict`` gets right, streamed shard by shard."""
    correct = total = 0
    for features, labels in iter_shards(store, split):
        correct += int(np.sum(predict(features) == labels))
        total += len(labels)
    return correct / total


def rank_descending(scores: np.ndarray) -> np.ndarray:
    """Feature indices from highest to lowest score; ties keep the lower index first."""
    return np.argsort(-scores, kind="stable")


def ranking_csv(importances: np.ndarray) -> str:
    """``rank,feature,importance`` for every feature, most important first (rank 1)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["rank", "feature", "importance"])
    for rank, j in enumerate(rank_descending(importances), start=1):
        writer.writerow([rank, j, f"{importances[j]:.8g}"])
    return out.getvalue()


def per_class_csv(classes: list[str], importances: np.ndarray, signed: np.ndarray, mean_in: np.ndarray,
                  mean_out: np.ndarray) -> str:
    """Per class, every feature ranked by descending signed importance (rank 1 = most important for it)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["class", "rank", "feature", "signed_importance", "importance", "mean_in_class",
                     "mean_in_others"])
    for c, name in enumerate(classes):
        for rank, j in enumerate(rank_descending(signed[c]), start=1):
            writer.writerow([name, rank, j, f"{signed[c, j]:.8g}", f"{importances[j]:.8g}",
                             f"{mean_in[c, j]:.6g}", f"{mean_out[c, j]:.6g}"])
    return out.getvalue()


def fit_sklearn(cfg: ForestConfig, features: np.ndarray, labels: np.ndarray) -> tuple[Predict, np.ndarray]:
    from sklearn.ensemble import RandomForestClassifier

    model = RandomForestClassifier(n_estimators=cfg.n_estimators, random_state=cfg.random_state,
                                   max_depth=cfg.max_depth, n_jobs=cfg.n_jobs)
    model.fit(features, labels)
    return model.predict, model.feature_importances_


def max_depth_for(cfg: ForestConfig, backend: str) -> int | None:
    """The depth limit the backend gets: scikit-learn's ``None`` is unlimited, cuML's is ``CUML_DEPTH_CAP``."""
    if backend == "cuml" and cfg.max_depth is None:
        return CUML_DEPTH_CAP
    return cfg.max_depth


def fit_cuml(cfg: ForestConfig, features: np.ndarray, labels: np.ndarray) -> tuple[Predict, np.ndarray]:
    """cuML on float32 GPU arrays; one CUDA stream, so that ``random_state`` makes the forest reproducible."""
    import cupy as cp
    from cuml.ensemble import RandomForestClassifier

    model = RandomForestClassifier(n_estimators=cfg.n_estimators, random_state=cfg.random_state,
                                   max_depth=max_depth_for(cfg, "cuml"), n_streams=1)
    model.fit(cp.asarray(features, dtype=cp.float32), cp.asarray(labels, dtype=cp.int32))

    def predict(x: np.ndarray) -> np.ndarray:
        return cp.asnumpy(model.predict(cp.asarray(x, dtype=cp.float32))).astype(np.int64)

    if hasattr(model, "feature_importances_"):
        importances = cp.asnumpy(cp.asarray(model.feature_importances_))
    else:
        importances = impurity_importances(json.loads(model.get_json()), features.shape[1])
    return predict, importances


def _save_npy(path: os.PathLike, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array)


def run_forest(config: Config, run_dir: str | os.PathLike, verify: bool = False) -> dict:
    """Fit the forest on (a stratified sample of) the run's train features, score every split, write
    ``RUN/forest/``. Returns the summary. Only the sample is held in memory (``forest.max_train_rows``).

    ``verify``: check every shard's full checksum first (by default only its size and header)."""
    cfg = config.forest
    run = RunDir(run_dir)
    store = FeatureStore(run.features_dir, verify=verify)
    if "train" not in store.splits:
        raise CatdogError(f"feature store {store.path}: no train split (it has {store.splits}); "
                          f"extract it: jobs/extract.py --run {run.path} --data DATA_ROOT")
    train_rows = int(store.readable("train").sum())
    features, labels = read_rows(store, "train",
                                 stratified_readable_rows(store, "train", cfg.max_train_rows, cfg.random_state))
    backend = choose_backend(cfg.backend, cfg.backend != "sklearn" and cuml_available())
    sampled = f" (a stratified sample of {train_rows})" if len(labels) < train_rows else ""
    print(f"forest: {cfg.n_estimators} trees on {len(labels)} x {features.shape[1]} train features{sampled}, "
          f"backend {backend}")
    start = time.perf_counter()
    predict, importances = (fit_cuml if backend == "cuml" else fit_sklearn)(cfg, features, labels)
    fit_seconds = time.perf_counter() - start
    del features

    accuracies = {f"{split}_accuracy": accuracy(store, split, predict)
                  for split in ["train", *[s for s in store.splits if s != "train"]]}
    mean_in, mean_out = class_means(store, "train", len(store.classes))
    signed = signed_importances(importances, mean_in, mean_out)
    top = {"global": rank_descending(importances)[:10].tolist()}
    top.update({name: rank_descending(signed[c])[:10].tolist() for c, name in enumerate(store.classes)})
    summary = {
        **accuracies,
        "backend": backend,
        "fit_seconds": fit_seconds,
        "n_estimators": cfg.n_estimators,
        "random_state": cfg.random_state,
        "max_depth": max_depth_for(cfg, backend),
        "train_rows": train_rows,
        "fit_rows": int(len(labels)),
        "feature_dim": store.feature_dim,
        "classes": store.classes,
        "checkpoint_sha256": store.manifest["checkpoint_sha256"],
        "importance": "impurity (mean decrease in Gini impurity)",
        "per_class_importance": "importance * sign(mean activation on the class - mean on the other classes), "
                                "train split",
        "top10": top,
    }
    _save_npy(run.importances_path, importances)
    write_text(run.ranking_path, ranking_csv(importances))
    write_text(run.ranking_per_class_path, per_class_csv(store.classes, importances, signed, mean_in, mean_out))
    save_config(config, run.forest_dir / "config.yaml")
    write_json(run.forest_summary, summary)  # last: its presence marks the stage complete
    print("forest (" + backend + "): " + ", ".join(f"{k.removesuffix('_accuracy')} {v:.2%}"
                                                 for k, v in accuracies.items()) + f"; fit {fit_seconds:.1f} s")
    return summary
