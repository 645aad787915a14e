"""Two or more runs trained on the same data, side by side (``jobs/compare.py``): accuracy and cost, where their
val predictions disagree, how their Grad-CAM maps differ in style, and how alike their features are.

    python -m catdog.compare OUT RUN...     # exit 0 when OUT/compare/summary.json covers exactly these runs

It reads only what earlier stages wrote: each run's ``summary.json``, ``config.yaml`` and best checkpoint, its
feature store, and the Grad-CAM stage's ``OUT/gradcam/summary.json``, which names each model's CAMs of the same
seeded val sample, all at ``catdog.cam.MAP_SIZE``. It writes ``OUT/compare/summary.json`` (last), a disagreement
montage per pair and ``cam_style.png``.

- Disagreements: each run's val predictions come from ``catdog.predict.predict`` on ``DATA/val``, which evaluates as
  training did (listing, eval transform, batch size, autocast precision, hflip TTA); McNemar's exact test on the
  images only one of the two gets right.
- Map style, per model: the share of each map at or above half its maximum, its normalised entropy, and the pointing
  game against ``DATA/masks/<split>/<class>/<file stem>.png`` (non-zero = object) where such masks exist; between two
  models, per image: Spearman's rank correlation and the IoU of their top ``compare.top_fraction`` regions.
- Features: linear CKA (Kornblith et al., 2019) of the pooled val features against a row-shuffled baseline, and a
  logistic regression on both models' features concatenated against each model's alone. Both stores are streamed
  block by block with rows matched by row id (``aligned_blocks``), less the rows either store could not decode
  (``readable_blocks``), so memory stays flat in the number of images: the CKA comes from float64 F x F moments,
  the baseline's mean in closed form (``CrossMoments.shuffled_cka_mean``), its spread and the regressions' fits
  from bounded samples (``compare.cka_sample_rows``, ``compare.regression_sample_rows``).

The slow parts are kept in ``OUT/compare/parts/`` with what they were computed from (each run's val predictions,
keyed by its checkpoint's sha256; each pair's results), so a rerun after a kill recomputes nothing finished.
"""
from __future__ import annotations

import csv
import itertools
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image
from scipy.stats import binomtest, entropy
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from torch.utils.data import DataLoader, Subset

from catdog import models
from catdog.cam import (class_activation_maps, display_photo, draw_grid, sample_indices, spearman,
                        stage_dir as gradcam_dir)
from catdog.config import CompareConfig, Config, save_config
from catdog.data import find_classes, loader_options
from catdog.devices import inference_device
from catdog.errors import CatdogError
from catdog.io import atomic_path, file_sha256, open_text, printable_path, read_json, write_json
from catdog.predict import PROBABILITY_PREFIX, predict, resolve_precision
from catdog.probe import REGULARISATION
from catdog.progress import progress_bar
from catdog.run import RunDir
from catdog.sampling import stratified_rows
from catdog.splits import open_split
from catdog.store import FeatureStore, decode_paths

log = logging.getLogger(__name__)

SPLIT = "val"
"""The split compared (predictions, maps, CKA); the logistic regression also reads train and test."""
FEATURE_SPLITS = ("train", "test", "val")
MASKS = "masks"
"""``DATA/masks/<split>/<class>/<file stem>.png``: object masks for the pointing game (non-zero = object)."""
MCNEMAR_TEST = "exact two-sided binomial test on the discordant pairs"


# ---------------------------------------------------------------------------------------------------- pure functions

def stats(values) -> dict:
    """The spread of per-image values: n, mean, std, median and quartiles (null numbers when there are none)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return {"n": 0, "mean": None, "std": None, "median": None, "q25": None, "q75": None}
    q25, median, q75 = np.percentile(values, [25, 50, 75])
    return {"n": int(values.size), "mean": float(values.mean()), "std": float(values.std()), "median": float(median),
            "q25": float(q25), "q75": float(q75)}


def area_above_half_max(maps: np.ndarray) -> np.ndarray:
    """Per map (B, H, W): the share of its pixels at or above half its maximum. A map without a positive maximum
    (grad-cam returns all zeros when it finds nothing) favours no pixel, so it counts as covering the whole image."""
    flat = maps.reshape(len(maps), -1).astype(np.float64)
    peak = flat.max(axis=1, keepdims=True)
    return np.where(peak[:, 0] > 0, (flat >= peak / 2).mean(axis=1), 1.0)


def normalised_entropy(maps: np.ndarray) -> np.ndarray:
    """Per map (B, H, W): the entropy of the map normalised to sum 1 (negative values clipped to 0), divided by
    log(pixels): 0 when one pixel holds everything, 1 for a uniform map (and for an all-zero one, uniform too)."""
    flat = np.clip(maps.reshape(len(maps), -1).astype(np.float64), 0, None)
    flat[flat.sum(axis=1) == 0] = 1.0
    return entropy(flat, axis=1) / np.log(flat.shape[1])


def peak(heat: np.ndarray) -> tuple[int, int]:
    """A map's peak pixel (row, column): of the pixels at its maximum, the one nearest the map's centre (the first in
    row-major order on ties). A CAM upsampled from a coarse grid is flat from its top cell's centre out to the border
    (bilinear resizing extends the edge cells); the plateau's inner corner is that centre, where the evidence is."""
    rows, cols = np.nonzero(heat == heat.max())
    middle_row, middle_col = (heat.shape[0] - 1) / 2, (heat.shape[1] - 1) / 2
    nearest = np.argmin((rows - middle_row) ** 2 + (cols - middle_col) ** 2)
    return int(rows[nearest]), int(cols[nearest])


def pointing_hits(maps: np.ndarray, masks: list[np.ndarray]) -> np.ndarray:
    """Per map (B, H, W): whether its ``peak`` lies on the object of its mask, a boolean array of any size. Both
    cover the whole photo (the eval transform squashes it to a square), so the peak's centre is scaled to the
    mask's size."""
    height, width = maps.shape[1:]
    hits = np.zeros(len(maps), dtype=bool)
    for i, (heat, mask) in enumerate(zip(maps, masks)):
        row, col = peak(heat)
        hits[i] = mask[int((row + 0.5) * mask.shape[0] / height), int((col + 0.5) * mask.shape[1] / width)]
    return hits


