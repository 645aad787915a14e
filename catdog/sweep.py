"""The top-k feature sweep: refit classifiers on the k features the forest ranks highest, one Ray task per cell.

A cell is one (k, classifier) pair. ``fit_cell`` is the pure core; ``compute_cells`` runs cells as Ray
tasks, with the features put into the object store once (each node fetches them once, every task on it
reads them from shared memory). ``run_sweep`` is the job: it appends each finished cell to
``RUN/sweep/results.csv`` (rewritten atomically), so a rerun computes only the cells still missing, and
draws ``RUN/sweep/accuracy_vs_k.png``. Ray workers import this module to run a cell, so it imports
nothing heavy (no torch).
"""
from __future__ import annotations

import csv
import functools
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Union

import numpy as np
import ray
from matplotlib.figure import Figure
from ray.exceptions import RayTaskError
from sklearn.base import ClassifierMixin, clone
from sklearn.metrics import accuracy_score
from sklearn.utils import all_estimators

from catdog.cluster import ray_session
from catdog.config import SPLITS, ClassifierSpec, Config, SweepConfig, save_config
from catdog.errors import CatdogError
from catdog.io import atomic_path
from catdog.progress import progress_bar
from catdog.ranking import read_ranking
from catdog.run import RunDir
from catdog.store import FeatureStore

log = logging.getLogger(__name__)

RESULT_COLUMNS = ("k", "classifier", "n_features", "test_accuracy", "val_accuracy", "fit_seconds",
                  "estimator", "params", "ranking")
SplitData = dict[str, tuple[np.ndarray, np.ndarray]]
"""``{"train": (X, y), "test": (X, y), "val": (X, y)}`` with X of shape (N, D)."""


@functools.cache
def _classifier_classes() -> dict[str, type]:
    return dict(all_estimators(type_filter="classifier"))


def build_estimator(spec: ClassifierSpec) -> ClassifierMixin:
    """An unfitted scikit-learn classifier from its class name and parameters."""
    classes = _classifier_classes()
    if spec.estimator not in classes:
        raise CatdogError(f"sweep.classifiers: {spec.estimator!r} is not a scikit-learn classifier "
                          "(use a class name such as RandomForestClassifier, LogisticRegression or SVC)")
    try:
        return classes[spec.estimator](**spec.params)
    except TypeError as exc:
        raise CatdogError(f"sweep.classifiers: bad params for {spec.estimator}: {exc}") from None


def fit_cell(data: SplitData, feature_idx: np.ndarray, estimator: ClassifierMixin) -> dict:
    """Fit a clone of ``estimator`` on the train rows' ``feature_idx`` columns; score it on test and val."""
    model = clone(estimator)
    x_train, y_train = data["train"]
    start = time.perf_counter()
    model.fit(x_train[:, feature_idx], y_train)
    fit_seconds = time.perf_counter() - start
    scores = {f"{split}_accuracy": float(accuracy_score(y, model.predict(x[:, feature_idx])))
              for split, (x, y) in data.items() if split != "train"}
    return {**scores, "fit_seconds": fit_seconds}


@dataclass(frozen=True)
class Cell:
    """One (k, classifier) pair of the grid; ``k`` as configured (an int or ``"all"``)."""

    k: Union[int, str]
    classifier: str
    spec: ClassifierSpec
    n_features: int
    ranking: str

    @property
    def key(self) -> tuple[str, ...]:
        """What identifies a finished cell in results.csv (a changed parameter means a new cell)."""
        return (str(self.k), self.classifier, self.spec.estimator, _params_text(self.spec.params), self.ranking)


def _params_text(params: dict) -> str:
    return json.dumps(params, sort_keys=True)


def sweep_cells(cfg: SweepConfig, feature_dim: int) -> list[Cell]:
    """The grid: classifier by classifier, each with every k in the order listed; k is capped at the feature count."""
    for k in cfg.ks:
        if k != "all" and k > feature_dim:
            log.warning("sweep.ks: k=%s exceeds the store's %d features; that cell uses all of them", k, feature_dim)
    return [Cell(k, name, spec, feature_dim if k == "all" else min(k, feature_dim), cfg.ranking)
            for name, spec in cfg.classifiers.items() for k in cfg.ks]


def compute_cells(data: SplitData, order: np.ndarray, cells: list[Cell], max_retries: int,
                  fit: Callable[[SplitData, np.ndarray, ClassifierMixin], dict] = fit_cell
                  ) -> Iterator[tuple[Cell, dict]]:
    """Run each cell as a Ray task (one CPU each) and yield ``(cell, result)`` in the order they finish.

    Cells with the most features are submitted first, so that the last ones to run are short. A task whose
    worker or node dies is rerun up to ``max_retries`` times. Exceptions raised by the fit
    itself are not retried: with fixed data and seeds they would only repeat.
    """
    task = ray.remote(num_cpus=1, max_retries=max_retries, retry_exceptions=False)(fit)
    estimators = {cell.classifier: build_estimator(cell.spec) for cell in cells}
    data_ref = ray.put(data)
    pending = {task.remote(data_ref, order[:cell.n_features], estimators[cell.classifier]): cell
               for cell in sorted(cells, key=lambda cell: -cell.n_features)}
    with progress_bar(total=len(pending), desc="sweep cells", unit="cell") as bar:
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            cell = pending.pop(ref)
            try:
                result = ray.get(ref)
            except RayTaskError as exc:
                if isinstance(exc.cause, ValueError):
                    raise CatdogError(f"sweep cell k={cell.k} {cell.classifier} ({cell.spec.estimator}, "
                                      f"params {cell.spec.params}): {exc.cause}") from None
                raise
            bar.update()
            yield cell, result


