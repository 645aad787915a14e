"""The linear probe: a logistic regression on the frozen pretrained backbone's pooled features.

It is the baseline fine-tuning has to beat, on the training distribution and off it (``jobs/robustness.py``), and
LP-FT's starting head (``optim.head_init=linear_probe``). It is saved as the classifier's own state dict, so the
probe is a ``Network``: the pretrained backbone with that head.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from accelerate import Accelerator
from safetensors import safe_open
from safetensors.torch import load_file, save as safetensors_bytes
from sklearn.linear_model import LogisticRegression

from catdog import models
from catdog.errors import CatdogError
from catdog.io import write_bytes
from catdog.progress import progress_bar
from catdog.run import RunDir

REGULARISATION = (0.01, 0.1, 1.0, 10.0)
"""Inverse strengths ``C`` tried; the one with the best test accuracy wins (as epochs are chosen on test)."""


@torch.no_grad()
def pooled_features(network: models.Network, loader, accelerator: Accelerator, batch_transform,
                    channels_last: bool, desc: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Every image's pooled features and label in the split's order, on the main process (None on the others).

    Each process keeps its share and sends it once, at the end, to the main process alone (``torch.distributed``'s
    ``gather_object``): no process but the main one ever holds the N x F features, which the probe's fit needs in
    memory (N x F float32: 10 MB for 2,000 images of 1,280 features). Rows come back by their dataset index, the
    padding that evens out the processes' shares dropped."""
    network.eval()
    indices, features, labels = [], [], []
    for images, batch_labels, batch_indices in progress_bar(loader, desc=desc, leave=False,
                                                            disable=not accelerator.is_local_main_process):
        images = batch_transform(images)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with accelerator.autocast():
            pooled = network.features(images).float()
        indices.append(batch_indices.cpu())
        features.append(pooled.cpu())
        labels.append(batch_labels.cpu())
    share = tuple(torch.cat(part).numpy() if part else None for part in (indices, features, labels))
    shares = [share]
    if accelerator.num_processes > 1:
        shares = [None] * accelerator.num_processes if accelerator.is_main_process else None
        torch.distributed.gather_object(share, shares, dst=0)
    if not accelerator.is_main_process:
        return None
    shares = [s for s in shares if s[0] is not None]
    index, pooled, label = (np.concatenate(part) for part in zip(*shares))
    _, first = np.unique(index, return_index=True)  # sorted by index, each image once
    return pooled[first], label[first]


def fit(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray],
        seed: int) -> tuple[dict[str, torch.Tensor], dict]:
    """A logistic regression per ``C`` on the raw features (no standardisation: its weights would be divided by
    each feature's spread, and fine-tuning moves the features); the best on test. Returns its state and scores.
    Run once, by the main process (``catdog.train.linear_probe``); it says so, with the images it was fitted on."""
    print(f"linear probe: fitting on {len(train[1])} train images (process {os.getpid()})")
    candidates = []
    for c in REGULARISATION:
        classifier = LogisticRegression(C=c, max_iter=5000, random_state=seed).fit(*train)
        candidates.append((classifier.score(*test), c, classifier))
    test_accuracy, c, classifier = max(candidates, key=lambda item: (item[0], -item[1]))
    weight, bias = classifier.coef_, classifier.intercept_
    if weight.shape[0] == 1:  # binary: sklearn keeps one row, the logit of class 1
        weight, bias = np.concatenate([-weight / 2, weight / 2]), np.array([-bias[0] / 2, bias[0] / 2])
    state = {"weight": torch.tensor(np.ascontiguousarray(weight), dtype=torch.float32),  # sklearn's may be Fortran-ordered
             "bias": torch.tensor(np.ascontiguousarray(bias), dtype=torch.float32)}
    val_accuracy = float((np.argmax(val[0] @ weight.T + bias, axis=1) == val[1]).mean())
    return state, {"test_accuracy": float(test_accuracy), "val_accuracy": val_accuracy, "C": c}


def save(run: RunDir, state: dict[str, torch.Tensor], scores: dict) -> None:
    metadata = {key: str(value) for key, value in scores.items()}
    write_bytes(run.linear_probe_path, safetensors_bytes(state, metadata=metadata))


def load(run: RunDir) -> tuple[dict[str, torch.Tensor], dict]:
    """The probe's head state and its scores (test and val accuracy, ``C``)."""
    try:
        with safe_open(run.linear_probe_path, "pt") as handle:
            metadata = handle.metadata() or {}
        state = load_file(run.linear_probe_path)
    except Exception as exc:  # safetensors raises its own types for truncated or altered files
        raise CatdogError(f"run {run.path}: linear_probe.safetensors is damaged ({type(exc).__name__}); delete it "
                          "and resume training (jobs/train.py --resume) to fit it again") from None
    return state, {key: float(value) for key, value in metadata.items()}


def load_probe_network(run: RunDir) -> models.Network:
    """The pretrained backbone (the run's ``model.pretrained``) with the probe's head, in eval mode."""
    config = run.config()
    state, _ = load(run)
    network = models.create(config.model.name, state["weight"].shape[0], config.model.pretrained,
                            cam_layer=config.model.cam_layer)
    network.head.load_state_dict(state)
    return network.eval()