def top_region(maps: np.ndarray, fraction: float) -> np.ndarray:
    """Boolean (B, H, W): each map's ``round(fraction * pixels)`` highest pixels (at least one); ties go to the
    earlier pixel in row-major order, so that equal maps give equal regions."""
    flat = maps.reshape(len(maps), -1).astype(np.float64)
    count = max(1, round(fraction * flat.shape[1]))
    chosen = np.argsort(-flat, axis=1, kind="stable")[:, :count]
    mask = np.zeros(flat.shape, dtype=bool)
    np.put_along_axis(mask, chosen, True, axis=1)
    return mask.reshape(maps.shape)


def top_iou(a: np.ndarray, b: np.ndarray, fraction: float) -> np.ndarray:
    """Per pair of maps: intersection over union of their top ``fraction`` regions (``top_region``)."""
    top_a, top_b = top_region(a, fraction), top_region(b, fraction)
    return (top_a & top_b).sum(axis=(1, 2)) / (top_a | top_b).sum(axis=(1, 2))


BLOCK_ROWS = 4096
"""Rows of a split read from each store at a time (blocks are also cut at either store's shard boundaries): with the
features x features moments, what bounds the comparison's memory whatever the number of images."""


def _cka(aa: np.ndarray, bb: np.ndarray, ab: np.ndarray) -> float:
    """Linear CKA from the centred cross-products Ac^T Ac, Bc^T Bc and Ac^T Bc; 0 when either side is constant."""
    norm = np.linalg.norm(aa) * np.linalg.norm(bb)
    return float(np.square(ab).sum() / norm) if norm > 0 else 0.0


class CrossMoments:
    """Two representations of the same images, (n, Fa) and (n, Fb), summed block by block in float64: the column
    sums and A^T A, B^T B, A^T B, from which the centred cross-products follow in closed form, in O(F^2) memory
    whatever n. Each side is shifted by its first block's column means before summing (centring ignores a shift),
    so that centring at the end does not subtract large, nearly equal numbers."""

    def __init__(self):
        self.rows = 0

    def update(self, a: np.ndarray, b: np.ndarray) -> None:
        """Add a block of rows (row i of ``a`` and of ``b``: the same image)."""
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        if len(a) != len(b):
            raise ValueError(f"CrossMoments.update: {len(a)} rows of a, {len(b)} of b")
        if not len(a):
            return
        if self.rows == 0:
            self.shift_a, self.shift_b = a.mean(axis=0), b.mean(axis=0)
            self.sum_a, self.sum_b = np.zeros(a.shape[1]), np.zeros(b.shape[1])
            self.aa, self.bb = np.zeros((a.shape[1],) * 2), np.zeros((b.shape[1],) * 2)
            self.ab = np.zeros((a.shape[1], b.shape[1]))
        a, b = a - self.shift_a, b - self.shift_b
        self.rows += len(a)
        self.sum_a += a.sum(axis=0)
        self.sum_b += b.sum(axis=0)
        self.aa += a.T @ a
        self.bb += b.T @ b
        self.ab += a.T @ b

    def centred(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ac^T Ac, Bc^T Bc and Ac^T Bc of the column-centred features: X^T Y - (sum x)(sum y)^T / n."""
        n = self.rows
        return (self.aa - np.outer(self.sum_a, self.sum_a) / n, self.bb - np.outer(self.sum_b, self.sum_b) / n,
                self.ab - np.outer(self.sum_a, self.sum_b) / n)

    def cka(self) -> float:
        """Linear CKA (Kornblith et al., 2019): ``||Bc^T Ac||_F^2 / (||Ac^T Ac||_F ||Bc^T Bc||_F)``, equal to the
        Gram form ``tr(K L) / (||K||_F ||L||_F)`` with ``K = Ac Ac^T``, ``L = Bc Bc^T``."""
        return _cka(*self.centred())

    def shuffled_cka_mean(self) -> float:
        """The mean CKA over every permutation of b's rows, exactly: ``tr K tr L / ((n - 1) ||K||_F ||L||_F)``.

        A permutation P leaves the norms alone and turns ``tr(K L)`` into ``sum_ij K_ij L_p(i)p(j)``. K and L are
        centred (every row and column sums to 0), so for a uniform random P, ``E[L_p(i)p(i)] = tr L / n`` and, for
        i != j, ``E[L_p(i)p(j)] = (sum L - tr L) / (n (n - 1)) = -tr L / (n (n - 1))``; with ``sum_{i != j} K_ij =
        -tr K`` that sums to ``tr K tr L / n + tr K tr L / (n (n - 1)) = tr K tr L / (n - 1)``, and
        ``tr K = tr(Ac^T Ac)``."""
        aa, bb, _ = self.centred()
        norm = np.linalg.norm(aa) * np.linalg.norm(bb)
        return float(np.trace(aa) * np.trace(bb) / ((self.rows - 1) * norm)) if norm > 0 and self.rows > 1 else 0.0


def cross_moments(a: np.ndarray, b: np.ndarray) -> CrossMoments:
    """The moments of two in-memory representations of the same images, summed ``BLOCK_ROWS`` rows at a time."""
    moments = CrossMoments()
    for start in range(0, len(a), BLOCK_ROWS):
        moments.update(a[start:start + BLOCK_ROWS], b[start:start + BLOCK_ROWS])
    return moments


def linear_cka(a: np.ndarray, b: np.ndarray) -> float:
    """Linear CKA between two representations of the same n images, (n, Da) and (n, Db) (``CrossMoments.cka``).
    1 for identical features; unchanged by rotating, uniformly scaling or shifting either."""
    return cross_moments(a, b).cka()


def shuffled_cka_spread(a: np.ndarray, b: np.ndarray, shuffles: int, seed: int) -> dict:
    """The CKA after each of ``shuffles`` seeded shuffles of b's rows (the images no longer match, the feature
    spectra stay): their mean and std, and the rows. It holds the rows in float64 and costs rows x Da x Db per
    shuffle: give it a bounded sample (``compare.cka_sample_rows``). The null's spread shrinks as rows grow (about
    as 1 / rows, like its mean), so the std of a sample smaller than the split overstates the split's."""
    a = np.asarray(a, dtype=np.float64) - np.mean(a, axis=0)
    b = np.asarray(b, dtype=np.float64) - np.mean(b, axis=0)
    aa, bb = a.T @ a, b.T @ b
    rng = np.random.default_rng(seed)
    values = [_cka(aa, bb, a.T @ b[rng.permutation(len(b))]) for _ in range(shuffles)]
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "rows": int(len(a)), "shuffles": shuffles}


