"""The linear probe: a logistic regression on the frozen pretrained backbone's pooled features.

It is the baseline fine-tuning has to beat, on the training distribution and off it (``jobs/robustness.py``), and
LP-FT's starting head (``optim.head_init=linear_probe``). It is saved as the classifier's own state dict, so the
probe is a ``Network``: the pretrained backbone with that head.
"""
from __future__ import annotations

import os
from typing import NamedTuple

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


class Candidate(NamedTuple):
    """One fitted regression as a linear layer: logits = features @ weight.T + bias (float64)."""
    c: float
    weight: np.ndarray
    bias: np.ndarray


@torch.no_grad()
def _pooled_batches(network: models.Network, loader, accelerator: Accelerator, batch_transform, channels_last: bool,
                    desc: str):
    """This process's batches of (pooled features, labels, dataset indices), the pretrained network in eval mode."""
    network.eval()
    for images, labels, indices in progress_bar(loader, desc=desc, leave=False,
                                                disable=not accelerator.is_local_main_process):
        images = batch_transform(images)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with accelerator.autocast():
            pooled = network.features(images).float()
        yield pooled, labels, indices


def pooled_features(network: models.Network, loader, accelerator: Accelerator, batch_transform,
                    channels_last: bool, desc: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The loader's images' pooled features and labels in dataset order, on the main process (None on the others).

    Each process keeps its share and sends it once, at the end, to the main process alone (``torch.distributed``'s
    ``gather_object``): no process but the main one ever holds the rows, which the probe's fit needs in memory; the
    loader holds the stratified sample of ``train.linear_probe_max_rows`` images (``catdog.train.build_loaders``),
    so that is a bound. Rows come back by their dataset index, the padding that evens out the processes' shares
    dropped."""
    indices, features, labels = [], [], []
    for pooled, batch_labels, batch_indices in _pooled_batches(network, loader, accelerator, batch_transform,
                                                                channels_last, desc):
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


def fit(train: tuple[np.ndarray, np.ndarray], seed: int, of: int | None = None) -> list[Candidate]:
    """A logistic regression per ``C`` on the raw features (no standardisation: its weights would be divided by
    each feature's spread, and fine-tuning moves the features), each folded into one linear layer's weight and
    bias. Run once, by the main process (``catdog.train.linear_probe``); it says so, with the images it was fitted
    on (a sample ``of`` that many when it is one)."""
    sampled = f" (a stratified sample of {of})" if of and of > len(train[1]) else ""
    print(f"linear probe: fitting on {len(train[1])} train images{sampled} (process {os.getpid()})")
    candidates = []
    for c in REGULARISATION:
        classifier = LogisticRegression(C=c, max_iter=5000, random_state=seed).fit(*train)
        weight, bias = classifier.coef_, classifier.intercept_
        if weight.shape[0] == 1:  # binary: sklearn keeps one row, the logit of class 1
            weight, bias = np.concatenate([-weight / 2, weight / 2]), np.array([-bias[0] / 2, bias[0] / 2])
        candidates.append(Candidate(c, np.ascontiguousarray(weight, dtype=np.float64), np.asarray(bias, np.float64)))
    return candidates


def hits(candidates: list[Candidate], features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(rows, candidates): whether each candidate classifies each row right (in float64, as scikit-learn decides)."""
    features = np.asarray(features, dtype=np.float64)
    return np.stack([np.argmax(features @ c.weight.T + c.bias, axis=1) == labels for c in candidates], axis=1)


def count_correct(candidates: list[Candidate], network: models.Network, loader, accelerator: Accelerator,
                  batch_transform, channels_last: bool, desc: str) -> tuple[np.ndarray, int]:
    """Each candidate's right answers over the loader's whole split and the number of images, streamed: every
    process scores its batches, ``gather_for_metrics`` brings each batch's per-candidate hits (not its features)
    together and drops the padding. Memory: one batch."""
    right, total = np.zeros(len(candidates), dtype=np.int64), 0
    for pooled, labels, _ in _pooled_batches(network, loader, accelerator, batch_transform, channels_last, desc):
        batch = hits(candidates, pooled.cpu().numpy(), labels.cpu().numpy())
        batch = accelerator.gather_for_metrics(torch.from_numpy(batch).to(labels.device))
        right += batch.sum(0).cpu().numpy()
        total += len(batch)
    return right, total


def best(candidates: list[Candidate], test: tuple[np.ndarray, int], val: tuple[np.ndarray, int]
         ) -> tuple[dict[str, torch.Tensor], dict]:
    """The candidate with the best test accuracy (the smaller ``C`` on a tie), as epochs are chosen on test: its
    state and its scores."""
    (test_hits, test_total), (val_hits, val_total) = test, val
    chosen = max(range(len(candidates)), key=lambda i: (test_hits[i], -candidates[i].c))
    candidate = candidates[chosen]
    state = {"weight": torch.tensor(candidate.weight, dtype=torch.float32),
             "bias": torch.tensor(candidate.bias, dtype=torch.float32)}
    return state, {"test_accuracy": int(test_hits[chosen]) / test_total,
                   "val_accuracy": int(val_hits[chosen]) / val_total, "C": candidate.c}


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
