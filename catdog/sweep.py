"""The top-k feature sweep: refit classifiers on the k features the forest ranks highest, as a Ray Tune experiment.

A cell is one (k, classifier, hyperparameters) combination. ``fit_cell`` is the pure core. ``run_sweep`` is the
job: a Tune ``Tuner`` with one ``grid_search`` over the cells still missing from ``RUN/sweep/results.csv``, one
trial per cell, Tune's experiment directory in ``RUN/sweep/tune/grid``. Each finished trial is appended to
results.csv (rewritten atomically, with the node that ran it); a rerun after a kill resumes the experiment with
``Tuner.restore`` (finished trials are not run again), and ``RUN/sweep/accuracy_vs_k.png`` is drawn last.

Hyperparameters come from the config: a classifier parameter given as ``{grid_search: [v1, v2, ...]}`` (Tune's
own spelling) becomes an axis of the grid, e.g. ``lr: {estimator: LogisticRegression, params: {C: {grid_search:
[0.1, 1.0]}}}``; results.csv gets a ``param_<name>`` column per axis. Ray workers import this module to run a
trial, so it imports nothing heavy (no torch; Ray Tune, which the trials run in anyway).

What the trials get (``load_split_data``), bounded whatever the number of images: each split's stratified sample
(``sweep.max_train_rows`` train rows, ``sweep.max_eval_rows`` test and val rows; ``sample_rows``) with only the
columns of the largest k, in ranking order, read shard by shard as one float32 array per split in Fortran order,
and put into Ray's object store once (``tune.with_parameters``: each node fetches it once, every trial on it maps
it from shared memory). A trial fits on the first k columns, a view: scikit-learn's trees copy nothing (an
estimator that needs float64, such as LogisticRegression, copies its k columns). Test and val are sampled rather
than streamed because a trial may run on a node that cannot read the store, and because the curve compares
accuracies a few tenths of a point apart, which 50,000 rows resolve (a standard error of at most 0.22 points).
results.csv records the sample of each cell (``sample``: empty when every row was used).

Each trial asks Tune for the CPUs it uses (``trial_cpus``): its classifier's ``n_jobs`` when the params set one,
else an equal share of the cluster's CPUs (``cpu_share``), which the fit gets as joblib's default ``n_jobs`` and
as its BLAS thread limit, so a node's cores are busy even when there are fewer cells than CPUs.
"""
from __future__ import annotations

import csv
import functools
import itertools
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Union

import numpy as np
import ray
from joblib import parallel_config
from ray import tune
from ray.exceptions import RayTaskError
from sklearn.base import ClassifierMixin, clone
from sklearn.metrics import accuracy_score
from sklearn.utils import all_estimators
from threadpoolctl import threadpool_limits

from catdog.cluster import node_id, node_name, ray_session, resolve_address
from catdog.config import SPLITS, ClassifierSpec, Config, SweepConfig, save_config
from catdog.errors import CatdogError
from catdog.forest import read_rows, stratified_readable_rows
from catdog.io import atomic_path, write_json
from catdog.progress import progress_bar
from catdog.ranking import read_ranking
from catdog.run import RunDir
from catdog.store import FeatureStore

log = logging.getLogger(__name__)

RESULT_COLUMNS = ("k", "classifier", "n_features", "test_accuracy", "val_accuracy", "fit_seconds",
                  "estimator", "params", "ranking")
"""The columns every results.csv has (older files have only these)."""
SAMPLE_COLUMN = "sample"
"""The rows a cell used, e.g. ``train 50000/200000 test 25000/25000 val 25000/25000 seed 0``; empty when it used
every row of every split (as in older files, which lack the column). Part of a cell's key."""
RUN_COLUMNS = ("node", "node_id", "trial_id")
"""Where each cell ran: the node's IP address and Ray node id, and its Tune trial."""
EXPERIMENT = "grid"
"""Tune's experiment name: its directory is ``RUN/sweep/tune/grid``."""
SplitData = dict[str, tuple[np.ndarray, np.ndarray]]
"""``{"train": (X, y), "test": (X, y), "val": (X, y)}``: each split's sampled rows, X of shape (rows, K) float32
in Fortran order, column j the feature ranked j-th (the sweep's largest k: K)."""


