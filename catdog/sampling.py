"""The seeded stratified sample every stage that bounds its rows draws (the forest, the sweep, compare's
regressions, the audit's folds, the linear probe): one rule, so a bound means the same thing everywhere."""
from __future__ import annotations

import numpy as np


def stratified_rows(labels: np.ndarray, max_rows: int | None, seed: int) -> np.ndarray:
    """Ascending row ids (shard order) of a seeded stratified sample of at most ``max_rows`` rows; all rows when
    they fit. Each class keeps its share (largest remainders round it) and at least one row, so a bound below the
    number of classes is exceeded by that much. scikit-learn's stratified splitters refuse a class of one row and
    may leave rare classes out: hence this."""
    n = len(labels)
    if max_rows is None or n <= max_rows:
        return np.arange(n)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    exact = counts * (max_rows / n)
    quota = np.floor(exact).astype(np.int64)
    quota[np.argsort(quota - exact, kind="stable")[:max_rows - quota.sum()]] += 1
    quota = np.maximum(quota, 1)
    rng = np.random.default_rng(seed)
    by_class = np.split(np.argsort(inverse, kind="stable"), np.cumsum(counts)[:-1])
    return np.sort(np.concatenate([rng.choice(rows, size, replace=False) for rows, size in zip(by_class, quota)]))