def mcnemar_p(a_only_right: int, b_only_right: int) -> float:
    """McNemar's exact test: two-sided binomial test (p = 0.5) on the discordant images; 1 when there are none."""
    discordant = a_only_right + b_only_right
    return float(binomtest(a_only_right, discordant, 0.5).pvalue) if discordant else 1.0


def agreement_counts(labels: np.ndarray, predicted_a: np.ndarray, predicted_b: np.ndarray) -> dict:
    """Both right, only a right, only b right, both wrong; McNemar's p; how many images the two predict apart."""
    right_a, right_b = predicted_a == labels, predicted_b == labels
    counts = {"images": int(labels.size), "both_right": int((right_a & right_b).sum()),
              "a_only_right": int((right_a & ~right_b).sum()), "b_only_right": int((~right_a & right_b).sum()),
              "both_wrong": int((~right_a & ~right_b).sum()),
              "predictions_differ": int((predicted_a != predicted_b).sum())}
    return {**counts, "mcnemar_p": mcnemar_p(counts["a_only_right"], counts["b_only_right"]),
            "mcnemar_test": MCNEMAR_TEST}


FEATURE_SETS = {"a": lambda a, b: a, "b": lambda a, b: b, "concatenated": lambda a, b: np.hstack([a, b])}
"""What each logistic regression reads from a block of both models' features (rows matched)."""


def fit_regressions(a: np.ndarray, b: np.ndarray, labels: np.ndarray, seed: int, bar=None
                    ) -> dict[str, list[tuple[float, Pipeline]]]:
    """Per feature set (``FEATURE_SETS``), a logistic regression for each ``C`` of ``catdog.probe.REGULARISATION``,
    fitted on the rows given. The features are standardised (a scaler fitted on the same rows): two models' features
    differ in scale, and unscaled, their concatenation would favour the model with the larger ones."""
    fitted = {}
    for key, pick in FEATURE_SETS.items():
        fitted[key] = []
        for c in REGULARISATION:
            classifier = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000, random_state=seed))
            fitted[key].append((c, classifier.fit(pick(a, b), labels)))
            if bar is not None:
                bar.update(1)
    return fitted


class RegressionScores:
    """How many rows of a split each fitted regression gets right, counted block by block (the split streamed)."""

    def __init__(self, fitted: dict[str, list[tuple[float, Pipeline]]]):
        self.fitted = fitted
        self.correct = {key: np.zeros(len(candidates), dtype=np.int64) for key, candidates in fitted.items()}
        self.rows = 0

    def update(self, a: np.ndarray, b: np.ndarray, labels: np.ndarray) -> None:
        for key, candidates in self.fitted.items():
            features = FEATURE_SETS[key](a, b)
            self.correct[key] += [int((classifier.predict(features) == labels).sum()) for _, classifier in candidates]
        self.rows += len(labels)

    def accuracy(self, key: str) -> np.ndarray:
        return self.correct[key] / max(self.rows, 1)


def chosen_regressions(test: RegressionScores, val: RegressionScores) -> dict:
    """Per feature set, the val accuracy of the regression whose ``C`` scored best on test, as the linear probe
    chooses it (ties: the stronger regularisation), and that ``C``."""
    accuracy, chosen = {}, {}
    for key, candidates in test.fitted.items():
        best = max(range(len(candidates)), key=lambda i: (test.accuracy(key)[i], -candidates[i][0]))
        accuracy[key], chosen[key] = float(val.accuracy(key)[best]), candidates[best][0]
    return {**accuracy, "C": chosen}


def pair_sentence(a: dict, b: dict, pair: dict, top_fraction: float) -> str:
    """What a pair's numbers show, in one sentence (medians over the images; ``a``, ``b``: the runs' entries)."""
    style_a, style_b = a["cam_style"], b["cam_style"]
    agree, counts, features = pair["cam_agreement"], pair["disagreement"], pair["features"]
    regression = features["logistic_regression"]
    return (f"{b['name']}'s maps cover {style_b['area_above_half_max']['median']:.0%} of the image vs "
            f"{a['name']}'s {style_a['area_above_half_max']['median']:.0%} (entropy "
            f"{style_b['entropy']['median']:.2f} vs {style_a['entropy']['median']:.2f}); their top-{top_fraction:.0%} "
            f"regions overlap IoU {agree['top_iou']['median']:.2f} (Spearman {agree['spearman']['median']:.2f}); "
            f"on {counts['images']} val images {a['name']} is right on {a['val_accuracy_recomputed']:.1%} and "
            f"{b['name']} on {b['val_accuracy_recomputed']:.1%}, only one of them right on "
            f"{counts['a_only_right'] + counts['b_only_right']} (McNemar p = {counts['mcnemar_p']:.2g}); feature CKA "
            f"{features['cka']:.2f} vs {features['cka_shuffled']['mean']:.2f} shuffled, and a logistic regression on "
            f"both {regression['concatenated']:.1%} vs {regression['a']:.1%} / {regression['b']:.1%} alone.")


# ---------------------------------------------------------------------------------------------------- inputs

def stage_dir(out: str | os.PathLike) -> Path:
    """Where ``jobs/compare.py --out OUT`` writes: ``OUT/compare``."""
    return Path(out) / "compare"


