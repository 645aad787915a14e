"""A trained run on new images (``jobs/predict.py``): a prediction per image, or the accuracy on a labelled folder.

Images are decoded in DataLoader workers; a file that cannot be decoded (0 bytes, not an image, truncated beyond
decoding) comes back from its worker as a marker that the collate function drops, so one bad file never stops
the loader: it is listed in ``skipped.csv`` with the reason instead.

Evaluating a labelled folder repeats what ``catdog.train.evaluate`` did: the same listing of a class folder
(``catdog.data.list_samples``: its files with an image suffix, sorted, not recursive), the run's eval transform and
batch size, channels_last when the run trained with it, the mirror-image average when it evaluated with
``train.tta_hflip``, and autocast at the precision the run's ``summary.json``
records (Accelerate evaluates under the training autocast, e.g. bf16 on CPUs with AVX512-BF16). On the run's own
val split the accuracy is therefore the ``val_accuracy`` of ``summary.json``, exactly.
"""
from __future__ import annotations

import csv
import io
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from catdog.data import (IMAGE_SUFFIXES, build_transform, limit_image_pixels, load_rgb, loader_options,
                         unreadable_reason, warn_skipped)
from catdog.devices import autocast, inference_device
from catdog.errors import CatdogError
from catdog.io import printable_path, write_json, write_text
from catdog.progress import progress_bar
from catdog.run import RunDir

log = logging.getLogger(__name__)

PRECISIONS = ("no", "bf16", "fp16")
CAM_METHOD = "gradcam"
PROBABILITY_PREFIX = "p_"
"""Per-class probability columns are ``p_<class>``: a class named ``label`` or ``path`` cannot clash."""


@dataclass(frozen=True)
class InputImage:
    path: Path
    """As the user named it: a file argument, or a folder argument joined with the file's path inside it."""
    name: str
    """The folder argument's name plus the path inside it (or a file's own name): what the CAM file is named after."""
    label: Optional[int] = None
    """Index into the run's classes, for ``--labelled``."""


# ---------------------------------------------------------------------------------------------------- inputs

def _folder_images(folder: Path) -> list[Path]:
    """Image-suffixed files under ``folder``, recursively: each folder's files sorted, then its subfolders sorted.

    ``os.walk`` does not follow symlinked folders, so a link loop cannot make the listing endless.
    """
    found = []
    for current, subfolders, files in os.walk(folder):
        subfolders.sort()
        found += [Path(current, f) for f in sorted(files) if Path(f).suffix.lower() in IMAGE_SUFFIXES]
    return found


def list_inputs(paths: Sequence[str | os.PathLike]) -> list[InputImage]:
    """The images named by ``paths`` in the order given; a file given by name is tried whatever its suffix.

    A path that does not exist is an error (before anything runs); a file reached twice counts once, at its first
    place, so the CSV has one row per file.
    """
    missing = [str(p) for p in paths if not Path(p).exists()]
    if missing:
        raise CatdogError(f"{missing[0]}: no such file or folder" + (f" (and {len(missing) - 1} more missing)"
                                                                       if len(missing) > 1 else ""))
    items, seen = [], set()
    for arg in map(Path, paths):
        if arg.is_dir():
            top = arg.resolve().name or "root"
            found = [InputImage(f, f"{top}/{f.relative_to(arg).as_posix()}") for f in _folder_images(arg)]
            if not found:
                log.warning("%s: no files with an image suffix (%s)", arg, ", ".join(sorted(IMAGE_SUFFIXES)))
        else:
            found = [InputImage(arg, arg.name)]
        for item in found:
            key = item.path.resolve()
            if key not in seen:
                seen.add(key)
                items.append(item)
    return items


