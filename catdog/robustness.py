"""Robustness (``jobs/robustness.py``): the fine-tuned model and the linear probe, clean and under corruptions.

Off its training distribution, a fine-tuned network must not fall below the linear probe (the pretrained
backbone, frozen, with a fitted linear head: ``catdog.probe``). Both score the same labelled split, clean and under
five ImageNet-C-style corruptions at one fixed severity (Hendrycks & Dietterich, ICLR 2019, severity 3), each made
by ``torchvision.transforms.v2.functional`` on the resized image before normalisation:

=================  ==========================================  ===============================================
corruption         here                                        ImageNet-C, severity 3 (224 px)
=================  ==========================================  ===============================================
gaussian_noise     ``gaussian_noise``, sigma 0.18, clipped      N(0, 0.18) added on [0, 1], clipped
gaussian_blur      ``gaussian_blur``, sigma 3 px at 224 px     ``skimage.filters.gaussian``, sigma 3 px
                   (scaled with the image size)
jpeg               ``jpeg``, quality 15                        JPEG quality 15
brightness         ``adjust_brightness``, factor 1.6           V + 0.3 in HSV (a mid-grey 0.5 -> 0.8: x1.6)
contrast           ``adjust_contrast``, factor 0.2             (x - mean) * 0.2 + mean
=================  ==========================================  ===============================================

The noise of each image is drawn from its own seed (``seed`` + its index in the split), so it is the same whatever
the batch size, the number of loader workers or the device.

Every image is decoded and resized once (in DataLoader workers, as ``catdog.predict`` does: the same listing,
resize, batch size, channels_last and autocast precision as the run's own evaluation), and each corruption is
applied to the decoded uint8 batch: six forward passes per image and model. The clean accuracy of the fine-tuned
model is therefore what ``jobs/predict.py --labelled DATA/SPLIT`` reports (on the run's val split, summary.json's
``val_accuracy``).
"""
from __future__ import annotations

import math
import os
import time
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from catdog import models
from catdog.config import Config, save_config
from catdog.data import IMAGE_SUFFIXES, decode_steps, limit_image_pixels, loader_options, warn_skipped
from catdog.devices import accelerator_for, autocast
from catdog.errors import CatdogError
from catdog.io import write_json
from catdog.predict import _collate, _Images, classification_metrics, list_labelled, resolve_precision
from catdog.progress import progress_bar
from catdog.run import RunDir

SEVERITY = 3
"""ImageNet-C's severity (1..5) whose parameters the corruptions follow."""
SEED = 0
"""Gaussian noise: image ``i`` of the split gets the noise of ``torch.manual_seed(SEED + i)``."""
REFERENCE_SIZE = 224
"""ImageNet-C's image size: the blur's sigma, in pixels, is scaled from it to the run's image size."""
NOISE_SIGMA = 0.18
BLUR_SIGMA = 3.0
JPEG_QUALITY = 15
BRIGHTNESS_FACTOR = 1.6
CONTRAST_FACTOR = 0.2

CLEAN = "clean"
MODELS = ("fine_tuned", "linear_probe")


def corruption_parameters(image_size: int) -> dict[str, dict]:
    """Each corruption's torchvision function and its arguments at ``image_size`` (what summary.json records)."""
    sigma = BLUR_SIGMA * image_size / REFERENCE_SIZE
    return {
        "gaussian_noise": {"function": "gaussian_noise", "mean": 0.0, "sigma": NOISE_SIGMA, "clip": True, "seed": SEED,
                           "imagenet_c": f"N(0, {NOISE_SIGMA}) added on [0, 1], clipped"},
        "gaussian_blur": {"function": "gaussian_blur", "sigma": round(sigma, 4),
                          "kernel_size": 2 * math.ceil(3 * sigma) + 1,
                          "imagenet_c": f"Gaussian blur, sigma {BLUR_SIGMA:g} px at {REFERENCE_SIZE} px (scaled to "
                                        f"{image_size} px here)"},
        "jpeg": {"function": "jpeg", "quality": JPEG_QUALITY, "imagenet_c": f"JPEG quality {JPEG_QUALITY}"},
        "brightness": {"function": "adjust_brightness", "brightness_factor": BRIGHTNESS_FACTOR,
                       "imagenet_c": "V + 0.3 in HSV (a mid-grey 0.5 becomes 0.8)"},
        "contrast": {"function": "adjust_contrast", "contrast_factor": CONTRAST_FACTOR,
                     "imagenet_c": f"(x - mean) * {CONTRAST_FACTOR} + mean"},
    }