def completed_summary(out: str | os.PathLike, run_paths: list[str | os.PathLike]) -> Path | None:
    """``OUT/compare/summary.json`` when it exists and covers exactly these runs, else None."""
    path = stage_dir(out) / "summary.json"
    if not path.is_file():
        return None
    covered = sorted(Path(run["run"]).resolve() for run in read_json(path)["runs"])
    return path if covered == sorted(Path(run).resolve() for run in run_paths) else None


def run_names(paths: list[Path]) -> list[str]:
    """A short distinct name per run: its folder's name, with the parent's where two runs share one."""
    names = [path.name for path in paths]
    names = [f"{path.parent.name}/{path.name}" if names.count(path.name) > 1 else path.name for path in paths]
    return [str(path) if names.count(name) > 1 else name for name, path in zip(names, paths)]


@dataclass
class RunInputs:
    """One run and what the earlier stages wrote for it, checked."""

    name: str
    run: RunDir
    summary: dict
    config: Config
    checkpoint_sha256: str
    store: FeatureStore
    gradcam: dict
    """The run's entry in ``OUT/gradcam/summary.json``."""
    maps: np.ndarray
    """The faithfulness sample's CAMs of the compared method, (N, MAP_SIZE, MAP_SIZE) float32."""
    maps_file: Path


def _gradcam_command(run_paths: list, data_root: Path, out: Path) -> str:
    return f"python jobs/gradcam.py --runs {' '.join(map(str, run_paths))} --data {data_root} --out {out}"


def _compared_method(cfg: CompareConfig, methods: list[str], command: str) -> str:
    if cfg.method is None:
        return "gradcam" if "gradcam" in methods else methods[0]
    if cfg.method not in methods:
        raise CatdogError(f"compare.method={cfg.method}: the Grad-CAM stage ran {methods}; set compare.method to one "
                          f"of them, or run {command} with gradcam.methods=[{cfg.method}] (overrides before --runs)")
    return cfg.method


def _same_data(summaries: list[dict], paths: list[Path], data_root: Path) -> None:
    """All runs trained on one data root: ``summary.json``'s ``data`` where recorded (runs without it were checked
    to have the data root's classes)."""
    recorded = [(path, summary["data"]) for path, summary in zip(paths, summaries) if "data" in summary]
    for path, root in recorded[1:]:
        if root != recorded[0][1]:
            raise CatdogError(f"runs trained on different data: {recorded[0][0]} on {recorded[0][1]}, {path} on "
                              f"{root}; compare runs trained on the same data root")
    if recorded and recorded[0][1] != str(data_root.resolve()):
        log.warning("the runs were trained on %s; comparing on --data %s", recorded[0][1], data_root)


def check_inputs(run_paths: list[str | os.PathLike], data_root: Path, out: Path, cfg: CompareConfig
                 ) -> tuple[list[RunInputs], dict, str]:
    """Every input checked before anything is written: the runs, their feature stores and the Grad-CAM stage's
    maps. Returns the runs, the Grad-CAM summary and the compared method."""
    paths = [Path(p) for p in run_paths]
    if len(paths) < 2:
        raise CatdogError(f"--runs: give at least two run directories to compare (got "
                          f"{' '.join(map(str, paths)) or 'none'})")
    resolved = [p.resolve() for p in paths]
    twice = next((p for p, r in zip(paths, resolved) if resolved.count(r) > 1), None)
    if twice is not None:
        raise CatdogError(f"--runs: {twice} is given twice; list each run once")
    classes = find_classes(data_root)
    runs = [RunDir(p) for p in paths]
    summaries = [run.summary() for run in runs]
    for run, summary in zip(runs, summaries):
        if summary["classes"] != classes:
            raise CatdogError(f"run {run.path} was trained on classes {summary['classes']}, but {data_root} has "
                              f"{classes}; give the data root it was trained on")
    _same_data(summaries, paths, data_root)

    command = _gradcam_command(paths, data_root, out)
    gradcam_path = gradcam_dir(out) / "summary.json"
    if not gradcam_path.is_file():
        raise CatdogError(f"{gradcam_path}: missing; run {command} first")
    gradcam = read_json(gradcam_path)
    if "faithfulness_map_size" not in gradcam:
        raise CatdogError(f"{gradcam_path} was written before the Grad-CAM stage saved its maps; run {command} again "
                          "(it recomputes only what is missing)")
    if Path(gradcam["data"]).resolve() != data_root.resolve():
        raise CatdogError(f"{gradcam_path} was computed on {gradcam['data']}, not {data_root}; run {command}")
    entries = {Path(model["run"]).resolve(): model for model in gradcam["models"]}
    method = _compared_method(cfg, gradcam["methods"], command)

    inputs = []
    for name, run, summary in zip(run_names(paths), runs, summaries):
        if not run.best_checkpoint.is_file():
            raise CatdogError(f"run {run.path}: best.safetensors is missing; train the run again "
                              f"(accelerate launch jobs/train.py --out {run.path} --data {data_root})")
        sha = file_sha256(run.best_checkpoint)
        store = FeatureStore(run.features_dir)
        extract = f"accelerate launch jobs/extract.py --run {run.path} --data {data_root}"
        if store.manifest["checkpoint_sha256"] != sha:
            raise CatdogError(f"feature store {store.path} comes from another checkpoint than {run.best_checkpoint}; "
                              f"rebuild it: {extract} --overwrite")
        missing = [split for split in FEATURE_SPLITS if split not in store.splits]
        if missing:
            raise CatdogError(f"feature store {store.path} has no {', '.join(missing)} split (it has {store.splits}); "
                              f"run {extract} \"extract.splits=[{','.join(FEATURE_SPLITS)}]\"")
        entry = entries.get(run.path.resolve())
        if entry is None or entry.get("checkpoint_sha256") != sha or method not in entry["methods"]:
            why = ("does not cover it" if entry is None else "is from another checkpoint" if
                   entry.get("checkpoint_sha256") != sha else f"has no {method} maps")
            raise CatdogError(f"{gradcam_path} {why} (run {run.path}); run {command}")
        maps_file = gradcam_path.parent / entry["methods"][method]["faithfulness_maps"]
        if not maps_file.is_file():
            raise CatdogError(f"{maps_file}: missing (named by {gradcam_path}); run {command}")
        inputs.append(RunInputs(name, run, summary, run.config(), sha, store, entry,
                                np.load(maps_file).astype(np.float32), maps_file))
    for split, other in itertools.product(FEATURE_SPLITS, inputs[1:]):
        for _ in aligned_blocks(inputs[0].store, other.store, split, features=False):
            pass  # each block's paths checked, a block at a time
    return inputs, gradcam, method