def read_results(path: Path) -> list[dict]:
    """Rows of a results.csv (all values as text); none when it does not exist yet."""
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = set(RESULT_COLUMNS) - set(reader.fieldnames or [])
        if missing:
            raise CatdogError(f"{path}: missing column(s) {sorted(missing)}; delete the file to recompute the sweep")
        return list(reader)


def write_results(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=RESULT_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def result_row(cell: Cell, result: dict) -> dict:
    return {"k": str(cell.k), "classifier": cell.classifier, "n_features": cell.n_features,
            "estimator": cell.spec.estimator, "params": _params_text(cell.spec.params), "ranking": cell.ranking,
            **result}


def _row_key(row: dict) -> tuple[str, ...]:
    return (row["k"], row["classifier"], row["estimator"], row["params"], row["ranking"])


def load_split_data(store: FeatureStore) -> SplitData:
    return {split: (store.features(split), store.labels(split)) for split in SPLITS}


def run_sweep(run_dir: str | os.PathLike, config: Config, address: str | None = None, verify: bool = False,
              fit: Callable[[SplitData, np.ndarray, ClassifierMixin], dict] = fit_cell) -> list[dict]:
    """The sweep job: compute the cells missing from ``RUN/sweep/results.csv`` on Ray, then plot.

    Returns the rows of the grid in grid order. Rows of results.csv that belong to no cell of the current
    config (another k list, changed parameters) are dropped from the file.
    """
    cfg, run = config.sweep, RunDir(run_dir)
    store = FeatureStore(run.features_dir, verify=verify)
    order = read_ranking(run, cfg.ranking, store.feature_dim)
    cells = sweep_cells(cfg, store.feature_dim)
    for spec in cfg.classifiers.values():
        build_estimator(spec)  # a misspelt name fails here, before results.csv is touched
    results_path = run.sweep_results
    save_config(config, run.sweep_dir / "config.yaml")

    done = {_row_key(row): row for row in read_results(results_path)}
    finished = {cell.key: done[cell.key] for cell in cells if cell.key in done}
    todo = [cell for cell in cells if cell.key not in finished]
    log.info("sweep: %d cell(s), %d already in %s, %d to compute", len(cells), len(finished), results_path, len(todo))

    def grid_rows() -> list[dict]:
        return [finished[cell.key] for cell in cells if cell.key in finished]

    write_results(results_path, grid_rows())
    if todo:
        data = load_split_data(store)
        with ray_session(address):
            for cell, result in compute_cells(data, order, todo, cfg.max_retries, fit):
                finished[cell.key] = result_row(cell, result)
                write_results(results_path, grid_rows())
    rows = read_results(results_path)
    plot_accuracy(rows, run.sweep_plot, title=f"ranking: {cfg.ranking}")  # last: marks the stage complete
    return rows


def plot_accuracy(rows: list[dict], path: Path, title: str = "") -> None:
    """Test (solid) and val (dashed) accuracy against the number of features, log scale, a line per classifier."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    classifiers = list(dict.fromkeys(row["classifier"] for row in rows))
    for i, name in enumerate(classifiers):
        mine = sorted((row for row in rows if row["classifier"] == name), key=lambda row: int(row["n_features"]))
        x = [int(row["n_features"]) for row in mine]
        colour = f"C{i}"
        ax.plot(x, [100 * float(row["test_accuracy"]) for row in mine], "o-", color=colour, label=f"{name} test")
        ax.plot(x, [100 * float(row["val_accuracy"]) for row in mine], "s--", color=colour, label=f"{name} val")
    ticks = sorted({int(row["n_features"]) for row in rows})
    everything = {int(row["n_features"]) for row in rows if row["k"] == "all"}
    ax.set_xscale("log")
    ax.set_xticks(ticks, [f"all ({t})" if t in everything else str(t) for t in ticks], rotation=30, ha="right")
    ax.minorticks_off()
    ax.set_xlabel("top-k features (forest ranking)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"Accuracy vs number of features ({title})" if title else "Accuracy vs number of features")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)


def format_table(rows: list[dict]) -> str:
    """The results as a text table with percentages, for the terminal."""
    lines = [f"{'k':>6} {'classifier':>10} {'features':>8} {'test':>8} {'val':>8} {'fit s':>7}"]
    for row in rows:
        lines.append(f"{row['k']:>6} {row['classifier']:>10} {row['n_features']:>8} "
                     f"{100 * float(row['test_accuracy']):>7.2f}% {100 * float(row['val_accuracy']):>7.2f}% "
                     f"{float(row['fit_seconds']):>7.2f}")
    return "\n".join(lines)
