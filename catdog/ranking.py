"""Reading the forest's feature rankings: the global one and each class's (paths owned by ``RunDir``)."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from catdog.errors import CatdogError
from catdog.run import RunDir

GLOBAL = "global"


def _read_csv(path: Path, columns: set[str], run: RunDir) -> list[dict]:
    if not path.is_file():
        raise CatdogError(f"{path}: no such file; run jobs/forest.py --run {run.path} first")
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = columns - set(reader.fieldnames or [])
        if missing:
            raise CatdogError(f"{path}: missing column(s) {sorted(missing)}; rerun jobs/forest.py --run {run.path}")
        return list(reader)


def read_ranking(run: RunDir, ranking: str, feature_dim: int) -> np.ndarray:
    """Feature indices, most important first: the global ranking, or the per-class ranking of class ``ranking``.

    ``feature_dim`` is the feature store's: a ranking of another number of features is refused.
    """
    if ranking == GLOBAL:
        path = run.ranking_path
        rows = _read_csv(path, {"rank", "feature"}, run)
    else:
        path = run.ranking_per_class_path
        rows = [row for row in _read_csv(path, {"class", "rank", "feature"}, run) if row["class"] == ranking]
        if not rows:
            raise CatdogError(f"{path}: no ranking for class {ranking!r}; use 'global' or one of the classes it lists")
    rows.sort(key=lambda row: int(row["rank"]))
    order = np.array([int(row["feature"]) for row in rows], dtype=np.int64)
    if sorted(order.tolist()) != list(range(feature_dim)):
        raise CatdogError(f"{path}: ranks {len(order)} features, not each of the feature store's {feature_dim} once; "
                          f"rerun jobs/forest.py --run {run.path}")
    return order