class SweepFailed(RuntimeError):
    """Some cells failed even after their retries (worker or node deaths); a rerun resumes the experiment."""


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


def _columns(x: np.ndarray, columns: range | np.ndarray) -> np.ndarray:
    """``x``'s ``columns``: a view for a range of step 1, a copy for column indices."""
    if isinstance(columns, range) and columns.step == 1:
        return x[:, columns.start:columns.stop]
    return x[:, columns]


def fit_cell(data: SplitData, columns: range | np.ndarray, estimator: ClassifierMixin) -> dict:
    """Fit a clone of ``estimator`` on the train rows' ``columns`` (trials pass ``range(k)``: the first k, without
    a copy; or column indices); score it on test and val."""
    model = clone(estimator)
    x_train, y_train = data["train"]
    start = time.perf_counter()
    model.fit(_columns(x_train, columns), y_train)
    fit_seconds = time.perf_counter() - start
    scores = {f"{split}_accuracy": float(accuracy_score(y, model.predict(_columns(x, columns))))
              for split, (x, y) in data.items() if split != "train"}
    return {**scores, "fit_seconds": fit_seconds}


@dataclass(frozen=True)
class Cell:
    """One point of the grid; ``k`` as configured (an int or ``"all"``), ``spec`` with concrete parameters,
    ``sample`` the rows it uses (``SAMPLE_COLUMN``), ``hyper`` the values this cell takes on the grid's
    hyperparameter axes (empty without axes)."""

    k: Union[int, str]
    classifier: str
    spec: ClassifierSpec
    n_features: int
    ranking: str
    sample: str
    hyper: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def key(self) -> tuple[str, ...]:
        """What identifies a finished cell in results.csv (a changed parameter or sample means a new cell)."""
        return (str(self.k), self.classifier, self.spec.estimator, _params_text(self.spec.params), self.ranking,
                self.sample)

    def as_config(self) -> dict:
        """The cell as a Tune trial's config (plain values, shown in Tune's tables and result.json)."""
        return {"k": self.k, "classifier": self.classifier, "estimator": self.spec.estimator,
                "params": dict(self.spec.params), "n_features": self.n_features, "ranking": self.ranking,
                "sample": self.sample, "hyper": dict(self.hyper)}


def _params_text(params: dict) -> str:
    return json.dumps(params, sort_keys=True)


def _is_axis(value) -> bool:
    return isinstance(value, dict) and set(value) == {"grid_search"} and isinstance(value["grid_search"], list)


def expand_spec(name: str, spec: ClassifierSpec) -> list[tuple[ClassifierSpec, dict]]:
    """A classifier's concrete parameter sets: the product of its ``{grid_search: [...]}`` parameters, in order."""
    axes = {key: value["grid_search"] for key, value in spec.params.items() if _is_axis(value)}
    if not axes:
        return [(spec, {})]
    out = []
    for combo in itertools.product(*axes.values()):
        hyper = dict(zip(axes, combo))
        out.append((ClassifierSpec(estimator=spec.estimator, params={**spec.params, **hyper}), hyper))
    return out


def sweep_cells(cfg: SweepConfig, feature_dim: int, sample: str = "") -> list[Cell]:
    """The grid: classifier by classifier, each hyperparameter set with every k in the order listed; k is capped
    at the feature count. ``sample``: the rows every cell uses (``describe_sample``; empty: all of them)."""
    for k in cfg.ks:
        if k != "all" and k > feature_dim:
            log.warning("sweep.ks: k=%s exceeds the store's %d features; that cell uses all of them", k, feature_dim)
    return [Cell(k, name, concrete, feature_dim if k == "all" else min(k, feature_dim), cfg.ranking, sample, hyper)
            for name, spec in cfg.classifiers.items() for concrete, hyper in expand_spec(name, spec)
            for k in cfg.ks]


def hyper_columns(cells_or_rows) -> list[str]:
    """``param_<name>`` for every hyperparameter axis, in first-seen order."""
    names: dict[str, None] = {}
    for item in cells_or_rows:
        if isinstance(item, Cell):
            names.update(dict.fromkeys(f"param_{key}" for key in item.hyper))
        else:
            names.update(dict.fromkeys(key for key in item if key.startswith("param_")))
    return list(names)