# ---------------------------------------------------------------------------------------------------- per run

def parameter_counts(config: Config, num_classes: int) -> tuple[int, int]:
    """All parameters and the trainable ones (after ``model.freeze_stages``), of the network built untrained."""
    network = models.create(config.model.name, num_classes, pretrained="none", drop_rate=config.model.drop_rate,
                            freeze_stages=config.model.freeze_stages, cam_layer=config.model.cam_layer)
    return (sum(p.numel() for p in network.parameters()),
            sum(p.numel() for p in network.parameters() if p.requires_grad))


def _prediction_identity(item: RunInputs, data_root: Path) -> dict:
    """What a run's val predictions depend on: a stored part is reused only when all of it matches."""
    config = item.config
    return {"run": str(item.run.path.resolve()), "checkpoint_sha256": item.checkpoint_sha256,
            "data": str((data_root / SPLIT).resolve()), "precision": resolve_precision("run", item.summary),
            "tta_hflip": config.train.tta_hflip, "channels_last": config.train.channels_last,
            "transform": config.data.model_dump(mode="json"), "device": "cuda" if torch.cuda.is_available() else "cpu"}


def val_predictions(item: RunInputs, data_root: Path, parts: Path) -> dict:
    """The run's val predictions: the ones training wrote with its own val evaluation (``RunDir.val_predictions_path``),
    or, for a run trained before it wrote them, ``catdog.predict.predict`` on ``DATA/val`` as a labelled folder (it
    evaluates as training did), kept in ``parts/`` with their identity, which is written last. Returns ``paths``
    (relative to the data root), ``labels``, ``predicted``, ``probability`` (of the predicted class) and
    ``accuracy``. The file is read a row at a time and only these are kept (a path and three numbers an image, never
    the N x classes probabilities): ``disagreement`` joins two runs' predictions by path."""
    csv_path = item.run.val_predictions_path
    if not csv_path.is_file():
        folder = parts / f"predictions-{_file_name(item.name)}-{item.checkpoint_sha256[:12]}"
        identity, identity_path = _prediction_identity(item, data_root), folder / "identity.json"
        if identity_path.is_file() and read_json(identity_path) == identity:
            log.info("%s: reusing the val predictions in %s", item.run.path, folder)
        else:
            identity_path.unlink(missing_ok=True)
            predict(item.run.path, folder, labelled=data_root / SPLIT)
            write_json(identity_path, identity)
        csv_path = folder / "predictions.csv"
    index = {name: i for i, name in enumerate(item.summary["classes"])}
    paths, labels, predicted, probability = [], [], [], []
    with open_text(csv_path) as handle:
        for row in csv.DictReader(handle):
            paths.append(f"{SPLIT}/{'/'.join(Path(row['path']).parts[-2:])}")  # val/<class>/<file>
            labels.append(index[row["label"]])
            predicted.append(index[row["predicted"]])
            probability.append(float(row[PROBABILITY_PREFIX + row["predicted"]]))
    labels, predicted = np.array(labels, dtype=int), np.array(predicted, dtype=int)
    return {"paths": paths, "labels": labels, "predicted": predicted, "probability": np.array(probability),
            "accuracy": float((labels == predicted).mean())}


def object_masks(data_root: Path, images: list[str]) -> tuple[list[np.ndarray | None], str | None]:
    """Each image's object mask (``DATA/masks/<split>/<class>/<file stem>.png``, non-zero = object) or None, and a
    note when there are none at all."""
    folder = data_root / MASKS
    if not folder.is_dir():
        return [None] * len(images), f"not available: {data_root} has no {MASKS}/ folder"
    masks = []
    for image in images:
        path = folder / Path(image).with_suffix(".png")
        if path.is_file():
            with Image.open(path) as mask:
                masks.append(np.asarray(mask.convert("L")) > 0)
        else:
            masks.append(None)
    return masks, None


def cam_style(maps: np.ndarray, masks: list[np.ndarray | None], note: str | None) -> dict:
    """A model's map style over the sample: area at or above half the maximum, entropy, and the pointing game on the
    images that have a mask (null, with a note, when none has)."""
    have = [i for i, mask in enumerate(masks) if mask is not None]
    pointing = None
    if have:
        hits = pointing_hits(maps[have], [masks[i] for i in have])
        pointing = {"hits": int(hits.sum()), "images": len(have), "accuracy": float(hits.mean())}
        if len(have) < len(masks):
            note = (f"{len(masks) - len(have)} of the {len(masks)} images have no mask under {MASKS}/; scored "
                    "without them")
    elif note is None:
        note = f"not available: no mask under {MASKS}/ for any of these {len(masks)} images"
    return {"images": len(maps), "area_above_half_max": stats(area_above_half_max(maps)),
            "entropy": stats(normalised_entropy(maps)), "pointing_game": pointing, "pointing_game_note": note}


# ---------------------------------------------------------------------------------------------------- per pair

def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _block_cuts(store_a: FeatureStore, store_b: FeatureStore, split: str) -> np.ndarray:
    """The first row of every block both stores are read in, and the split's row count last: each store's shard
    starts, and every ``BLOCK_ROWS`` rows between them."""
    rows = store_a.num_rows(split)
    if store_b.num_rows(split) != rows:
        raise CatdogError(f"feature stores {store_a.path} and {store_b.path} hold {rows} and "
                          f"{store_b.num_rows(split)} {split} images; extract both from the same data root "
                          "(accelerate launch jobs/extract.py --run RUN --data DATA_ROOT --overwrite)")
    starts = [info.first_row for store in (store_a, store_b) for info in store.shard_infos(split)]
    return np.unique(np.concatenate([starts, np.arange(0, rows, BLOCK_ROWS), [rows]])).astype(np.int64)