def corrupt(name: str, images: torch.Tensor, indices: Sequence[int], parameters: dict[str, dict]) -> torch.Tensor:
    """The uint8 batch ``images`` (B, 3, H, W) under corruption ``name`` (or ``clean``), as floats in [0, 1].

    ``indices`` are the images' places in the split: each image's noise comes from its own seed."""
    if images.dtype != torch.uint8:
        raise TypeError(f"corrupt: expected a uint8 batch, got {images.dtype}")
    if name == "jpeg":
        with warnings.catch_warnings():  # torchvision 0.29 deprecates its own JPEG codec, which F.jpeg calls
            warnings.filterwarnings("ignore", "The image decoding and encoding capabilities of TorchVision",
                                    DeprecationWarning)
            compressed = F.jpeg(images, quality=parameters[name]["quality"])
        return F.to_dtype(compressed, torch.float32, scale=True)
    x = F.to_dtype(images, torch.float32, scale=True)  # as build_transform does: the clean batch is the eval's exactly
    if name == CLEAN:
        return x
    p = parameters[name]
    if name == "gaussian_noise":
        noisy = torch.empty_like(x)
        for row, index in enumerate(indices):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(p["seed"] + int(index))
                noisy[row] = F.gaussian_noise(x[row], mean=p["mean"], sigma=p["sigma"], clip=p["clip"])
        return noisy
    if name == "gaussian_blur":
        return F.gaussian_blur(x, kernel_size=[p["kernel_size"]] * 2, sigma=[p["sigma"]] * 2)
    if name == "brightness":
        return F.adjust_brightness(x, p["brightness_factor"])
    if name == "contrast":
        return F.adjust_contrast(x, p["contrast_factor"])
    raise ValueError(f"unknown corruption {name!r}; one of {CLEAN}, {', '.join(parameters)}")


def decode_transform(data) -> v2.Compose:
    """The run's eval transform up to its uint8 tensor (``catdog.data.decode_steps``); the scaling to [0, 1] and
    the normalisation are done per batch after the corruption."""
    return v2.Compose(decode_steps(data))


def labelled_split(data_root: str | os.PathLike, split: str, classes: list[str]) -> list:
    """The images of ``DATA/SPLIT/<class>/`` (listed as ``catdog.predict.list_labelled`` lists them), checked to hold
    exactly the run's classes; anything else is a one-line error."""
    root = Path(data_root)
    if not root.is_dir():
        raise CatdogError(f"--data {root}: no such folder (expected DATA/<split>/<class>/<image>)")
    folder = root / split
    if not folder.is_dir():
        splits = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        raise CatdogError(f"--split {split}: no folder {folder} (the data root has {splits or 'no folders'}); give "
                          f"a split holding one folder per class of the run: {classes}")
    found = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if found != sorted(classes):
        raise CatdogError(f"--data {root} --split {split}: class folders {found} differ from the run's classes "
                          f"{classes}; the split must hold one folder per class of the run")
    items = list_labelled(folder, classes)
    if not items:
        raise CatdogError(f"--data {root} --split {split}: no files with an image suffix "
                          f"({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}/<class>/")
    return items


def _scores(labels: np.ndarray, predicted: dict[str, np.ndarray], classes: list[str]) -> dict:
    """Accuracy (and correct count) of each model present, and fine-tuned minus linear probe."""
    scores = {}
    for model in MODELS:
        if model in predicted:
            metrics = classification_metrics(labels, predicted[model], classes)
            scores[model], scores[f"{model}_correct"] = metrics["accuracy"], metrics["correct"]
        else:
            scores[model], scores[f"{model}_correct"] = None, None
    scores["difference"] = (None if scores["linear_probe"] is None
                            else scores["fine_tuned"] - scores["linear_probe"])
    return scores


def _mean(results: dict[str, dict], names: list[str]) -> dict:
    mean = {}
    for key in (*MODELS, "difference"):
        values = [results[name][key] for name in names]
        mean[key] = None if any(v is None for v in values) else float(np.mean(values))
    return mean


