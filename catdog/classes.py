"""Which classes get per-class pictures (Grad-CAM grid, top-activation montages, concepts, the report).

With K classes a picture per class grows the stages and the report with K; ``figures.max_classes`` bounds them to
the classes a reader most needs to see: the ones the run confuses most on its val split.
"""
from __future__ import annotations

import csv
import os
from typing import Optional

from catdog.errors import CatdogError
from catdog.io import open_text
from catdog.run import RunDir


def confusions(run_dir: str | os.PathLike, classes: list[str]) -> Optional[list[int]]:
    """Per class, the val images it takes part in a mistake of (true class missed, or predicted wrongly), streamed
    from the run's ``val_predictions.csv`` (O(K) memory); None when training wrote no such file."""
    path = RunDir(run_dir).val_predictions_path
    if not path.is_file():
        return None
    index = {name: i for i, name in enumerate(classes)}
    counts = [0] * len(classes)
    with open_text(path) as handle:
        for line, row in enumerate(csv.DictReader(handle), start=2):
            try:
                label, predicted = index[row["label"]], index[row["predicted"]]
            except (KeyError, TypeError) as missing:
                raise CatdogError(f"{path}: line {line} names no class of the run ({missing}); "
                                  "retrain the run or delete the file") from None
            if label != predicted:
                counts[label] += 1
                counts[predicted] += 1
    return counts


def classes_shown(run_dir: str | os.PathLike, classes: list[str], max_classes: Optional[int]) -> list[int]:
    """The indices of the classes to draw: every class when ``max_classes`` is None or at least K; else the
    ``max_classes`` most confused on val, most confused first, ties by class index (the first ``max_classes`` classes
    when the run has no val predictions)."""
    if max_classes is None or max_classes >= len(classes):
        return list(range(len(classes)))
    counts = confusions(run_dir, classes)
    if counts is None:
        return list(range(max_classes))
    return sorted(range(len(classes)), key=lambda c: (-counts[c], c))[:max_classes]