def cpu_share(cells: int, total_cpus: int, node_cpus: int) -> int:
    """The CPUs of a trial whose classifier leaves ``n_jobs`` unset: the cluster's CPUs spread over the cells,
    rounded up (no CPU idle while every cell waits to run), at most a node's (a trial runs on one node)."""
    return max(1, min(node_cpus, math.ceil(total_cpus / max(1, cells))))


def trial_cpus(spec: ClassifierSpec, share: int, node_cpus: int) -> int:
    """The CPUs a cell's trial asks for: its classifier's ``n_jobs`` where the params set it (a negative one: a whole
    node), at most ``node_cpus``; else ``share``, which the fit gets as joblib's default ``n_jobs``."""
    n_jobs = spec.params.get("n_jobs")
    if not isinstance(n_jobs, int) or isinstance(n_jobs, bool):
        return share
    return max(1, min(n_jobs if n_jobs > 0 else node_cpus, node_cpus))


def _trial_resources(config: dict) -> tune.PlacementGroupFactory:
    """What Tune reserves for a trial: the CPUs its config says it uses (``trial_cpus``)."""
    return tune.PlacementGroupFactory([{"CPU": config["cell"]["cpus"]}])


def _config_key(config: dict) -> tuple[str, ...]:
    c = config["cell"]
    return (str(c["k"]), c["classifier"], c["estimator"], _params_text(c["params"]), c["ranking"], c["sample"])


def _cell_trial(config: dict, data: SplitData, estimators: dict, fit: Callable = fit_cell,
                skip: frozenset = frozenset()) -> None:
    """A Tune trial: fit one cell on the first ``n_features`` columns of ``data`` (ranking order), with the CPUs
    it asked for as joblib's default ``n_jobs`` and the BLAS thread limit; report its scores and the node that
    ran it (once). The estimators come built from the driver (by cell key), so a worker never resolves class
    names (scikit-learn's ``all_estimators`` imports every module: seconds per trial). A cell in ``skip``
    (already in results.csv when a restored experiment still lists it as unfinished) reports at once, without
    a fit."""
    cell, key = config["cell"], _config_key(config)
    if key in skip:
        tune.report({"done": True, "skipped": True})
        return
    try:
        with parallel_config(n_jobs=cell["cpus"]), threadpool_limits(cell["cpus"]):
            result = fit(data, range(cell["n_features"]), estimators[key])
    except (ValueError, CatdogError) as exc:  # the data or parameters: a retry would only repeat it
        tune.report({"user_error": f"{type(exc).__name__}: {exc}", "done": False})
        return
    tune.report({**result, "node": node_name(), "node_id": node_id(), "done": True})


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
    columns = [*RESULT_COLUMNS, SAMPLE_COLUMN, *hyper_columns(rows), *RUN_COLUMNS]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore", restval="")
        writer.writeheader()
        writer.writerows(rows)


def result_row(cell: Cell, result: dict) -> dict:
    return {"k": str(cell.k), "classifier": cell.classifier, "n_features": cell.n_features,
            "estimator": cell.spec.estimator, "params": _params_text(cell.spec.params), "ranking": cell.ranking,
            SAMPLE_COLUMN: cell.sample, **{f"param_{key}": value for key, value in cell.hyper.items()},
            **{key: result[key] for key in ("test_accuracy", "val_accuracy", "fit_seconds")},
            **{key: result.get(key, "") for key in RUN_COLUMNS}}


def _row_key(row: dict) -> tuple[str, ...]:
    return (row["k"], row["classifier"], row["estimator"], row["params"], row["ranking"], row.get(SAMPLE_COLUMN, ""))


def sample_rows(store: FeatureStore, cfg: SweepConfig) -> dict[str, np.ndarray]:
    """Each split's row ids the cells use: a stratified sample of at most ``max_train_rows`` train rows and
    ``max_eval_rows`` test and val rows (all readable rows where they fit: ``stratified_readable_rows``), in shard
    order."""
    return {split: stratified_readable_rows(store, split, cfg.max_train_rows if split == "train"
                                            else cfg.max_eval_rows, cfg.seed) for split in SPLITS}