def list_labelled(root: str | os.PathLike, classes: list[str]) -> list[InputImage]:
    """``ROOT/<class>/<image>`` with labels, listed like ``catdog.data.list_samples`` lists a split (class by class
    in the run's order, each folder's image-suffixed files sorted, not recursive), so that on a run's own split the
    same files count. A subset of the run's classes is fine; a folder the run does not know is an error."""
    root = Path(root)
    if not root.is_dir():
        raise CatdogError(f"--labelled {root}: no such folder (expected ROOT/<class>/<image> with the run's classes "
                          f"{classes}, e.g. DATA/val)")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [name for name in folders if name not in classes]
    if unknown:
        raise CatdogError(f"--labelled {root}: folder {root / unknown[0]} is not one of the run's classes {classes}; "
                          "ROOT must hold one folder per class (e.g. DATA/val, not DATA)")
    if not folders:
        raise CatdogError(f"--labelled {root}: no class folders; expected ROOT/<class>/<image> with the run's "
                          f"classes {classes}")
    top = root.resolve().name or "root"
    items = []
    for label, name in enumerate(classes):
        if name in folders:
            items += [InputImage(path, f"{top}/{name}/{path.name}", label)
                      for path in sorted((root / name).iterdir()) if path.suffix.lower() in IMAGE_SUFFIXES]
    return items


def cam_file_names(items: Sequence[InputImage]) -> list[str]:
    """A PNG name per image from its folder-relative path (``photos/a/cat.jpg`` -> ``photos__a__cat.jpg.png``), so
    two ``cat.jpg`` in different folders do not collide; names still equal (after sanitising) get ``-2``, ``-3``."""
    names, used = [], set()
    for item in items:
        stem = "__".join(re.sub(r"[^A-Za-z0-9._-]+", "_", part) for part in item.name.split("/") if part)
        stem = stem.lstrip(".")[-150:] or "image"  # no hidden files; stay well under 255 bytes
        name, n = f"{stem}.png", 1
        while name in used:
            n += 1
            name = f"{stem}-{n}.png"
        used.add(name)
        names.append(name)
    return names


def resolve_precision(option: str, summary: dict) -> str:
    """``run``: the autocast precision the run evaluated with (summary.json's ``mixed_precision``), else ``option``."""
    precision = summary.get("mixed_precision", "no") if option == "run" else option
    if precision not in PRECISIONS:
        raise CatdogError(f"precision {precision!r}: one of {', '.join(PRECISIONS)} (or 'run')")
    return precision


# ---------------------------------------------------------------------------------------------------- decoding

class _Images(Dataset):
    """``(index, tensor, photo, None)`` per image, or ``(index, None, None, reason)`` when it cannot be decoded."""

    def __init__(self, items: Sequence[InputImage], transform, image_size: int, photo_size: Optional[int]):
        self.items, self.transform, self.image_size, self.photo_size = items, transform, image_size, photo_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        path = self.items[index].path
        try:
            image = load_rgb(path, self.image_size)
            tensor = self.transform(image)
        except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, ...) for bad files
            return index, None, None, unreadable_reason(path, exc)
        photo = None
        if self.photo_size:  # the overlay's background, decoded here in the worker too
            photo = np.asarray(image.resize((self.photo_size, self.photo_size)), dtype=np.uint8)
        return index, tensor, photo, None


def _collate(batch):
    """Stack the decoded images; hand the failures on as ``(index, reason)`` instead of failing the batch."""
    good = [entry for entry in batch if entry[3] is None]
    failed = [(entry[0], entry[3]) for entry in batch if entry[3] is not None]
    images = torch.stack([entry[1] for entry in good]) if good else None
    photos = np.stack([entry[2] for entry in good]) if good and good[0][2] is not None else None
    return [entry[0] for entry in good], images, photos, failed


def _device(name: str | None) -> torch.device:
    """``name`` checked (a typo or an absent GPU is a one-line error), or cuda when available, else the CPU."""
    if name is None:
        return inference_device()
    try:
        device = inference_device(name)
    except RuntimeError:
        raise CatdogError(f"--device {name}: not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise CatdogError(f"--device {name}: no such CUDA device here ({torch.cuda.device_count()} visible); "
                          "use --device cpu")
    return device


# ---------------------------------------------------------------------------------------------------- results