def robustness(config: Config, run_path: str | os.PathLike, data_root: str | os.PathLike,
               split: str = "val") -> dict:
    """Score the run's fine-tuned model and its linear probe on ``DATA/SPLIT``, clean and under each corruption;
    write ``RUN/robustness/config.yaml`` and, last and atomically, ``summary.json``; return the summary.

    Everything a user can get wrong is checked before any image is read, and nothing is written on an error."""
    start = time.perf_counter()
    run = RunDir(run_path)
    if not run.path.is_dir():
        raise CatdogError(f"--run {run.path}: no such directory (give a run directory written by jobs/train.py)")
    summary, model_name = run.summary(), run.config().model.name
    classes = summary["classes"]
    items = labelled_split(data_root, split, classes)
    precision = resolve_precision("run", summary)  # the run's evaluation precision: clean == jobs/predict.py
    data = models.data_config(model_name, config.data)
    limit_image_pixels(data)
    transform = decode_transform(data)

    networks = {"fine_tuned": run.load_model()[0]}
    if run.linear_probe_path.is_file():
        from catdog.probe import load_probe_network

        networks["linear_probe"] = load_probe_network(run)
        note = None
    else:
        note = (f"{run.linear_probe_path} is missing (trained with train.linear_probe=false, or before the probe "
                "existed): scoring the fine-tuned model alone")
        print(f"robustness: {note}")

    accelerator, precision = accelerator_for(precision, config.train.cpu, config.train.cpu_threads)
    device = accelerator.device
    channels_last = config.train.channels_last
    for name, network in networks.items():
        network = network.to(device)
        networks[name] = network.to(memory_format=torch.channels_last) if channels_last else network

    parameters = corruption_parameters(data.image_size)
    variants = [CLEAN, *parameters]
    predicted = {model: {name: np.full(len(items), -1, dtype=int) for name in variants} for model in networks}
    failed: dict[int, str] = {}
    loader = DataLoader(_Images(items, transform, data.image_size, None), data.eval_batch_size, collate_fn=_collate,
                        **loader_options(data.num_workers, device, persistent=False))
    print(f"robustness: {len(items)} image(s) of {Path(data_root) / split}, {len(variants)} variant(s) x "
          f"{len(networks)} model(s) on {device} (autocast {precision})")
    with progress_bar(total=len(items), desc="robustness", unit="img") as bar:
        for indices, images, _, bad in loader:
            failed.update(bad)
            if indices:
                for name in variants:
                    batch = F.normalize(corrupt(name, images, indices, parameters).to(device, non_blocking=True),
                                        data.mean, data.std)
                    if channels_last:
                        batch = batch.contiguous(memory_format=torch.channels_last)
                    for model, network in networks.items():
                        with torch.inference_mode(), autocast(device.type, precision):
                            logits = network(batch).float()
                        predicted[model][name][indices] = logits.argmax(dim=1).cpu().numpy()
            bar.update(len(indices) + len(bad))

    kept = [i for i in range(len(items)) if i not in failed]
    warn_skipped(Path(data_root) / split, [(items[i].path, failed[i]) for i in sorted(failed)])
    if not kept:
        raise CatdogError(f"--data {data_root} --split {split}: no readable images ({len(failed)} could not be "
                          "decoded)")
    labels = np.array([items[i].label for i in kept])
    results = {name: _scores(labels, {model: predicted[model][name][kept] for model in networks}, classes)
               for name in variants}
    result = {
        "run": str(run.path), "model": model_name, "data": str(data_root), "split": split,
        "classes": classes, "images": len(kept),
        "skipped": [{"path": str(items[i].path), "reason": failed[i]} for i in sorted(failed)],
        "models": list(networks), "linear_probe": "linear_probe" in networks, "note": note,
        "precision": precision, "device": str(device), "image_size": data.image_size,
        "interpolation": data.interpolation, "mean": list(data.mean), "std": list(data.std),
        "severity": SEVERITY, "seed": SEED,
        "corruptions": parameters,
        "applied": "torchvision.transforms.v2.functional, on the resized image in [0, 1] (jpeg: on its uint8 "
                   "pixels) before normalisation",
        "results": results,
        "mean_corrupted": _mean(results, list(parameters)),
        "below_linear_probe": [name for name, r in results.items()
                               if r["difference"] is not None and r["difference"] < 0],
        "seconds": time.perf_counter() - start,
    }
    save_config(config, run.robustness_dir / "config.yaml")
    write_json(run.robustness_summary, result)  # last: the stage's marker
    return result


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def table(summary: dict) -> str:
    """The results as aligned text: a row per variant (and the corruptions' mean), fine-tuned, linear probe and
    their difference in points; rows where the fine-tuned model is below the probe are marked."""
    rows = [("corruption", "fine-tuned", "linear probe", "difference", "")]
    entries = [*summary["results"].items(), ("mean corrupted", summary["mean_corrupted"])]
    for name, r in entries:
        difference = "-" if r["difference"] is None else f"{100 * r['difference']:+.2f}"
        below = r["difference"] is not None and r["difference"] < 0
        rows.append((name, _percent(r["fine_tuned"]), _percent(r["linear_probe"]), difference,
                     "<- below the linear probe" if below else ""))
    widths = [max(len(row[c]) for row in rows) for c in range(4)]
    return "\n".join((row[0].ljust(widths[0]) + "".join("  " + cell.rjust(w) for cell, w
                                                         in zip(row[1:4], widths[1:])) + ("  " + row[4] if row[4] else
                                                                                          "")).rstrip()
                     for row in rows)