def _store_blocks(store: FeatureStore, split: str, cuts: np.ndarray, fields: tuple[str, ...]) -> Iterator[dict]:
    """One store's rows between consecutive ``cuts`` (which hold its shard starts), each shard opened once."""
    for info in store.shard_infos(split):
        first, last = np.searchsorted(cuts, [info.first_row, info.first_row + info.rows])
        with h5py.File(store.path / info.file, "r") as f:
            for start, stop in zip(cuts[first:last], cuts[first + 1:last + 1]):
                yield {field: f[field][start - info.first_row:stop - info.first_row] for field in fields}


def aligned_blocks(store_a: FeatureStore, store_b: FeatureStore, split: str, features: bool = True
                   ) -> Iterator[tuple[int, np.ndarray | None, np.ndarray | None, np.ndarray]]:
    """Both stores' rows of a split in row order, ``BLOCK_ROWS`` at most at a time and cut at either store's shard
    boundaries (so stores of different shard sizes line up): ``(first row, a's features, b's features, labels)``.
    A row id is the image's place in its split's listing (sorted class, then file name), so two stores of the same
    images hold them at the same rows; each block's paths are checked to be the same in both, so that nothing needs
    all rows of either store."""
    cuts = _block_cuts(store_a, store_b, split)
    fields = ("paths", "labels", "features") if features else ("paths", "labels")
    blocks = zip(cuts[:-1], _store_blocks(store_a, split, cuts, fields), _store_blocks(store_b, split, cuts, fields))
    for start, block_a, block_b in blocks:
        paths_a, paths_b = decode_paths(block_a["paths"]), decode_paths(block_b["paths"])
        if paths_a != paths_b:
            row = next(i for i, (x, y) in enumerate(zip(paths_a, paths_b)) if x != y)
            raise CatdogError(f"feature stores {store_a.path} and {store_b.path} hold different {split} images "
                              f"(row {start + row}: {paths_a[row]} vs {paths_b[row]}); extract both from the same "
                              "data root (accelerate launch jobs/extract.py --run RUN --data DATA_ROOT --overwrite)")
        yield int(start), block_a.get("features"), block_b.get("features"), block_a["labels"]


def matched_readable(store_a: FeatureStore, store_b: FeatureStore, split: str) -> np.ndarray:
    """(N,) bool by row id: the rows compared, those readable in both stores (``FeatureStore.readable``)."""
    return store_a.readable(split) & store_b.readable(split)