def prediction_rows(items: Sequence[InputImage], probabilities: np.ndarray, predicted: Sequence[int],
                    classes: list[str], labelled: bool = False,
                    cam_files: Optional[Sequence[str]] = None) -> list[dict]:
    """One CSV row per image: ``path, [label,] predicted, probability, p_<class>..., [cam]``."""
    rows = []
    for i, (item, probs, top) in enumerate(zip(items, probabilities, predicted)):
        row = {"path": str(item.path)}
        if labelled:
            row["label"] = classes[item.label]
        row.update(predicted=classes[int(top)], probability=float(probs[int(top)]))
        row.update({PROBABILITY_PREFIX + name: float(p) for name, p in zip(classes, probs)})
        if cam_files is not None:
            row["cam"] = cam_files[i]
        rows.append(row)
    return rows


def csv_columns(classes: list[str], labelled: bool = False, cam: bool = False) -> list[str]:
    return (["path"] + (["label"] if labelled else []) + ["predicted", "probability"]
            + [PROBABILITY_PREFIX + name for name in classes] + (["cam"] if cam else []))


def csv_text(rows: Sequence[dict], columns: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def classification_metrics(labels: Sequence[int], predictions: Sequence[int], classes: list[str]) -> dict:
    """Accuracy (a fraction, computed as ``correct / total`` like training does), per-class accuracy (recall; null
    for a class without images) and the confusion matrix (rows: true class, columns: predicted, the run's order)."""
    labels, predictions = np.asarray(labels, dtype=int), np.asarray(predictions, dtype=int)
    matrix = np.zeros((len(classes), len(classes)), dtype=int)
    np.add.at(matrix, (labels, predictions), 1)
    correct, total = int(np.trace(matrix)), int(matrix.sum())
    per_class = {name: (int(matrix[c, c]) / int(matrix[c].sum()) if matrix[c].sum() else None)
                 for c, name in enumerate(classes)}
    return {
        "accuracy": correct / total if total else None,
        "images": total,
        "correct": correct,
        "per_class_accuracy": per_class,
        "per_class_images": {name: int(matrix[c].sum()) for c, name in enumerate(classes)},
        "confusion_matrix": {"classes": list(classes), "rows": "true class", "columns": "predicted class",
                             "matrix": matrix.tolist()},
    }


def confusion_table(metrics: dict) -> str:
    """The confusion matrix as aligned text, true classes down, predictions across."""
    classes, matrix = metrics["confusion_matrix"]["classes"], metrics["confusion_matrix"]["matrix"]
    corner = "true \\ predicted"
    first = max([len(corner)] + [len(name) for name in classes])
    widths = [max(len(name), *(len(str(row[c])) for row in matrix)) for c, name in enumerate(classes)]
    lines = [corner.ljust(first) + "".join("  " + name.rjust(w) for name, w in zip(classes, widths))]
    for name, row in zip(classes, matrix):
        lines.append(name.ljust(first) + "".join("  " + str(v).rjust(w) for v, w in zip(row, widths)))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- the job

def predict(run_path: str | os.PathLike, out: str | os.PathLike, paths: Sequence[str | os.PathLike] = (),
            labelled: str | os.PathLike | None = None, precision: str = "run", cam: bool = False,
            device: str | None = None, batch_size: int | None = None, workers: int | None = None) -> dict:
    """Predict every image of ``paths`` (or of the labelled folder ``labelled``) with the run's best checkpoint.

    Writes ``OUT/predictions.csv``, ``OUT/skipped.csv``, with ``labelled`` ``OUT/metrics.json``, with ``cam``
    ``OUT/cam/<name>.png``; returns ``{"predictions", "skipped", "metrics", "precision", "device", ...}``.
    """
    out = Path(out)
    if labelled is not None and paths:
        raise CatdogError("give either image PATHs or --labelled ROOT, not both")
    if labelled is None and not paths:
        raise CatdogError("nothing to predict: give image files or folders (PATH ...), or --labelled ROOT")
    run = RunDir(run_path)
    summary, config = run.summary(), run.config()
    classes = summary["classes"]
    precision = resolve_precision(precision, summary)
    limit_image_pixels(config.data)
    items = list_labelled(labelled, classes) if labelled is not None else list_inputs(paths)
    if not items:
        where = f"--labelled {labelled}" if labelled is not None else "the PATHs given"
        raise CatdogError(f"{where}: no files with an image suffix ({', '.join(sorted(IMAGE_SUFFIXES))})")

    device = _device(device)
    network = run.load_model()[0].to(device)
    channels_last = config.train.channels_last  # as training evaluated: the same kernels, the same numbers
    if channels_last:
        network = network.to(memory_format=torch.channels_last)
    cam_files = cam_file_names(items) if cam else None
    if cam:
        from catdog.cam import DISPLAY_SIZE, class_activation_maps, draw_grid  # matplotlib only when asked

    dataset = _Images(items, build_transform(config.data, train=False), config.data.image_size,
                      DISPLAY_SIZE if cam else None)
    workers = config.data.num_workers if workers is None else workers
    loader = DataLoader(dataset, batch_size or config.data.eval_batch_size, collate_fn=_collate,
                        **loader_options(workers, device, persistent=False))
    probabilities = np.zeros((len(items), len(classes)), dtype=np.float32)
    predicted = np.full(len(items), -1, dtype=int)
    failed: dict[int, str] = {}
    with progress_bar(total=len(items), desc="predict", unit="img") as bar:
        for indices, images, photos, bad in loader:
            failed.update(bad)
            if indices:
                images = images.to(device, non_blocking=True)
                with torch.inference_mode():
                    with autocast(device.type, precision):
                        batch = images.contiguous(memory_format=torch.channels_last) if channels_last else images
                        logits = network(batch).float()
                        mirrored = network(batch.flip(-1)).float() if config.train.tta_hflip else None
                    if mirrored is None:
                        probabilities[indices] = logits.softmax(dim=1).cpu().numpy()
                        predicted[indices] = logits.argmax(dim=1).cpu().numpy()  # argmax of the logits, as training
                    else:  # train.tta_hflip: the mean softmax of the image and its mirror image, as training
                        mean = (logits.softmax(dim=1) + mirrored.softmax(dim=1)) / 2
                        probabilities[indices] = mean.cpu().numpy()
                        predicted[indices] = mean.argmax(dim=1).cpu().numpy()
                if cam:
                    targets = torch.from_numpy(predicted[indices])
                    maps = class_activation_maps(network, CAM_METHOD, images, targets)  # in fp32, with gradients
                    for row, (index, heat) in enumerate(zip(indices, maps)):
                        item, top = items[index], int(predicted[index])
                        label = classes[item.label] if item.label is not None else classes[top]
                        draw_grid([photos[row].astype(np.float32) / 255], [printable_path(item.path.name)],
                                  [{"title": "Grad-CAM, predicted class", "maps": heat[None],
                                    "predictions": [{"predicted": classes[top], "label": label,
                                                     "probability": float(probabilities[index, top])}]}],
                                  out / "cam" / cam_files[index])
            bar.update(len(indices) + len(bad))

    kept = [i for i in range(len(items)) if i not in failed]
    skipped = [(str(items[i].path), failed[i]) for i in sorted(failed)]
    warn_skipped(labelled if labelled is not None else "predict", skipped)
    is_labelled = labelled is not None
    rows = prediction_rows([items[i] for i in kept], probabilities[kept], predicted[kept], classes, is_labelled,
                           [f"cam/{cam_files[i]}" for i in kept] if cam else None)
    write_text(out / "skipped.csv", csv_text([{"path": p, "reason": r} for p, r in skipped], ["path", "reason"]))
    write_text(out / "predictions.csv", csv_text(rows, csv_columns(classes, is_labelled, cam)))
    result = {"predictions": out / "predictions.csv", "images": len(rows), "skipped": skipped,
              "skipped_csv": out / "skipped.csv", "precision": precision, "device": str(device), "metrics": None,
              "cam_dir": out / "cam" if cam else None, "classes": classes}
    if is_labelled:
        if not kept:
            raise CatdogError(f"--labelled {labelled}: no readable images ({len(skipped)} skipped, listed in "
                              f"{out / 'skipped.csv'})")
        metrics = classification_metrics([items[i].label for i in kept], predicted[kept], classes)
        metrics = {"run": str(run.path), "data": str(labelled), "precision": precision, "device": str(device),
                   **metrics, "skipped": len(skipped)}
        write_json(out / "metrics.json", metrics)
        result.update(metrics=metrics, metrics_json=out / "metrics.json")
    return result