def describe_sample(rows: dict[str, np.ndarray], store: FeatureStore, seed: int) -> str:
    """The sample as results.csv records it (``SAMPLE_COLUMN``): empty when it is every row of every split."""
    if all(len(ids) == store.num_rows(split) for split, ids in rows.items()):
        return ""
    return " ".join(f"{split} {len(ids)}/{store.num_rows(split)}" for split, ids in rows.items()) + f" seed {seed}"


def load_split_data(store: FeatureStore, rows: dict[str, np.ndarray], columns: np.ndarray) -> SplitData:
    """Each split's sampled ``rows`` with only ``columns``, in that order (the ranking's first K)."""
    return {split: read_rows(store, split, ids, columns) for split, ids in rows.items()}


def _cell_of(config: dict, cells: dict[tuple, Cell]) -> Cell | None:
    return cells.get(_config_key(config))


def _trial_name(trial) -> str:
    c = trial.config["cell"]
    hyper = "".join(f"_{key}={value}" for key, value in c["hyper"].items())
    return f"{c['classifier']}_k={c['k']}{hyper}_{trial.trial_id}"


class _Recorder(tune.Callback):
    """Records each trial in results.csv as it finishes (on the driver). Tune pickles its run config into the
    experiment: the pickled copy is inert, the live one is this process's."""

    def __init__(self, cells: dict[tuple, Cell], finished: dict, save: Callable[[], None], bar):
        self.cells, self.finished, self.save, self.bar = cells, finished, save, bar

    def __getstate__(self):
        return {"cells": {}, "finished": {}, "save": None, "bar": None}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        cell = _cell_of(trial.config, self.cells)
        if cell is None or self.save is None or not result.get("done") or result.get("skipped"):
            return
        self.finished[cell.key] = result_row(cell, {**result, "trial_id": trial.trial_id})
        self.save()
        self.bar.update()


def _failure(error: BaseException, config: dict) -> BaseException:
    """A trial's error as the job reports it: a ValueError from the fit (bad data or parameters) is the user's,
    a one-line CatdogError naming the cell; anything else (a worker that kept dying) is returned as it is."""
    seen, cause = set(), error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, (ValueError, CatdogError)):
            c = config["cell"]
            return CatdogError(f"sweep cell k={c['k']} {c['classifier']} ({c['estimator']}, params {c['params']}): "
                               f"{cause}")
        cause = getattr(cause, "cause", None) if isinstance(cause, RayTaskError) else cause.__cause__
    return error


