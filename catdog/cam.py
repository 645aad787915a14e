"""Grad-CAM across models: heat maps for one shared val sample, and a faithfulness score per model and method.

Faithfulness compares two confidence drops, each the mean fall of the target class's softmax probability:
removing the most salient ``removal_fraction`` of pixels, and removing the same share at random. "Removing"
sets a pixel to the normalisation mean (0 in the normalised tensor, every channel). The random removal
thresholds uniform noise drawn at the CAM layer's resolution and upsampled like a CAM, so both removals
cover blobs of a similar size rather than salient blobs against scattered single pixels.

The same sample is scored with grad-cam's own metrics (``pytorch_grad_cam.metrics``), on the target class's
softmax probability: ROAD (Rong et al. 2022) most-relevant-first and least-relevant-first at each of
``road_percentiles`` (pixels replaced by grad-cam's noisy linear imputation, not a constant) and their combined
score, and ``CamMultImageConfidenceChange`` (the probability change when the image is multiplied by its CAM).

Sanity check (Adebayo et al. 2018, cascading model-parameter randomisation): the network's parameterised units
(``cascade_units``: its top-level modules, containers opened one level) are randomised one after another from
the classifier down to the stem, each parameter tensor redrawn as seeded Gaussian noise of its own mean and
standard deviation (BatchNorm statistics kept). After each step the CAMs of a seeded per-class sample are
recomputed for the same target classes and compared with the trained model's by Spearman rank correlation per
image. A method is flagged when its maps barely change (``sanity_flags``).

Each (run, method) result is kept in ``OUT/gradcam/parts/`` with what it was computed from, so a rerun after
a kill, or with a method added, only computes what is missing. Beside it, the CAMs of the faithfulness sample, all
resized to ``MAP_SIZE``, so that ``jobs/compare.py`` can compare two models' maps pixel by pixel; ``summary.json``
names that file per model and method (part names carry the run's place in ``--runs``).
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from pytorch_grad_cam import (EigenCAM, EigenGradCAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, ScoreCAM,
                              XGradCAM)
from pytorch_grad_cam.metrics.cam_mult_image import CamMultImageConfidenceChange
from pytorch_grad_cam.metrics.perturbation_confidence import (PerturbationConfidenceMetric, RemoveLeastRelevantFirst,
                                                               RemoveMostRelevantFirst)
from pytorch_grad_cam.metrics.road import NoisyLinearImputer, neighbors_weights
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget, ClassifierOutputTarget
from scipy.sparse import csc_matrix
from scipy.sparse.linalg import spsolve
from scipy.stats import rankdata
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from catdog.classes import classes_shown
from catdog.config import Config, DataConfig, GradcamConfig, save_config
from catdog.data import ImageDataset, find_classes, load_rgb, loader_options
from catdog.splits import open_split
from catdog.devices import inference_device
from catdog.errors import CatdogError
from catdog.io import atomic_path, file_sha256, printable_path, read_json, write_json
from catdog.models import Network, cam_layer_name
from catdog.progress import progress_bar
from catdog.run import RunDir, run_label

log = logging.getLogger(__name__)

METHODS = {
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "hirescam": HiResCAM,
    "xgradcam": XGradCAM,
    "layercam": LayerCAM,
    "eigencam": EigenCAM,
    "eigengradcam": EigenGradCAM,
    "scorecam": ScoreCAM,
}
REMOVAL = "set to the normalisation mean (0 after normalisation)"
RANDOM_BASELINE = "uniform noise at the CAM layer's resolution, upsampled like a CAM, its highest pixels removed"
ROAD_IMPUTATION = "grad-cam's NoisyLinearImputer (each removed pixel from its neighbours, plus noise 0.01)"
DISPLAY_SIZE = 224
"""Side of each square grid cell, in pixels (photos are squashed to a square like the eval transform)."""
MAP_SIZE = 64
"""Side of the saved faithfulness-sample CAMs (float16): one size for every model, whatever its input size."""


def stage_dir(out: str | os.PathLike) -> Path:
    """Where ``jobs/gradcam.py --out OUT`` writes: ``OUT/gradcam``."""
    return Path(out) / "gradcam"


def completed_summary(out: str | os.PathLike, run_paths: list[str | os.PathLike]) -> Path | None:
    """``OUT/gradcam/summary.json`` when it exists and covers exactly these runs, else None (also for a summary
    written before ROAD, the sanity check or the saved faithfulness maps existed)."""
    path = stage_dir(out) / "summary.json"
    if not path.is_file() or "faithfulness_map_size" not in read_json(path):
        return None
    covered = sorted(Path(model["run"]).resolve() for model in read_json(path)["models"])
    return path if covered == sorted(Path(run).resolve() for run in run_paths) else None


def sample_per_class(labels: list[int], per_class: int, seed: int) -> list[int]:
    """A seeded sample of ``per_class`` indices of each label (all of a label's when it has fewer), by label."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        chosen += sorted(rng.choice(members, min(per_class, len(members)), replace=False).tolist())
    return chosen


def grid_sample(labels: list[int], shown: list[int], per_class: int, seed: int) -> list[int]:
    """The grid's rows: ``sample_per_class``'s images of the ``shown`` classes, in their order (the same images of a
    class whichever others are shown)."""
    by_class: dict[int, list[int]] = {}
    for index in sample_per_class(labels, per_class, seed):
        by_class.setdefault(labels[index], []).append(index)
    return [index for label in shown for index in by_class.get(label, [])]


def sample_indices(total: int, count: int, seed: int) -> list[int]:
    """A seeded sample of ``count`` of ``range(total)`` (all of them when there are fewer), sorted."""
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(total, min(count, total), replace=False).tolist())