def readable_blocks(store_a: FeatureStore, store_b: FeatureStore, split: str
                    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """``aligned_blocks`` less the rows either store could not decode (``matched_readable``): ``(row ids, a's
    features, b's features, labels)`` of each block that keeps any."""
    readable = matched_readable(store_a, store_b, split)
    for first, a, b, labels in aligned_blocks(store_a, store_b, split):
        keep = readable[first:first + len(labels)]
        if keep.any():
            yield first + np.flatnonzero(keep), a[keep], b[keep], labels[keep]


class RowSample:
    """The chosen rows of both stores' features and their labels, gathered while a split streams past."""

    def __init__(self, rows: np.ndarray):
        self.rows = np.asarray(rows, dtype=np.int64)
        """Sorted, distinct row ids (each one in the blocks ``update`` gets)."""
        self.a = self.b = None
        self.labels = np.empty(len(self.rows), dtype=np.int64)

    def update(self, rows: np.ndarray, a: np.ndarray, b: np.ndarray, labels: np.ndarray) -> None:
        """Keep the chosen rows of a block of ascending row ids ``rows``."""
        if self.a is None:
            self.a = np.empty((len(self.rows), a.shape[1]), dtype=a.dtype)
            self.b = np.empty((len(self.rows), b.shape[1]), dtype=b.dtype)
        low, high = np.searchsorted(self.rows, [rows[0], rows[-1] + 1])
        inside = np.searchsorted(rows, self.rows[low:high])
        self.a[low:high], self.b[low:high], self.labels[low:high] = a[inside], b[inside], labels[inside]


def feature_comparison(a: RunInputs, b: RunInputs, cfg: CompareConfig, bar) -> dict:
    """CKA of the val features against its shuffled baseline; logistic regressions on each and on both. Every split
    is streamed (``readable_blocks``): the CKA from the F x F moments of every val row, the baseline's mean in closed
    form over every row and its spread from ``compare.cka_shuffles`` shuffles of ``compare.cka_sample_rows`` seeded
    val rows; the regressions fitted on ``compare.regression_sample_rows`` train rows (stratified, what bounds the fit's
    memory and time; only train's labels, 8 bytes a row, are read whole to stratify), and test and val scored in
    full."""
    store_a, store_b = a.store, b.store
    readable = np.flatnonzero(matched_readable(store_a, store_b, "train"))
    train = RowSample(readable[stratified_rows(store_a.labels("train")[readable], cfg.regression_sample_rows,
                                               cfg.seed)])
    for rows, block_a, block_b, labels in readable_blocks(store_a, store_b, "train"):
        train.update(rows, block_a, block_b, labels)
    fitted = fit_regressions(train.a, train.b, train.labels, cfg.seed, bar)
    test = RegressionScores(fitted)
    for _, block_a, block_b, labels in readable_blocks(store_a, store_b, "test"):
        test.update(block_a, block_b, labels)

    readable = np.flatnonzero(matched_readable(store_a, store_b, SPLIT))
    images = len(readable)
    moments, val = CrossMoments(), RegressionScores(fitted)
    sample = RowSample(np.sort(np.random.default_rng(cfg.seed).choice(readable, min(images, cfg.cka_sample_rows),
                                                                      replace=False)))
    for rows, block_a, block_b, labels in readable_blocks(store_a, store_b, SPLIT):
        moments.update(block_a, block_b)
        sample.update(rows, block_a, block_b, labels)
        val.update(block_a, block_b, labels)
    spread = shuffled_cka_spread(sample.a, sample.b, cfg.cka_shuffles, cfg.seed)
    bar.update(1)
    return {"images": images, "cka": moments.cka(),
            "cka_shuffled": {"mean": moments.shuffled_cka_mean(), "std": spread["std"],
                             "shuffles": cfg.cka_shuffles, "std_rows": spread["rows"]},
            "logistic_regression": {**chosen_regressions(test, val), "fit_split": "train",
                                    "fit_rows": int(len(train.rows)), "chosen_on": "test", "scored_on": SPLIT}}


def disagreement(pa: dict, pb: dict, classes: list[str], count: int, seed: int) -> dict:
    """Agreement counts on the images both runs predicted (a's order), and as examples up to ``count`` of those
    they predict apart (a seeded sample, in listing order) with each run's prediction and its probability. The join
    by path indexes b's val paths: O(N) strings, the same order as the predictions themselves."""
    rows_b = {path: row for row, path in enumerate(pb["paths"])}
    shared = [row for row, path in enumerate(pa["paths"]) if path in rows_b]
    pairs = [(row, rows_b[pa["paths"][row]]) for row in shared]
    predicted_a = pa["predicted"][shared]
    predicted_b = pb["predicted"][[b for _, b in pairs]]
    apart = np.flatnonzero(predicted_a != predicted_b)
    examples = []
    for pick in sample_indices(len(apart), count, seed) if apart.size else []:
        row_a, row_b = pairs[apart[pick]]
        examples.append({"image": pa["paths"][row_a], "label": classes[pa["labels"][row_a]],
                         **{key: {"predicted": classes[found["predicted"][row]],
                                  "probability": float(found["probability"][row])}
                            for key, found, row in (("a", pa, row_a), ("b", pb, row_b))}})
    return {**agreement_counts(pa["labels"][shared], predicted_a, predicted_b), "examples": examples}


def true_class_maps(item: RunInputs, data_root: Path, images: list[str], method: str, batch_size: int,
                    bar) -> dict[str, np.ndarray]:
    """The run's CAMs (at its input size) for the true class of each val image named, by relative path."""
    if not images:
        return {}
    classes = item.summary["classes"]
    dataset = open_split(data_root, SPLIT, item.config.data, classes=classes)
    where = {dataset.relative_path(i): i for i in range(len(dataset))}
    device = inference_device()
    network = item.run.load_model()[0].to(device)
    maps = []
    for batch, labels, _ in DataLoader(Subset(dataset, [where[image] for image in images]), batch_size=batch_size,
                                       **loader_options(item.config.data.num_workers, device, persistent=False)):
        maps.append(class_activation_maps(network, method, batch.to(device), labels))
        bar.update(len(batch))
    return dict(zip(images, np.concatenate(maps)))


def draw_montage(rows: list[dict], columns: list[dict], data_root: Path, path: Path) -> None:
    """The disagreements: per row the photo, then each model's map titled with its prediction (``cam.draw_grid``)."""
    photos = [display_photo(data_root / row["image"]) for row in rows]
    draw_grid(photos, [f"{row['label']}: {printable_path(Path(row['image']).name)}" for row in rows], columns, path)


def draw_cam_style(runs: list[dict], per_run: list[dict[str, np.ndarray]], path: Path) -> None:
    """Per model, box plots of the area at or above half the maximum and of the normalised entropy (the pointing
    game's accuracy under the model's name, where there are masks)."""
    figure = Figure(figsize=(max(7.0, 1.8 * len(runs) + 4), 3.8), layout="constrained")
    axes = figure.subplots(1, 2)
    names = [run["name"] + (f"\npointing {run['cam_style']['pointing_game']['accuracy']:.0%}"
                            if run["cam_style"]["pointing_game"] else "") for run in runs]
    for axis, key, title in ((axes[0], "area", "share of the map >= half its maximum"),
                             (axes[1], "entropy", "entropy (0: one pixel, 1: uniform)")):
        axis.boxplot([values[key] for values in per_run], tick_labels=names)
        axis.set_ylim(-0.02, 1.02)
        axis.set_title(title, fontsize=10)
        axis.tick_params(axis="x", labelsize=8)
        axis.grid(True, axis="y", alpha=0.3)
    figure.suptitle(f"Grad-CAM map style over the same {len(per_run[0]['area'])} val images", fontsize=11)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)


# ---------------------------------------------------------------------------------------------------- the stage

def _run_entry(item: RunInputs, predictions: dict, style: dict) -> dict:
    summary, config = item.summary, item.config
    parameters, trainable = parameter_counts(config, len(summary["classes"]))
    return {"name": item.name, "run": str(item.run.path), "model": config.model.name,
            "test_accuracy": summary["best_test_accuracy"], "val_accuracy": summary["val_accuracy"],
            "val_accuracy_recomputed": predictions["accuracy"],
            "linear_probe_test_accuracy": summary.get("linear_probe_test_accuracy"),
            "linear_probe_val_accuracy": summary.get("linear_probe_val_accuracy"),
            "train_seconds": summary["train_seconds"], "images_per_second": summary["images_per_second"],
            "epochs": summary.get("epochs"), "parameters": parameters, "trainable_parameters": trainable,
            "image_size": config.data.image_size, "tta_hflip": summary.get("tta_hflip", False),
            "mixed_precision": summary.get("mixed_precision"), "device": summary.get("device"),
            "checkpoint_sha256": item.checkpoint_sha256, "cam_style": style}


def _pair_identity(a: RunInputs, b: RunInputs, method: str, data_root: Path, cfg: CompareConfig) -> dict:
    """What a pair's results depend on: a stored pair is reused only when all of it matches."""
    return {"a": a.name, "b": b.name, "method": method,
            "predictions": [_prediction_identity(x, data_root) for x in (a, b)],
            "maps": [file_sha256(x.maps_file) for x in (a, b)],
            "features": [[shard["sha256"] for shard in x.store.manifest["shards"]] for x in (a, b)],
            "compare": cfg.model_dump(mode="json"), "regularisation": list(REGULARISATION)}