def run_tune(run: RunDir, data: SplitData, todo: list[Cell], all_cells: list[Cell],
             max_retries: int, finished: dict, save: Callable[[], None],
             fit: Callable[[SplitData, range, ClassifierMixin], dict] = fit_cell) -> list[str]:
    """Run the ``todo`` cells as the Tune experiment ``RUN/sweep/tune/grid`` (needs a Ray session), restoring
    it when a run of the same cells was interrupted. ``data``: at least the largest k of ``todo`` columns, in
    ranking order. Each result lands in ``finished`` (then ``save()``). Returns the cells fitted by this call,
    as ``"<classifier and hyperparameters> k=<k> (<trial id>)"``."""
    tune_dir = run.sweep_tune_dir
    experiment = tune_dir / EXPERIMENT
    cells_file = tune_dir / "cells.json"
    by_key = {cell.key: cell for cell in all_cells}
    skip = frozenset(key for key in finished if key in by_key)
    estimators = {cell.key: build_estimator(cell.spec) for cell in all_cells}
    trainable = tune.with_resources(tune.with_parameters(_cell_trial, data=data, estimators=estimators, fit=fit,
                                                         skip=skip), _trial_resources)
    # the experiment's state is saved at most a second behind, so a killed run resumes where it was
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    run_config = tune.RunConfig(
        name=EXPERIMENT, storage_path=str(tune_dir.resolve()), verbose=0,
        failure_config=tune.FailureConfig(max_failures=max_retries), callbacks=[])

    planned = None
    if cells_file.is_file() and tune.Tuner.can_restore(experiment):
        planned = {tuple(key) for key in json.loads(cells_file.read_text())}
    todo_keys = {cell.key for cell in todo}
    with progress_bar(total=len(todo), desc="sweep cells", unit="cell") as bar:
        run_config.callbacks = [_Recorder(by_key, finished, save, bar)]
        if planned is not None and todo_keys <= planned <= set(by_key):
            log.info("sweep: resuming the Tune experiment in %s (%d of its %d trials still to run)", experiment,
                     len(todo_keys), len(planned))
            tuner = tune.Tuner.restore(str(experiment.resolve()), trainable=trainable, resume_unfinished=True,
                                       resume_errored=True, restart_errored=True)
            # restore brings back the run config it pickled (our callback inert in it): give it this process's.
            # Tuner.restore has no public way to pass callbacks; without them (Ray Client mode) the rows are
            # still written from the results once the experiment finishes.
            internal = getattr(tuner, "_local_tuner", None)
            if internal is not None:
                internal._run_config.callbacks = run_config.callbacks
        else:
            if experiment.exists():
                log.info("sweep: %s holds another grid; starting a new experiment", experiment)
                shutil.rmtree(experiment)
            tune_dir.mkdir(parents=True, exist_ok=True)
            write_json(cells_file, [list(cell.key) for cell in todo])
            ordered = sorted(todo, key=lambda cell: -cell.n_features)  # the longest fits first
            node_cpus = [int(node["Resources"].get("CPU", 0)) for node in ray.nodes() if node["Alive"]]
            share = cpu_share(len(todo), sum(node_cpus), max(node_cpus))
            cpus = {cell.key: trial_cpus(cell.spec, share, max(1, *node_cpus)) for cell in todo}
            log.info("sweep: %d trial(s) on %d CPU(s): %s CPU(s) each", len(todo), sum(node_cpus),
                     ", ".join(sorted({str(n) for n in cpus.values()}, key=int)))
            # on a cluster, a fresh actor per trial: concurrent trials are placed over the nodes (reused actors
            # keep taking the next trial on whichever node finished first); on one node, reuse saves start-ups
            reuse = len(node_cpus) == 1
            tuner = tune.Tuner(trainable, param_space={"cell": tune.grid_search(
                                   [{**c.as_config(), "cpus": cpus[c.key]} for c in ordered])},
                               tune_config=tune.TuneConfig(reuse_actors=reuse, trial_dirname_creator=_trial_name,
                                                           trial_name_creator=_trial_name),
                               run_config=run_config)
        before = set(finished)
        results = tuner.fit()
    ran, recovered, errors = [], set(), []
    for result in results:
        cell = _cell_of(result.config, by_key)
        if result.error is not None:
            errors.append(_failure(result.error, result.config))
        elif result.metrics.get("user_error"):
            c = result.config["cell"]
            errors.append(CatdogError(f"sweep cell k={c['k']} {c['classifier']} ({c['estimator']}, params "
                                      f"{c['params']}): {result.metrics['user_error']}"))
        elif cell is not None and result.metrics.get("done") and not result.metrics.get("skipped"):
            if cell.key not in finished:  # finished in an earlier, interrupted run: recorded by Tune only
                finished[cell.key] = result_row(cell, {**result.metrics, "trial_id": result.metrics["trial_id"]})
                recovered.add(cell.key)
        if cell is not None and cell.key in finished and cell.key not in before | recovered:
            ran.append(f"{_line_name(finished[cell.key])} k={cell.k} ({finished[cell.key]['trial_id']})")
    save()
    for error in errors:
        if isinstance(error, CatdogError):
            raise error
    if errors:
        raise SweepFailed(f"sweep: {len(errors)} cell(s) failed after {max_retries} retries (first: "
                          f"{' '.join(str(errors[0]).split())[:300]}); rerun jobs/sweep.py to resume the "
                          "experiment") from errors[0]
    return ran