def upsample(maps: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of (B, h, w) maps to (B, size, size)."""
    tensor = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))[:, None]
    return F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False)[:, 0].numpy()


def top_fraction_mask(saliency: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean (B, H, W): exactly ``round(fraction * H * W)`` pixels of each map, the highest; ties broken at random."""
    batch, height, width = saliency.shape
    count = round(fraction * height * width)
    flat = saliency.reshape(batch, -1)
    mask = np.zeros(flat.shape, dtype=bool)
    for row, values in enumerate(flat):
        order = np.lexsort((rng.random(values.size), -values))
        mask[row, order[:count]] = True
    return mask.reshape(saliency.shape)


def random_saliency(batch: int, grid: tuple[int, int], size: int, rng: np.random.Generator) -> np.ndarray:
    """Uniform noise on the CAM layer's ``grid``, upsampled to (batch, size, size) like a CAM."""
    return upsample(rng.random((batch, *grid)), size)


def remove_pixels(images: torch.Tensor, mask: np.ndarray) -> torch.Tensor:
    """Normalised images (B, C, H, W) with the masked pixels set to 0, the normalisation mean."""
    keep = torch.from_numpy(~mask)[:, None].to(images.device, images.dtype)
    return images * keep


def faithfulness(before: np.ndarray, after_salient: np.ndarray, after_random: np.ndarray) -> dict:
    """Mean confidence drops (probability before minus after removal) and how often salient beats random."""
    salient_drop, random_drop = before - after_salient, before - after_random
    return {
        "salient_drop": float(salient_drop.mean()),
        "random_drop": float(random_drop.mean()),
        "salient_wins": float((salient_drop > random_drop).mean()),
        "mean_confidence": float(before.mean()),
        "n_images": int(before.size),
    }


def layer_grid(network: Network, image_size: int) -> tuple[int, int]:
    """Spatial size of the CAM layer's output for a square ``image_size`` input."""
    shapes = []
    handle = network.cam_layer.register_forward_hook(lambda module, args, output: shapes.append(output.shape))
    try:
        with torch.no_grad():
            network(torch.zeros(1, 3, image_size, image_size, device=next(network.parameters()).device))
    finally:
        handle.remove()
    return tuple(shapes[0][-2:])


@torch.no_grad()
def probabilities(network: Network, images: torch.Tensor) -> torch.Tensor:
    return network(images).softmax(dim=1)


@contextlib.contextmanager
def gradients_from(network: nn.Module, layer: nn.Module) -> Iterator[None]:
    """Within the block, a backward pass stops at ``layer``'s output: no parameter asks for a gradient, and the
    layer's output asks for one through a zero added to it (the same values; unlike a leaf, it may still be changed
    in place downstream). Grad-CAM needs only the gradient at that output, and grad-cam's own backward pass otherwise
    runs through the whole network for every parameter's gradient."""
    flags = [(parameter, parameter.requires_grad) for parameter in network.parameters()]
    anchor = torch.zeros((), requires_grad=True)

    def ask_for_gradient(module, args, output):
        return output + anchor.to(output.device, output.dtype) if torch.is_grad_enabled() else output

    handle = layer.register_forward_hook(ask_for_gradient)
    try:
        for parameter, _ in flags:
            parameter.requires_grad_(False)
        yield
    finally:
        handle.remove()
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


def class_activation_maps(network: Network, method: str, images: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    """(B, H, W) maps in [0, 1] for each image's target class, from the registry's CAM layer (``gradients_from``
    it: the backward pass stops there)."""
    maps = None
    with gradients_from(network, network.cam_layer), \
            METHODS[method](model=network, target_layers=[network.cam_layer]) as cam:
        maps = cam(input_tensor=images, targets=[ClassifierOutputTarget(int(t)) for t in targets])
    if maps is None:  # grad-cam's __exit__ prints an IndexError and swallows it
        raise RuntimeError(f"{method} on {network.name} failed (see the message printed above)")
    return maps


def ranked(cams: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each map replaced by its pixels' ranks scaled to [0, 1], ties (e.g. the zeros of a ReLU'd CAM) broken at
    random: the same order, so that ROAD's percentile thresholds remove exactly the stated share of pixels (with
    ties, grad-cam's strict ``cam < threshold`` can remove every pixel, and imputing a whole image takes seconds)."""
    flat = cams.reshape(len(cams), -1)
    out = np.empty(flat.shape, dtype=np.float32)
    for row, values in enumerate(flat):
        order = np.lexsort((rng.random(values.size), values))
        out[row, order] = np.arange(values.size, dtype=np.float32) / max(values.size - 1, 1)
    return out.reshape(cams.shape)


class LinearImputer(NoisyLinearImputer):
    """grad-cam's ``NoisyLinearImputer`` (each removed pixel the weighted mean of its 8 neighbours, solved as one
    sparse system, plus noise), with the system built in one vectorised pass instead of grad-cam's element-wise
    ``lil_matrix`` assignments, which took 70% of its time (1.0 s of 1.4 s for a 260 px image with 30% removed):
    the same matrix, the same solver, the same noise drawn in the same order, so the same imputed image, bit for
    bit (``tests/test_cam.py``; ``bench/road.py`` measures the ratio)."""

    @staticmethod
    def system(mask: np.ndarray, image: np.ndarray) -> tuple[csc_matrix, np.ndarray]:
        """The (N, N) system and (N, C) right-hand side of ``NoisyLinearImputer.setup_sparse_system``."""
        height, width = mask.shape
        flat_mask, flat_image = mask.reshape(-1), image.reshape(image.shape[0], -1)
        missing = np.flatnonzero(flat_mask == 0)
        variable = np.zeros(flat_mask.size, dtype=np.int64)
        variable[missing] = np.arange(len(missing))
        rows, columns, values = [np.arange(len(missing))], [np.arange(len(missing))], []
        right = np.zeros((len(missing), image.shape[0]))
        weight_sum = np.ones(len(missing))
        y, x = missing // width, missing % width
        for (dy, dx), weight in neighbors_weights:
            inside = (y + dy >= 0) & (y + dy < height) & (x + dx >= 0) & (x + dx < width)
            weight_sum[~inside] -= weight
            ids = np.flatnonzero(inside)
            neighbour = missing[ids] + dy * width + dx
            known = flat_mask[neighbour] > 0.5
            right[ids[known]] -= weight * flat_image[:, neighbour[known]].T
            unknown = flat_mask[neighbour] < 0.5
            rows.append(ids[unknown])
            columns.append(variable[neighbour[unknown]])
            values.append(np.full(unknown.sum(), weight))
        values.insert(0, -weight_sum)
        matrix = csc_matrix((np.concatenate(values), (np.concatenate(rows), np.concatenate(columns))),
                            shape=(len(missing), len(missing)))
        return matrix, right

    def __call__(self, img: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        flat = img.reshape(img.shape[0], -1)
        missing = np.flatnonzero(mask.reshape(-1).numpy() == 0)
        solution = torch.tensor(spsolve(*self.system(mask.numpy(), img.numpy())), dtype=torch.float)
        filled = flat.clone()
        filled[:, missing] = solution.t() + self.noise * torch.randn_like(solution.t())
        return filled.reshape_as(img)


def road_metric(most_relevant_first: bool, percentile: int) -> PerturbationConfidenceMetric:
    """grad-cam's ``ROADMostRelevantFirst`` / ``ROADLeastRelevantFirst`` at ``percentile``, on ``LinearImputer``."""
    removal = RemoveMostRelevantFirst if most_relevant_first else RemoveLeastRelevantFirst
    return PerturbationConfidenceMetric(removal(percentile, LinearImputer()))


def road_scores(network: Network, images: torch.Tensor, cams: np.ndarray, targets: torch.Tensor,
                percentiles: list[int], seed: int, before: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """grad-cam's ROAD on a batch: ``morf`` and ``lerf`` (P, B), the change of each image's target probability
    (after minus before) when its most / least relevant pixels are imputed, one row per percentile.

    The imputer adds ``torch.randn`` noise, drawn after ``torch.manual_seed(seed)`` without touching the global
    generator, in the order grad-cam's ``ROADCombined`` draws it (every LeRF, then every MoRF), so that
    ``(lerf.mean(0) - morf.mean(0)) / 2`` equals ``ROADCombined(percentiles)`` after the same seed.
    ``before``: the target probabilities of the unchanged images, when already known.
    """
    softmax_targets = [ClassifierOutputSoftmaxTarget(int(t)) for t in targets]
    if before is None:
        picked = torch.arange(len(images), device=images.device)
        before = probabilities(network, images)[picked, targets.to(images.device)].cpu().numpy()
    with torch.random.fork_rng(devices=[]):  # return_diff=False: the probability before is computed once, above
        torch.manual_seed(seed)
        lerf = [road_metric(False, p)(images, cams, softmax_targets, network, return_diff=False) - before
                for p in percentiles]
        morf = [road_metric(True, p)(images, cams, softmax_targets, network, return_diff=False) - before
                for p in percentiles]
    return {"morf": np.stack(morf), "lerf": np.stack(lerf)}


def confidence_change(network: Network, images: torch.Tensor, cams: np.ndarray, targets: torch.Tensor) -> np.ndarray:
    """grad-cam's ``CamMultImageConfidenceChange``: per image, the target probability of the image multiplied by
    its CAM minus that of the image (near 0 or above: the CAM keeps what the model needs)."""
    softmax_targets = [ClassifierOutputSoftmaxTarget(int(t)) for t in targets]
    return np.asarray(CamMultImageConfidenceChange()(images, cams, softmax_targets, network), dtype=np.float64)


def road_summary(morf: np.ndarray, lerf: np.ndarray, percentiles: list[int]) -> dict:
    """Means over images of the (P, N) ROAD scores: per percentile, averaged over percentiles, and combined."""
    return {"percentiles": list(percentiles),
            "morf": {str(p): float(v) for p, v in zip(percentiles, morf.mean(axis=1))},
            "lerf": {str(p): float(v) for p, v in zip(percentiles, lerf.mean(axis=1))},
            "morf_mean": float(morf.mean()), "lerf_mean": float(lerf.mean()),
            "combined": float(((lerf.mean(axis=0) - morf.mean(axis=0)) / 2).mean())}


def cascade_units(network: nn.Module, image_size: int) -> list[tuple[str, nn.Module]]:
    """The units a cascading randomisation destroys, from the output down: the top-level modules of the network's
    backbone (containers such as ``blocks`` or ``layer4`` opened one level) that have parameters, ordered by when a
    forward pass first reaches them, last first."""
    root = getattr(network, "backbone", network)
    units = []
    for name, child in root.named_children():
        if isinstance(child, (nn.Sequential, nn.ModuleList)):
            units += [(f"{name}.{sub}", grandchild) for sub, grandchild in child.named_children()]
        else:
            units.append((name, child))
    units = [(name, module) for name, module in units if any(True for _ in module.parameters())]
    order: dict[int, int] = {}

    def reached(index: int):
        def hook(module, args) -> None:  # a pre-hook that returned a value would replace the input
            order.setdefault(index, len(order))
        return hook

    hooks = [module.register_forward_pre_hook(reached(i)) for i, (_, module) in enumerate(units)]
    try:
        with torch.no_grad():
            network(torch.zeros(1, 3, image_size, image_size, device=next(network.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
    return [units[i] for i in sorted(order, key=order.get, reverse=True)]


@torch.no_grad()
def randomise(module: nn.Module, generator: torch.Generator) -> None:
    """Replace every parameter tensor of ``module`` by Gaussian noise of its own mean and standard deviation."""
    for parameter in module.parameters():
        noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float32)
        std = parameter.float().std() if parameter.numel() > 1 else parameter.float().abs()
        parameter.copy_((noise * std + parameter.float().mean()).to(parameter.dtype))


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation of each pair of maps (B, H, W); 0 where either map is constant (it ranks
    nothing, so it keeps none of the other's order)."""
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    out = np.zeros(len(a))
    for i, (x, y) in enumerate(zip(a, b)):
        if np.ptp(x) > 0 and np.ptp(y) > 0:
            out[i] = np.corrcoef(rankdata(x), rankdata(y))[0, 1]
    return out


def sanity_check(network: Network, method: str, batches: list[tuple[torch.Tensor, torch.Tensor]], seed: int,
                 image_size: int, bar=None) -> list[dict]:
    """Cascading randomisation over ``batches`` of (images, target classes): per step (``trained``, then each
    unit from the top, cumulatively), the mean and standard deviation over the images of the Spearman
    correlation of their CAMs with the trained model's, and how many of the step's maps are constant."""
    def cams(model: nn.Module) -> np.ndarray:
        maps = []
        for images, targets in batches:
            maps.append(class_activation_maps(model, method, images, targets))
            if bar is not None:
                bar.update(len(images))
        return np.concatenate(maps)

    reference = cams(network)
    steps = [{"layer": "trained", "spearman": 1.0, "spearman_std": 0.0,
              "constant_maps": int((np.ptp(reference.reshape(len(reference), -1), axis=1) == 0).sum())}]
    randomised = copy.deepcopy(network)
    generator = torch.Generator().manual_seed(seed)
    for name, unit in cascade_units(randomised, image_size):
        randomise(unit, generator)
        maps = cams(randomised)
        rho = spearman(reference, maps)
        steps.append({"layer": name, "spearman": float(rho.mean()), "spearman_std": float(rho.std()),
                      "constant_maps": int((np.ptp(maps.reshape(len(maps), -1), axis=1) == 0).sum())})
    return steps


def sanity_flags(steps: list[dict], threshold: float) -> list[str]:
    """Why a method fails the sanity check (an empty list when it passes): its maps keep a mean Spearman
    correlation of at least ``threshold`` once every unit is randomised, or once the classifier alone is."""
    flags = []
    if len(steps) > 1 and steps[1]["spearman"] >= threshold:
        flags.append(f"maps barely change when the classifier ({steps[1]['layer']}) is randomised "
                     f"(Spearman {steps[1]['spearman']:.2f} >= {threshold:g}): they ignore what the head learned")
    if len(steps) > 1 and steps[-1]["spearman"] >= threshold:
        flags.append(f"maps barely change when every layer is randomised (Spearman {steps[-1]['spearman']:.2f} "
                     f">= {threshold:g}): they show the image more than the model")
    return flags


def draw_sanity(models: list[dict], threshold: float, path: Path) -> None:
    """Spearman correlation with the trained model's CAMs against the randomisation step, a panel per model and a
    line per method, with the flag threshold dashed."""
    figure = Figure(figsize=(max(6.0, 0.38 * max(len(m["sanity_layers"]) for m in models) + 2), 3.6 * len(models)),
                    layout="constrained")
    axes = figure.subplots(len(models), 1, squeeze=False)[:, 0]
    for axis, model in zip(axes, models):
        layers = model["sanity_layers"]
        for method, score in model["methods"].items():
            steps = score["sanity"]
            mean = np.array([s["spearman"] for s in steps])
            std = np.array([s["spearman_std"] for s in steps])
            line, = axis.plot(range(len(steps)), mean, "o-", markersize=3, label=method)
            axis.fill_between(range(len(steps)), mean - std, mean + std, color=line.get_color(), alpha=0.15)
        axis.axhline(threshold, color="grey", linestyle="--", linewidth=1, label=f"flag at {threshold:g}")
        axis.set_xticks(range(len(layers)), layers, rotation=60, ha="right", fontsize=7)
        axis.set(ylabel="Spearman vs trained", ylim=(-0.3, 1.05),
                 title=f"{run_label(Path(model['run']).name, model['model'])}: cascading randomisation, top down")
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)


def _loader(dataset: ImageDataset, rows: list[int], batch_size: int, data: DataConfig,
            device: torch.device) -> DataLoader:
    return DataLoader(Subset(dataset, rows), batch_size=batch_size,
                      **loader_options(data.num_workers, device, persistent=False))


def _grid(network: Network, method: str, dataset: ImageDataset, rows: list[int], cfg: GradcamConfig,
          data: DataConfig, bar: tqdm) -> tuple[np.ndarray, list[dict]]:
    """The grid images' maps, and each image's prediction and its probability."""
    device, classes = next(network.parameters()).device, dataset.classes
    maps, predictions = [], []
    for images, labels, indices in _loader(dataset, rows, cfg.batch_size, data, device):
        images, labels = images.to(device), labels.to(device)
        probs = probabilities(network, images)
        targets = labels if cfg.target == "true" else probs.argmax(dim=1)
        maps.append(class_activation_maps(network, method, images, targets))
        for index, p in zip(indices.tolist(), probs.cpu()):
            predictions.append({"image": dataset.relative_path(index), "label": classes[dataset.samples[index].label],
                                "predicted": classes[int(p.argmax())], "probability": float(p.max())})
        bar.update(len(images))
    return np.concatenate(maps), predictions


def _faithfulness(network: Network, method: str, dataset: ImageDataset, rows: list[int], cfg: GradcamConfig,
                  data: DataConfig, bar: tqdm) -> tuple[dict, np.ndarray]:
    """Target-class probabilities before and after removing the salient or a random share; their drops. Also the
    sample's CAMs at ``MAP_SIZE`` (N, MAP_SIZE, MAP_SIZE) float16."""
    device, size = next(network.parameters()).device, data.image_size
    grid = layer_grid(network, size)
    rng = np.random.default_rng([cfg.seed, 1])
    before, after_salient, after_random, predictions, morf, lerf, change, sample_maps = [], [], [], [], [], [], [], []
    seconds = dict.fromkeys(("cams", "salient_vs_random", "road", "confidence_change"), 0.0)
    for batch, (images, labels, _) in enumerate(_loader(dataset, rows, cfg.batch_size, data, device)):
        images, labels = images.to(device), labels.to(device)
        start = time.perf_counter()
        probs = probabilities(network, images)
        targets = labels if cfg.target == "true" else probs.argmax(dim=1)
        cams = class_activation_maps(network, method, images, targets)
        sample_maps.append(upsample(cams, MAP_SIZE).astype(np.float16))
        seconds["cams"] += time.perf_counter() - start
        start = time.perf_counter()
        salient = top_fraction_mask(cams, cfg.removal_fraction, rng)
        random = top_fraction_mask(random_saliency(len(images), grid, size, rng), cfg.removal_fraction, rng)
        picked = torch.arange(len(images), device=device)
        before.append(probs[picked, targets].cpu().numpy())
        after_salient.append(probabilities(network, remove_pixels(images, salient))[picked, targets].cpu().numpy())
        after_random.append(probabilities(network, remove_pixels(images, random))[picked, targets].cpu().numpy())
        seconds["salient_vs_random"] += time.perf_counter() - start
        start = time.perf_counter()
        road = road_scores(network, images, ranked(cams, rng), targets, cfg.road_percentiles,
                           int(np.random.default_rng([cfg.seed, 2, batch]).integers(2 ** 31)), before=before[-1])
        morf.append(road["morf"])
        lerf.append(road["lerf"])
        seconds["road"] += time.perf_counter() - start
        start = time.perf_counter()
        change.append(confidence_change(network, images, cams, targets))
        seconds["confidence_change"] += time.perf_counter() - start
        predictions += [dataset.classes[int(i)] for i in probs.argmax(dim=1)]
        bar.update(len(images))
    score = faithfulness(np.concatenate(before), np.concatenate(after_salient), np.concatenate(after_random))
    return {**score, "road": road_summary(np.concatenate(morf, axis=1), np.concatenate(lerf, axis=1),
                                          cfg.road_percentiles),
            "confidence_change": float(np.concatenate(change).mean()), "cam_grid": list(grid),
            "predictions": predictions, "seconds": seconds}, np.concatenate(sample_maps)


def _sanity(network: Network, method: str, dataset: ImageDataset, rows: list[int], cfg: GradcamConfig,
            data: DataConfig, bar: tqdm) -> list[dict]:
    """The cascading randomisation on the sanity sample (one batch), for the trained model's target classes."""
    device, batches = next(network.parameters()).device, []
    for images, labels, _ in _loader(dataset, rows, cfg.batch_size, data, device):
        images, labels = images.to(device), labels.to(device)
        batches.append((images, labels if cfg.target == "true" else probabilities(network, images).argmax(dim=1)))
    return sanity_check(network, method, batches, cfg.seed, data.image_size, bar)


def _explain(network: Network, method: str, dataset: ImageDataset, grid_rows: list[int], faith_rows: list[int],
             sanity_rows: list[int], cfg: GradcamConfig, data: DataConfig,
             desc: str) -> tuple[dict, np.ndarray, np.ndarray]:
    """One model and method: the grid's maps and predictions, the faithfulness scores and the sanity check; returns
    the scores, the grid's maps and the faithfulness sample's maps."""
    steps = 1 + len(cascade_units(network, data.image_size))
    cpu = time.process_time()
    with progress_bar(total=len(grid_rows) + len(faith_rows) + steps * len(sanity_rows), desc=desc,
                      unit="img") as bar:
        start = time.perf_counter()
        maps, grid_predictions = _grid(network, method, dataset, grid_rows, cfg, data, bar)
        grid_seconds = time.perf_counter() - start
        result, faith_maps = _faithfulness(network, method, dataset, faith_rows, cfg, data, bar)
        start = time.perf_counter()
        sanity = _sanity(network, method, dataset, sanity_rows, cfg, data, bar)
        result["seconds"].update(grid=grid_seconds, sanity=time.perf_counter() - start)
    result["seconds"]["total"] = sum(result["seconds"].values())
    result["cpu_seconds"] = time.process_time() - cpu  # every thread of this process; steadier than wall time
    return {**result, "grid_predictions": grid_predictions, "sanity": sanity}, maps, faith_maps


def _identity(run: RunDir, method: str, data_root: Path, cfg: GradcamConfig, data: DataConfig,
              grid_classes: list[str]) -> dict:
    """What a part's numbers depend on: a stored part is reused only when all of it matches (a part written before
    the faithfulness maps were saved lacks ``faithfulness_map_size``, one written before the grid was bounded lacks
    ``grid_classes``: either is computed again)."""
    settings = cfg.model_dump(mode="json", exclude={"methods", "batch_size"})
    return {"run": str(run.path.resolve()), "checkpoint_sha256": file_sha256(run.best_checkpoint), "method": method,
            "data": str(data_root.resolve()), "gradcam": settings, "transform": data.model_dump(mode="json"),
            "faithfulness_map_size": MAP_SIZE, "grid_classes": grid_classes}


def _run_classes(run: RunDir, classes: list[str], data_root: Path) -> None:
    trained_on = run.summary()["classes"]
    if trained_on != classes:
        raise CatdogError(f"run {run.path} was trained on classes {trained_on}, but {data_root} has {classes}; "
                          "give the data root it was trained on")


def draw_grid(photos: list[np.ndarray], row_titles: list[str], columns: list[dict], path: Path) -> None:
    """One row per photo: the photo, then each column's heat map over it, titled with the prediction.

    ``columns``: ``{"title", "maps" (N, S, S), "predictions" [{"predicted", "probability", "label"}]}``.
    A wrong prediction's title is red.
    """
    rows, cols = len(photos), 1 + len(columns)
    figure = Figure(figsize=(2.3 * cols, 2.5 * rows + 0.5), layout="constrained")
    axes = figure.subplots(rows + 1, cols, squeeze=False, gridspec_kw={"height_ratios": [0.18] + [1] * rows})
    for c, header in enumerate(["photo"] + [column["title"] for column in columns]):
        axes[0, c].text(0.5, 0.5, header, ha="center", va="center", fontsize=9, weight="bold")
        axes[0, c].axis("off")
    for r, (photo, title) in enumerate(zip(photos, row_titles), start=1):
        axes[r, 0].imshow(photo)
        axes[r, 0].set_title(title, fontsize=8)
        for c, column in enumerate(columns, start=1):
            heat = upsample(column["maps"][r - 1:r], DISPLAY_SIZE)[0].clip(0, 1)
            axes[r, c].imshow(show_cam_on_image(photo, heat, use_rgb=True))
            prediction = column["predictions"][r - 1]
            right = prediction["predicted"] == prediction["label"]
            axes[r, c].set_title(f"{prediction['predicted']} {prediction['probability']:.1%}", fontsize=9,
                                 color="black" if right else "red")
        for axis in axes[r]:
            axis.set_xticks([])
            axis.set_yticks([])
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)


def display_photo(path: Path) -> np.ndarray:
    """The photo squashed to a ``DISPLAY_SIZE`` square, as floats in [0, 1] (what ``draw_grid`` draws on)."""
    image = load_rgb(path).resize((DISPLAY_SIZE, DISPLAY_SIZE))
    return np.asarray(image, dtype=np.float32) / 255


def gradcam(run_paths: list[str | os.PathLike], data_root: str | os.PathLike, out: str | os.PathLike,
            config: Config) -> dict:
    """Explain every run's model on the same val images; write ``OUT/gradcam/{grid.png,summary.json}``. The grid
    shows ``figures.max_classes`` classes, the first run's most confused first (``catdog.classes``); faithfulness scores
    a sample of every class. The sanity check tests the method, not a class: it runs on the shown classes' images, so
    its cost stays bounded as classes grow (13 randomisation steps per image)."""
    cfg = config.gradcam
    data_root, stage = Path(data_root), stage_dir(out)
    runs = [RunDir(p) for p in run_paths]
    classes = find_classes(data_root)
    for run in runs:
        _run_classes(run, classes, data_root)
    # the listing and photos only (each model's own transform is used below): the first run's resolved data config
    reference = open_split(data_root, "val", runs[0].config().data, classes=classes)
    shown = classes_shown(runs[0].path, classes, config.figures.max_classes)
    grid_classes = [classes[c] for c in shown]
    grid_rows = grid_sample(reference.labels, shown, cfg.images_per_class, cfg.seed)
    faith_rows = sample_indices(len(reference), cfg.faithfulness_images, cfg.seed)
    sanity_rows = grid_sample(reference.labels, sorted(shown), cfg.sanity_images_per_class, cfg.seed + 1)

    device = inference_device()
    models, columns = [], []
    for number, run in enumerate(runs):
        run_config = run.config()
        data, model_name = run_config.data, run_config.model.name
        dataset = open_split(data_root, "val", data, classes=classes)
        network = None
        entry = {"run": str(run.path), "model": model_name, "image_size": data.image_size,
                 "cam_layer": cam_layer_name(model_name, run_config.model.cam_layer), "methods": {}}
        for method in cfg.methods:
            part = stage / "parts" / f"{number:02d}-{run.path.name}-{method}"
            identity = _identity(run, method, data_root, cfg, data, grid_classes)
            json_path, maps_path = part.with_suffix(".json"), part.with_suffix(".npy")
            faith_path = part.with_name(f"{part.name}-faithfulness.npy")
            if (json_path.is_file() and maps_path.is_file() and faith_path.is_file()
                    and read_json(json_path)["identity"] == identity):
                result, maps = read_json(json_path), np.load(maps_path)
                log.info("%s %s: reusing %s", run.path, method, json_path)
            else:
                if network is None:
                    network = run.load_model()[0].to(device)
                result, maps, faith_maps = _explain(network, method, dataset, grid_rows, faith_rows, sanity_rows, cfg,
                                                    data, desc=f"{run.path.name} {method}")
                for path, array in ((maps_path, maps.astype(np.float16)), (faith_path, faith_maps)):
                    with atomic_path(path) as tmp:
                        with open(tmp, "wb") as handle:
                            np.save(handle, array)
                result = {"identity": identity, **result}
                write_json(json_path, result)  # last: the part is complete
            entry.update(grid_predictions=result["grid_predictions"], predictions=result["predictions"])
            entry["methods"][method] = {key: result[key] for key in
                                        ("salient_drop", "random_drop", "salient_wins", "mean_confidence", "n_images",
                                         "road", "confidence_change", "seconds", "cpu_seconds", "sanity")}
            entry["methods"][method]["sanity_flags"] = sanity_flags(result["sanity"], cfg.sanity_threshold)
            entry["methods"][method]["faithfulness_maps"] = faith_path.relative_to(stage).as_posix()
            entry["checkpoint_sha256"] = identity["checkpoint_sha256"]
            entry["sanity_layers"] = [step["layer"] for step in result["sanity"]]
            columns.append({"title": f"{run_label(run.path.name, model_name)}\n{method}", "maps": maps,
                            "predictions": result["grid_predictions"]})
        models.append(entry)

    photos = [display_photo(reference.samples[i].path) for i in grid_rows]
    titles = [f"{classes[reference.samples[i].label]}: {printable_path(reference.samples[i].path.name)}"
              for i in grid_rows]
    draw_grid(photos, titles, columns, stage / "grid.png")
    draw_sanity(models, cfg.sanity_threshold, stage / "sanity.png")
    summary = {
        "data": str(data_root),
        "split": "val",
        "target": cfg.target,
        "methods": list(cfg.methods),
        "removal": REMOVAL,
        "removal_fraction": cfg.removal_fraction,
        "random_baseline": RANDOM_BASELINE,
        "road_percentiles": list(cfg.road_percentiles),
        "road_imputation": ROAD_IMPUTATION,
        "sanity_threshold": cfg.sanity_threshold,
        "sanity_images": [reference.relative_path(i) for i in sanity_rows],
        "classes": classes,
        "grid_classes": grid_classes,
        "grid_images": [reference.relative_path(i) for i in grid_rows],
        "faithfulness_images": [reference.relative_path(i) for i in faith_rows],
        "faithfulness_map_size": MAP_SIZE,
        "models": models,
    }
    save_config(config, stage / "config.yaml")
    write_json(stage / "summary.json", summary)  # last: marks the stage complete
    return summary


if __name__ == "__main__":  # python -m catdog.cam OUT RUN...: exit 0 when OUT's Grad-CAM covers these runs
    import sys

    done = completed_summary(sys.argv[1], sys.argv[2:])
    print(done or stage_dir(sys.argv[1]) / "summary.json")
    sys.exit(0 if done else 1)