def _stored_pair(part: Path, identity: dict, stage: Path) -> dict | None:
    """A finished pair's results (its montage drawn), when they were computed from the same inputs."""
    if not part.is_file():
        return None
    stored = read_json(part)
    montage = stored["result"]["disagreement"]["montage"]
    if stored["identity"] != identity or (montage is not None and not (stage / montage).is_file()):
        return None
    return stored["result"]


def _compare_pairs(inputs: list[RunInputs], predictions: list[dict], pending: list[tuple[int, int, dict, Path]],
                   method: str, data_root: Path, stage: Path, config: Config) -> dict[tuple[int, int], dict]:
    """The pairs not stored yet: features, disagreements with their montage (each run's CAMs computed once for
    every montage it appears in), map agreement; each pair kept in ``parts/`` once its montage is drawn."""
    cfg, classes = config.compare, inputs[0].summary["classes"]
    with progress_bar(total=len(pending) * (1 + 3 * len(REGULARISATION)), desc="features", unit="fit") as bar:
        features = {(i, j): feature_comparison(inputs[i], inputs[j], cfg, bar) for i, j, _, _ in pending}
    found = {(i, j): disagreement(predictions[i], predictions[j], classes, cfg.montage_images, cfg.seed)
             for i, j, _, _ in pending}
    needed: list[set[str]] = [set() for _ in inputs]
    for (i, j), counts in found.items():
        for example in counts["examples"]:
            needed[i].add(example["image"])
            needed[j].add(example["image"])
    with progress_bar(total=sum(map(len, needed)), desc="montage CAMs", unit="img") as bar:
        cams = [true_class_maps(item, data_root, sorted(images), method, config.gradcam.batch_size, bar)
                for item, images in zip(inputs, needed)]
    results = {}
    for i, j, identity, part in pending:
        a, b, counts = inputs[i], inputs[j], found[(i, j)]
        examples, montage = counts.pop("examples"), None
        if examples:
            montage = f"disagreements-{_file_name(a.name)}-vs-{_file_name(b.name)}.png"
            columns = [{"title": f"{x.name}\n{method}, true class",
                        "maps": np.stack([cams[n][e["image"]] for e in examples]),
                        "predictions": [{**e[key], "label": e["label"]} for e in examples]}
                       for key, x, n in (("a", a, i), ("b", b, j))]
            draw_montage(examples, columns, data_root, stage / montage)
        result = {"a": a.name, "b": b.name,
                  "train_time_ratio": a.summary["train_seconds"] / b.summary["train_seconds"],
                  "disagreement": {**counts, "montage": montage, "examples": examples},
                  "cam_agreement": {"images": int(len(a.maps)), "spearman": stats(spearman(a.maps, b.maps)),
                                    "top_iou": stats(top_iou(a.maps, b.maps, cfg.top_fraction))},
                  "features": features[(i, j)]}
        write_json(part, {"identity": identity, "result": result})  # after its montage: the pair is complete
        results[(i, j)] = result
    return results


def compare(run_paths: list[str | os.PathLike], data_root: str | os.PathLike, out: str | os.PathLike,
            config: Config) -> dict:
    """Compare every pair of the runs; write ``OUT/compare/{summary.json,config.yaml,cam_style.png}`` and a montage
    per pair whose predictions differ. Returns the summary."""
    cfg, data_root, out = config.compare, Path(data_root), Path(out)
    inputs, gradcam, method = check_inputs(run_paths, data_root, out, cfg)
    stage = stage_dir(out)
    parts = stage / "parts"

    predictions = [val_predictions(item, data_root, parts) for item in inputs]
    for item, found in zip(inputs, predictions):
        if found["accuracy"] != item.summary["val_accuracy"]:
            log.warning("%s: val accuracy recomputed from its checkpoint is %.4f, summary.json says %.4f (another "
                        "device or precision?)", item.run.path, found["accuracy"], item.summary["val_accuracy"])
    masks, note = object_masks(data_root, gradcam["faithfulness_images"])
    runs = [_run_entry(item, found, cam_style(item.maps, masks, note)) for item, found in zip(inputs, predictions)]

    pairs, pending = {}, []
    for i, j in itertools.combinations(range(len(inputs)), 2):
        a, b = inputs[i], inputs[j]
        identity = _pair_identity(a, b, method, data_root, cfg)
        part = parts / f"pair-{_file_name(a.name)}-vs-{_file_name(b.name)}.json"
        stored = _stored_pair(part, identity, stage)
        if stored is None:
            pending.append((i, j, identity, part))
        else:
            log.info("%s vs %s: reusing %s", a.name, b.name, part)
            pairs[(i, j)] = stored
    if pending:
        pairs.update(_compare_pairs(inputs, predictions, pending, method, data_root, stage, config))
    by_name = {run["name"]: run for run in runs}
    pairs = [pairs[key] for key in itertools.combinations(range(len(inputs)), 2)]
    for pair in pairs:
        pair["sentence"] = pair_sentence(by_name[pair["a"]], by_name[pair["b"]], pair, cfg.top_fraction)

    draw_cam_style(runs, [{"area": area_above_half_max(item.maps), "entropy": normalised_entropy(item.maps)}
                          for item in inputs], stage / "cam_style.png")
    summary = {"data": str(data_root.resolve()), "split": SPLIT, "method": method, "target": gradcam["target"],
               "top_fraction": cfg.top_fraction, "map_size": gradcam["faithfulness_map_size"],
               "gradcam": str(gradcam_dir(out) / "summary.json"), "cam_style_plot": "cam_style.png",
               "runs": runs, "pairs": pairs}
    save_config(config, stage / "config.yaml")
    write_json(stage / "summary.json", summary)  # last: marks the stage complete
    return summary


if __name__ == "__main__":  # python -m catdog.compare OUT RUN...: exit 0 when OUT's comparison covers these runs
    import sys

    done = completed_summary(sys.argv[1], sys.argv[2:])
    print(done or stage_dir(sys.argv[1]) / "summary.json")
    sys.exit(0 if done else 1)