def run_sweep(run_dir: str | os.PathLike, config: Config, address: str | None = None, verify: bool = False,
              fit: Callable[[SplitData, range, ClassifierMixin], dict] = fit_cell) -> list[dict]:
    """The sweep job: compute the cells missing from ``RUN/sweep/results.csv`` as a Tune experiment, then plot.

    Returns the rows of the grid in grid order. Rows of results.csv that belong to no cell of the current
    config (another k list, changed parameters, another sample) are dropped from the file.
    """
    cfg, run = config.sweep, RunDir(run_dir)
    store = FeatureStore(run.features_dir, verify=verify)
    order = read_ranking(run, cfg.ranking, store.feature_dim)
    sample = sample_rows(store, cfg)
    cells = sweep_cells(cfg, store.feature_dim, describe_sample(sample, store, cfg.seed))
    for cell in cells:
        build_estimator(cell.spec)  # a misspelt name fails here, before results.csv is touched
    results_path = run.sweep_results
    done = {_row_key(row): row for row in read_results(results_path)}
    todo = [cell for cell in cells if cell.key not in done]
    if todo and not ray.is_initialized():
        address = resolve_address(address)  # a bad address fails here, before anything is written
    save_config(config, run.sweep_dir / "config.yaml")

    finished = {cell.key: done[cell.key] for cell in cells if cell.key in done}
    log.info("sweep: %d cell(s), %d already in %s, %d to compute", len(cells), len(finished), results_path, len(todo))

    def save() -> None:
        write_results(results_path, [finished[cell.key] for cell in cells if cell.key in finished])

    save()
    if todo:
        data = load_split_data(store, sample, order[:max(cell.n_features for cell in todo)])
        log.info("sweep: %s rows x the first %d ranked features", "/".join(str(len(y)) for _, y in data.values()),
                 data["train"][0].shape[1])
        with ray_session(address):
            ran = run_tune(run, data, todo, cells, cfg.max_retries, finished, save, fit)
        log.info("sweep: trials fitted by this run: %d: %s", len(ran), "; ".join(ran))
    rows = read_results(results_path)
    plot_accuracy(rows, run.sweep_plot, title=f"ranking: {cfg.ranking}")  # last: marks the stage complete
    return rows


def node_counts(rows: list[dict]) -> dict[str, int]:
    """How many cells each node ran (``""`` for rows from before nodes were recorded)."""
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.get("node", "")] = counts.get(row.get("node", ""), 0) + 1
    return counts


def _line_name(row: dict) -> str:
    """A plot line / table label: the classifier and its hyperparameter values, e.g. ``lr C=0.1``."""
    hyper = " ".join(f"{key[len('param_'):]}={value}" for key, value in row.items()
                     if key.startswith("param_") and value not in ("", None))
    return f"{row['classifier']} {hyper}".strip()


def plot_accuracy(rows: list[dict], path: Path, title: str = "") -> None:
    """Test (solid) and val (dashed) accuracy against the number of features, log scale, a line per classifier
    (and hyperparameter set)."""
    from matplotlib.figure import Figure  # here: trial workers import this module and never plot

    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    lines = list(dict.fromkeys(_line_name(row) for row in rows))
    for i, name in enumerate(lines):
        mine = sorted((row for row in rows if _line_name(row) == name), key=lambda row: int(row["n_features"]))
        x = [int(row["n_features"]) for row in mine]
        colour = f"C{i % 10}"
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
    ax.legend(fontsize=7 if len(lines) > 3 else None)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)


def format_table(rows: list[dict]) -> str:
    """The results as a text table with percentages and the node that ran each cell, for the terminal."""
    width = max([10, *(len(_line_name(row)) for row in rows)])
    lines = [f"{'k':>6} {'classifier':>{width}} {'features':>8} {'test':>8} {'val':>8} {'fit s':>7}  node"]
    for row in rows:
        lines.append(f"{row['k']:>6} {_line_name(row):>{width}} {row['n_features']:>8} "
                     f"{100 * float(row['test_accuracy']):>7.2f}% {100 * float(row['val_accuracy']):>7.2f}% "
                     f"{float(row['fit_seconds']):>7.2f}  {row.get('node', '')}")
    counts = node_counts(rows)
    lines.append("cells per node: " + ", ".join(f"{node or '?'} {n}" for node, n in sorted(counts.items())))
    return "\n".join(lines)
