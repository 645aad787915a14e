"""Concepts mined from the feature store, in the spirit of CRAFT (Fel et al., CVPR 2023).

For each shown class (``catdog.classes.classes_shown``: at most ``figures.max_classes``, the most confused first),
the non-negative spatial activations of its images in ``concepts.split`` (every spatial position of every image
is a row of C channels) are factorised as ``A ~ U W`` with scikit-learn's ``MiniBatchNMF``: ``W`` (k, C) holds k
concept directions in channel space, ``U`` (positions, k) how strongly each position shows each concept. The NMF
is fitted on the class's **reservoir**: a seeded uniform sample of ``reservoir_images`` of its images (all of them
when it has no more), so its time and memory do not grow with the number of images.

Per concept:

* **montage**: the ``images_per_concept`` images where the concept is strongest (each image's highest position),
  over all the class's images, each cropped to ``crop_cells`` x ``crop_cells`` cells around that position, with the
  concept's map overlaid;
* **importance**: the mean drop of the class's logit, through the trained head, when the concept's part
  ``U[:, j] W[j]`` is removed from the spatial maps of the class's ``importance_split`` images before pooling
  (for average pooling: removed from the pooled features), against a **baseline**: the same removal, with the
  same coefficients, of a random non-negative direction of equal norm (the mean over ``random_directions``
  seeded directions). A concept that matters beats its baseline by a wide margin;
* its map on each Grad-CAM sample image of the class (``gradcam.images_per_class``, ``gradcam.seed``), beside
  that image's CAM (``gradcam.methods[0]``).

The work fans out over the store's shards (``catdog.cluster.map_shards``: Ray tasks that read their own shard, or
get its bytes where their node does not see the run directory); the driver only merges what they return. Each
task gets its shard's readable rows (``FeatureStore.shard_readable``): an image that could not be decoded is in no
reservoir and no sum.

1. **sample**, a task per shard of ``split``: every row gets a seeded random key (a hash of ``seed`` and its row id);
   per class a task returns its shard's ``reservoir_images`` smallest keys, and the smallest over all shards are the
   reservoir (bottom-k sampling: exact whatever the order tasks finish in);
2. **gather**, a task per shard holding reservoir rows: those rows' maps;
3. **fit**, a Ray task per class: ``MiniBatchNMF.partial_fit`` on the reservoir, ``batch_images`` images at a time,
   ``passes`` times, each pass in a seeded order;
4. **measure**, a task per shard of ``split`` (each concept's top images, coefficient sum, reconstruction error) and
   of ``importance_split`` (the importance sums); sums and top-k merge.

Memory: the driver holds the reservoirs of the classes it computes (classes x ``reservoir_images`` x C x h x w,
float16 as stored) until the fit tasks take them, and the merged sums; a task holds one shard's labels and
``batch_images`` maps. Nothing grows with the number of images. Each (run, class) result is kept in
``RUN/concepts/parts/`` with what it was computed from, so a rerun reuses finished classes; ``index.json`` is written
last, with the tasks each node ran (``nodes``). Ray workers import this module, so torch and grad-cam are imported
only where needed.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from catdog.classes import classes_shown
from catdog.cluster import ShardJob, map_shards, ray_session, remote_task
from catdog.config import Config, ConceptsConfig, save_config
from catdog.errors import CatdogError
from catdog.io import atomic_path, file_sha256, printable_path, read_json, write_json
from catdog.progress import progress_bar
from catdog.run import RunDir
from catdog.store import FeatureStore, decode_paths, load_store_image, require_maps_and_images
from catdog.topact import TopK, empty_topk, merge_topk, update_topk

log = logging.getLogger(__name__)

OVERLAY_COLORMAP = "jet"
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


# ---------------------------------------------------------------------------------------------------- the reservoir

def reservoir_keys(rows: np.ndarray, seed: int) -> np.ndarray:
    """A seeded random key in [0, 1) per row id (splitmix64 of the seed and the row): the same on every node."""
    with np.errstate(over="ignore"):
        z = np.asarray(rows, dtype=np.int64).astype(np.uint64) + np.uint64(seed % 2**64) * _GOLDEN + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


Sample = dict[int, tuple[np.ndarray, np.ndarray]]
"""Per class label, a bottom-k sample: ``(keys, row ids)``, smallest key first."""


def _smallest(keys: np.ndarray, rows: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((rows, keys))[:size]
    return keys[order], rows[order]


def sample_shard(shard, labels: list[int], size: int, seed: int, readable: np.ndarray | None = None) -> Sample:
    """A sample task: per class label, the shard's ``size`` rows of smallest ``reservoir_keys`` among its
    ``readable`` rows (``FeatureStore.shard_readable``; None: all)."""
    found, rows, _ = _readable_rows(shard, readable)
    keys = reservoir_keys(rows, seed)
    return {label: _smallest(keys[found == label], rows[found == label], size) for label in labels}


def merge_samples(a: Sample, b: Sample, size: int) -> Sample:
    """Samples of disjoint rows as one: per class, the ``size`` smallest keys of both."""
    merged = dict(a)
    for label, (keys, rows) in b.items():
        if label in merged:
            keys, rows = np.concatenate([merged[label][0], keys]), np.concatenate([merged[label][1], rows])
        merged[label] = _smallest(keys, rows, size)
    return merged


def read_maps(shard, local: np.ndarray) -> np.ndarray:
    """A gather task: the float16 spatial maps of the shard's rows at ascending local indices ``local``."""
    return FeatureStore.read_rows(shard["spatial"], local)


# ---------------------------------------------------------------------------------------------------- the NMF

def positions(maps: np.ndarray) -> np.ndarray:
    """(B, C, h, w) maps as (B * h * w, C) rows, one per position (image-major), clipped at 0 for the NMF."""
    batch, channels, height, width = maps.shape
    return np.maximum(maps.transpose(0, 2, 3, 1).reshape(-1, channels), 0)


def coefficient_maps(u: np.ndarray, batch: int, grid: tuple[int, int]) -> np.ndarray:
    """``positions``-ordered coefficients (B * h * w, k) as (B, k, h, w) concept maps."""
    return u.reshape(batch, grid[0], grid[1], -1).transpose(0, 3, 1, 2)


def fit_nmf(maps: np.ndarray, cfg: ConceptsConfig):
    """A ``MiniBatchNMF`` of ``cfg.concepts`` components fitted by ``partial_fit`` on the positions of ``maps``
    (R, C, h, w), ``batch_images`` images at a time, ``passes`` times, each pass in a seeded order."""
    from sklearn.decomposition import MiniBatchNMF

    nmf = MiniBatchNMF(n_components=cfg.concepts, init="nndsvda", random_state=cfg.seed)
    rng = np.random.default_rng([cfg.seed, 3])
    for _ in range(cfg.passes):
        order = rng.permutation(len(maps))
        for start in range(0, len(order), cfg.batch_images):
            nmf.partial_fit(positions(maps[order[start:start + cfg.batch_images]].astype(np.float32)))
    return nmf


def fit_class(maps: np.ndarray, cfg: ConceptsConfig) -> tuple[np.ndarray, int]:
    """A fit task: a class's concept directions (k, C) from its reservoir's maps, and the NMF's step count."""
    nmf = fit_nmf(maps, cfg)
    return nmf.components_.astype(np.float64), int(getattr(nmf, "n_steps_", 0))


def transform(components: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Non-negative coefficients U of rows ``x`` (n, C) on fixed ``components`` W (k, C), by non-negative least
    squares (multiplicative updates from the least-squares solution clipped at 0; deterministic)."""
    w = components.astype(np.float64)
    gram = w @ w.T
    xw = x.astype(np.float64) @ w.T
    u = np.maximum(np.linalg.lstsq(gram, xw.T, rcond=None)[0].T, 1e-6)
    for _ in range(200):
        u *= xw / np.maximum(u @ gram, 1e-12)
    return u


def random_directions(components: np.ndarray, count: int, seed) -> np.ndarray:
    """(k, count, C): for each concept, ``count`` random non-negative directions (|Gaussian|) scaled to the
    concept direction's norm."""
    rng = np.random.default_rng(seed)
    k, channels = components.shape
    directions = np.abs(rng.standard_normal((k, count, channels)))
    directions /= np.linalg.norm(directions, axis=2, keepdims=True)
    return directions * np.linalg.norm(components, axis=1)[:, None, None]


# ---------------------------------------------------------------------------------------------------- measuring

@dataclass(frozen=True)
class ScanStats:
    """A class's concepts over some of its images: each concept's top images (by its strongest position), the sum of
    its coefficients, the squared residual and squared norm of the positions, and their count. They merge."""

    top: TopK
    sums: np.ndarray
    residual: float
    total: float
    positions: int

    @classmethod
    def empty(cls, k: int, k_images: int) -> "ScanStats":
        return cls(empty_topk(k, k_images), np.zeros(k), 0.0, 0.0, 0)

    def add(self, maps: np.ndarray, rows: np.ndarray, components: np.ndarray) -> "ScanStats":
        """With the images ``rows`` (their float32 ``maps``) folded in."""
        x = positions(maps)
        u = transform(components, x)
        per_image = coefficient_maps(u, len(rows), maps.shape[2:]).reshape(len(rows), len(components), -1).max(axis=2)
        return ScanStats(update_topk(self.top, per_image, rows), self.sums + u.sum(axis=0),
                         self.residual + float(((x - u @ components) ** 2).sum()),
                         self.total + float((x.astype(np.float64) ** 2).sum()), self.positions + len(x))

    def merge(self, other: "ScanStats") -> "ScanStats":
        return ScanStats(merge_topk([self.top, other.top]), self.sums + other.sums, self.residual + other.residual,
                         self.total + other.total, self.positions + other.positions)


@dataclass(frozen=True)
class ImportanceStats:
    """Sums over some of a class's images, per concept: its logit drop and square, the drop along its random
    directions (the mean over them) and square, how often it beats them; and of the logit. They add up."""

    images: int
    drop: np.ndarray
    drop_sq: np.ndarray
    random: np.ndarray
    random_sq: np.ndarray
    beats: np.ndarray
    logit: float

    @classmethod
    def of(cls, drop: np.ndarray, random_drop: np.ndarray, logit: np.ndarray) -> "ImportanceStats":
        """From per-image drops (B, k), random drops (B, k, R) and logits (B,)."""
        random = random_drop.mean(axis=2)
        return cls(len(drop), drop.sum(axis=0), (drop ** 2).sum(axis=0), random.sum(axis=0), (random ** 2).sum(axis=0),
                   (drop > random).sum(axis=0), float(logit.sum()))

    def merge(self, other: "ImportanceStats") -> "ImportanceStats":
        return ImportanceStats(self.images + other.images, self.drop + other.drop, self.drop_sq + other.drop_sq,
                               self.random + other.random, self.random_sq + other.random_sq,
                               self.beats + other.beats, self.logit + other.logit)

    def summary(self) -> dict:
        """Means over the images (standard deviations over them too)."""
        n = max(self.images, 1)

        def std(total, squares):
            return np.sqrt(np.maximum(squares / n - (total / n) ** 2, 0))

        return {"importance": self.drop / n, "importance_std": std(self.drop, self.drop_sq),
                "random_importance": self.random / n, "random_importance_std": std(self.random, self.random_sq),
                "beats_random": self.beats / n, "logit": self.logit / n, "images": self.images}


def importance_batch(network, maps: np.ndarray, label: int, components: np.ndarray,
                     baselines: np.ndarray) -> ImportanceStats:
    """Drops of the class's logit (``network.head(network.pool(maps))``) when each concept's part, or the same
    coefficients along each of its random ``baselines`` (k, R, C), is subtracted from the float32 ``maps``."""
    import torch

    k, repeats = baselines.shape[:2]
    batch, channels, height, width = maps.shape
    u = coefficient_maps(transform(components, positions(maps)), batch, (height, width))  # (B, k, h, w)
    fmap = torch.from_numpy(maps)

    def logit(removed: np.ndarray) -> np.ndarray:
        shifted = fmap - torch.from_numpy(removed.astype(np.float32))
        return network.head(network.pool(shifted))[:, label].double().numpy()

    with torch.no_grad():
        before = network.head(network.pool(fmap))[:, label].double().numpy()
        drop, random_drop = np.empty((batch, k)), np.empty((batch, k, repeats))
        for j in range(k):
            drop[:, j] = before - logit(np.einsum("bhw,c->bchw", u[:, j], components[j]))
            for r in range(repeats):
                random_drop[:, j, r] = before - logit(np.einsum("bhw,c->bchw", u[:, j], baselines[j, r]))
    return ImportanceStats.of(drop, random_drop, before)


def _readable_rows(shard, readable: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The labels, row ids and places in the shard of its ``readable`` rows (None: all)."""
    local = np.arange(shard["row_ids"].shape[0]) if readable is None else np.flatnonzero(readable)
    return shard["labels"][:][local], shard["row_ids"][:][local], local


def _class_batches(shard, labels: list[int], batch_images: int, readable: np.ndarray | None):
    """``(label, row ids, float32 maps)`` of the shard's ``readable`` images (None: all) of each class in
    ``labels``, ``batch_images`` at a time, in row order."""
    found, rows, local = _readable_rows(shard, readable)
    for label in labels:
        members = np.flatnonzero(found == label)
        for start in range(0, len(members), batch_images):
            chosen = members[start:start + batch_images]
            yield label, rows[chosen], read_maps(shard, local[chosen]).astype(np.float32)


def scan_shard(shard, components: dict[int, np.ndarray], k_images: int, batch_images: int,
               readable: np.ndarray | None = None) -> dict[int, ScanStats]:
    """A measure task on a shard of ``concepts.split``: per class label, the ``ScanStats`` of its ``readable``
    images there (``FeatureStore.shard_readable``; None: all)."""
    out: dict[int, ScanStats] = {}
    for label, rows, maps in _class_batches(shard, list(components), batch_images, readable):
        stats = out.get(label) or ScanStats.empty(len(components[label]), k_images)
        out[label] = stats.add(maps, rows, components[label])
    return out


def importance_shard(shard, network, components: dict[int, np.ndarray], baselines: dict[int, np.ndarray],
                     batch_images: int, readable: np.ndarray | None = None) -> dict[int, ImportanceStats]:
    """A measure task on a shard of ``concepts.importance_split``: per class label, the ``ImportanceStats`` of its
    ``readable`` images there (``FeatureStore.shard_readable``; None: all)."""
    out: dict[int, ImportanceStats] = {}
    for label, _, maps in _class_batches(shard, list(components), batch_images, readable):
        stats = importance_batch(network, maps, label, components[label], baselines[label])
        out[label] = out[label].merge(stats) if label in out else stats
    return out


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


# ---------------------------------------------------------------------------------------------------- the work

class _NodeTasks:
    """Tasks per node (IP address) and step, for ``index.json``."""

    def __init__(self):
        self.counts: dict[str, dict[str, int]] = {}

    def add(self, node: str, step: str, sent: bool = False) -> None:
        counts = self.counts.setdefault(node, {})
        counts[step] = counts.get(step, 0) + 1
        if sent:
            counts["shards_sent"] = counts.get("shards_sent", 0) + 1


def class_reservoirs(store: FeatureStore, labels: list[int], cfg: ConceptsConfig, use_ray: bool,
                     tasks: _NodeTasks) -> dict[int, np.ndarray]:
    """Steps 1 and 2: per class label, the float16 maps (R, C, h, w) of its reservoir, in row order."""
    folder, infos = str(store.path), store.shard_infos(cfg.split)
    sample: Sample = {}
    jobs = [ShardJob(folder, info, sample_shard, (labels, cfg.reservoir_images, cfg.seed, store.shard_readable(info)))
            for info in infos]
    for _, part, where in map_shards(jobs, f"concepts {store.path.parent.name}: sample", use_ray):
        sample = merge_samples(sample, part, cfg.reservoir_images)
        tasks.add(where["node"], "sample", where["read"] == "object store")
    empty = [label for label in labels if len(sample[label][1]) == 0]
    if empty:
        raise CatdogError(f"feature store {store.path}: no {cfg.split} images of class {store.classes[empty[0]]!r}")
    rows = np.concatenate([np.sort(sample[label][1]) for label in labels])
    owner = np.concatenate([np.full(len(sample[label][1]), label) for label in labels])
    slot = np.concatenate([np.arange(len(sample[label][1])) for label in labels])
    order = np.argsort(rows)
    rows, owner, slot = rows[order], owner[order], slot[order]
    shard_of = np.searchsorted([info.first_row for info in infos], rows, side="right") - 1
    maps = {label: np.empty((len(sample[label][1]), *store.manifest["spatial_shape"]), np.float16) for label in labels}
    shards = np.unique(shard_of).tolist()
    jobs = [ShardJob(folder, infos[s], read_maps, (rows[shard_of == s] - infos[s].first_row,)) for s in shards]
    for i, part, where in map_shards(jobs, f"concepts {store.path.parent.name}: gather", use_ray):
        here = shard_of == shards[i]
        for label in np.unique(owner[here]).tolist():
            mine = owner[here] == label
            maps[label][slot[here][mine]] = part[mine]
        tasks.add(where["node"], "gather", where["read"] == "object store")
    return maps


def fit_classes(reservoirs: dict[int, np.ndarray], cfg: ConceptsConfig, use_ray: bool,
                tasks: _NodeTasks) -> dict[int, tuple[np.ndarray, int]]:
    """Step 3: per class label, ``fit_class`` of its reservoir (a Ray task each with ``use_ray``; each reservoir
    leaves the driver's memory as its task takes it)."""
    if not use_ray:
        fits = {label: fit_class(reservoirs.pop(label), cfg) for label in list(reservoirs)}
        for _ in fits:
            tasks.add("local", "fit")
        return fits
    import ray

    task, refs = remote_task(fit_class), {}
    for label in list(reservoirs):
        refs[task.remote(reservoirs.pop(label), cfg)] = label
    fits = {}
    with progress_bar(total=len(refs), desc="concepts: fit", unit="class") as bar:
        waiting = list(refs)
        while waiting:
            [done], waiting = ray.wait(waiting, num_returns=1)
            fits[refs[done]], (node, _) = ray.get(done)
            tasks.add(node, "fit")
            bar.update()
    return fits


def measure_classes(store: FeatureStore, network, components: dict[int, np.ndarray],
                    baselines: dict[int, np.ndarray], cfg: ConceptsConfig, use_ray: bool,
                    tasks: _NodeTasks) -> tuple[dict[int, ScanStats], dict[int, ImportanceStats]]:
    """Step 4: per class label, its ``ScanStats`` over ``split`` and ``ImportanceStats`` over ``importance_split``."""
    folder = str(store.path)
    if use_ray:
        import ray

        network = ray.put(network)
    jobs = [ShardJob(folder, info, scan_shard, (components, cfg.images_per_concept, cfg.batch_images,
                                                store.shard_readable(info)))
            for info in store.shard_infos(cfg.split)]
    jobs += [ShardJob(folder, info, importance_shard, (network, components, baselines, cfg.batch_images,
                                                       store.shard_readable(info)))
             for info in store.shard_infos(cfg.importance_split)]
    scanned = len(store.shard_infos(cfg.split))
    scans: dict[int, ScanStats] = {}
    importances: dict[int, ImportanceStats] = {}
    for i, part, where in map_shards(jobs, f"concepts {store.path.parent.name}: measure", use_ray):
        merged = scans if i < scanned else importances
        for label, stats in part.items():
            merged[label] = merged[label].merge(stats) if label in merged else stats
        tasks.add(where["node"], "measure", where["read"] == "object store")
    missing = [label for label in components if label not in importances]
    if missing:
        raise CatdogError(f"feature store {store.path}: no {cfg.importance_split} images of class "
                          f"{store.classes[missing[0]]!r} to measure its concepts' importance on "
                          "(concepts.importance_split)")
    return scans, importances


def compute_concepts(store: FeatureStore, network, labels: list[int], cfg: ConceptsConfig,
                     use_ray: bool = True) -> tuple[dict[int, dict], dict[str, dict[str, int]]]:
    """The concepts of the classes ``labels`` (the module's four steps; with ``use_ray`` in a Ray session): per
    label its JSON-ready result with ``components`` (k, C), concepts ordered by importance, highest first; and the
    tasks each node ran. ``seconds`` and ``peak_rss_mib`` (this process's) are those of all ``labels`` together."""
    start, tasks = time.perf_counter(), _NodeTasks()
    grid = store.manifest["spatial_shape"][1:]
    fits = fit_classes(class_reservoirs(store, labels, cfg, use_ray, tasks), cfg, use_ray, tasks)
    components = {label: fits[label][0] for label in labels}
    baselines = {label: random_directions(components[label], cfg.random_directions, [cfg.seed, 4, label])
                 for label in labels}
    scans, importances = measure_classes(store, network, components, baselines, cfg, use_ray, tasks)
    seconds, results = time.perf_counter() - start, {}
    for label in labels:
        scan, importance = scans[label], importances[label].summary()
        order = np.argsort(-importance["importance"], kind="stable")
        concepts = []
        for rank, j in enumerate(order.tolist(), start=1):
            count = int(np.count_nonzero(scan.top.rows[j] >= 0))
            concepts.append({
                "concept": rank, "importance": float(importance["importance"][j]),
                "importance_std": float(importance["importance_std"][j]),
                "random_importance": float(importance["random_importance"][j]),
                "random_importance_std": float(importance["random_importance_std"][j]),
                "beats_random": float(importance["beats_random"][j]),
                "mean_coefficient": float(scan.sums[j] / max(scan.positions, 1)),
                "top_channels": np.argsort(-components[label][j])[:5].tolist(),
                "top_rows": scan.top.rows[j][:count].tolist(),
                "top_values": scan.top.values[j][:count].tolist()})
        results[label] = {
            "class": store.classes[label], "label": label, "images": scan.positions // math.prod(grid),
            "reservoir_images": int(min(cfg.reservoir_images, scan.positions // math.prod(grid))),
            "positions": scan.positions,
            "reconstruction_error": math.sqrt(scan.residual / max(scan.total, 1e-12)),
            "importance_images": importance["images"], "mean_logit": importance["logit"], "n_iter": fits[label][1],
            "components": components[label][order].tolist(), "concepts": concepts,
            "seconds": seconds, "peak_rss_mib": peak_rss_mib()}
    return results, dict(sorted(tasks.counts.items()))


# ---------------------------------------------------------------------------------------------------- figures

def _upsample(heat: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(heat.astype(np.float32)).resize((size, size), Image.BILINEAR))


def crop_box(position: tuple[int, int], grid: tuple[int, int], size: int, cells: int) -> tuple[int, int, int, int]:
    """Pixel box (left, top, right, bottom) of ``cells`` x ``cells`` map cells centred on ``position`` (row,
    column), shifted to lie inside the grid, on a ``size`` x ``size`` image."""
    box = []
    for centre, extent in zip(position, grid):
        span = min(cells, extent)
        first = min(max(centre - span // 2, 0), extent - span)
        box.append((round(first * size / extent), round((first + span) * size / extent)))
    (top, bottom), (left, right) = box
    return left, top, right, bottom


def draw_concept_montage(images: list[Image.Image], maps: np.ndarray, titles: list[str], suptitle: str,
                         cells: int, alpha: float, path: Path) -> None:
    """Each image cropped around its map's highest cell, with the (upsampled, cropped) map overlaid, 5 per line;
    ``maps`` (N, h, w) share one colour scale."""
    cols = min(5, max(1, len(images)))
    lines = max(1, math.ceil(len(images) / cols))
    figure = Figure(figsize=(2.4 * cols, 2.7 * lines + 0.5))
    vmax = max(float(maps.max()) if maps.size else 0.0, 1e-6)
    for i, (image, heat, title) in enumerate(zip(images, maps, titles)):
        axis = figure.add_subplot(lines, cols, i + 1)
        position = np.unravel_index(int(np.argmax(heat)), heat.shape)
        left, top, right, bottom = crop_box(position, heat.shape, image.size[0], cells)
        axis.imshow(np.asarray(image)[top:bottom, left:right])
        axis.imshow(_upsample(heat, image.size[0])[top:bottom, left:right], cmap=OVERLAY_COLORMAP, alpha=alpha,
                    vmin=0, vmax=vmax)
        axis.set_title(title, fontsize=7)
        axis.axis("off")
    figure.suptitle(suptitle, fontsize=9)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)


def draw_samples(photos: list[Image.Image], cams: np.ndarray, concept_maps: np.ndarray, titles: list[str],
                 cam_title: str, concept_titles: list[str], alpha: float, path: Path) -> None:
    """A row per image: the photo, its CAM, then each concept's map (shared scale per concept) over it."""
    rows, k = len(photos), concept_maps.shape[1]
    figure = Figure(figsize=(2.0 * (k + 2), 2.2 * rows + 0.4), layout="constrained")
    axes = figure.subplots(rows, k + 2, squeeze=False)
    vmax = np.maximum(concept_maps.max(axis=(0, 2, 3)), 1e-6)
    for r, photo in enumerate(photos):
        size = photo.size[0]
        axes[r, 0].imshow(photo)
        axes[r, 0].set_title(titles[r], fontsize=7)
        axes[r, 1].imshow(photo)
        axes[r, 1].imshow(_upsample(cams[r], size), cmap=OVERLAY_COLORMAP, alpha=alpha, vmin=0, vmax=1)
        axes[r, 1].set_title(cam_title, fontsize=7)
        for j in range(k):
            axes[r, j + 2].imshow(photo)
            axes[r, j + 2].imshow(_upsample(concept_maps[r, j], size), cmap=OVERLAY_COLORMAP, alpha=alpha, vmin=0,
                                  vmax=vmax[j])
            axes[r, j + 2].set_title(concept_titles[j], fontsize=7)
        for axis in axes[r]:
            axis.axis("off")
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)


def grad_cam_sample(run: RunDir, store: FeatureStore, data_root: Path, config: Config):
    """The val images of the Grad-CAM grid's seeded sample (``gradcam.images_per_class`` per class): the
    ``open_split`` dataset, its indices, and their store row ids (checked by their paths). The dataset leaves out
    images PIL refuses, whose rows the store keeps, so a row id is the image's place in the full listing."""
    from catdog.cam import sample_per_class
    from catdog.data import list_files
    from catdog.splits import open_split

    gcfg, data = config.gradcam, run.config().data
    dataset = open_split(data_root, "val", data, classes=store.classes)
    chosen = sample_per_class(dataset.labels, gcfg.images_per_class, gcfg.seed)
    relative = [dataset.relative_path(i) for i in chosen]
    row_of = {sample.path: row for row, sample in enumerate(list_files(data_root, "val", store.classes, data.exclude))}
    rows = [row_of.get(dataset.samples[i].path, -1) for i in chosen]
    inside = [row for row in rows if 0 <= row < store.num_rows("val")]
    stored = dict(zip(inside, decode_paths(store.take("val", "paths", inside))))
    for row, path in zip(rows, relative):
        if stored.get(row) != path:
            raise CatdogError(f"feature store {store.path}: the Grad-CAM sample image {path} is not in its val "
                              "split; pass the --data root the features were extracted from")
    return dataset, chosen, rows


def _sample_figure(network, store: FeatureStore, part: dict, sample, data_root: Path, config: Config,
                   path: Path) -> list[str]:
    """Concept maps of the class's Grad-CAM sample images (val) beside their CAMs; returns the images drawn."""
    import torch

    from catdog.cam import class_activation_maps

    dataset, chosen, rows = sample
    pairs = [(i, row) for i, row in zip(chosen, rows) if dataset.samples[i].label == part["label"]]
    chosen, rows = [i for i, _ in pairs], [row for _, row in pairs]
    relative = [dataset.relative_path(i) for i in chosen]
    images = torch.stack([dataset[i][0] for i in chosen])
    targets = torch.full((len(chosen),), part["label"])
    method = config.gradcam.methods[0]
    cams = class_activation_maps(network, method, images, targets)
    maps = store.spatial("val", rows).astype(np.float32)
    components = np.asarray(part["components"])
    u = coefficient_maps(transform(components, positions(maps)), len(maps), maps.shape[2:])
    size = store.manifest["image_size"]
    photos = [load_store_image(data_root, p, size) for p in relative]
    titles = [printable_path(Path(p).name) for p in relative]
    concept_titles = [f"concept {c['concept']}" for c in part["concepts"]]
    draw_samples(photos, cams, u, titles, method, concept_titles, config.concepts.overlay_alpha, path)
    return relative


def _draw_class(run: RunDir, network, store: FeatureStore, part: dict, sample, data_root: Path,
                config: Config) -> dict:
    """The class's montages and sample figure; its index.json entry."""
    cfg, out = config.concepts, run.concepts_dir
    size = store.manifest["image_size"]
    components = np.asarray(part["components"])
    entry = {key: part[key] for key in ("images", "reservoir_images", "positions", "reconstruction_error",
                                        "importance_images", "mean_logit", "seconds", "peak_rss_mib")}
    entry["concepts"] = []
    for j, concept in enumerate(part["concepts"]):
        rows = concept["top_rows"]
        maps = store.spatial(cfg.split, rows).astype(np.float32)
        paths, labels = decode_paths(store.take(cfg.split, "paths", rows)), store.take(cfg.split, "labels", rows)
        heat = coefficient_maps(transform(components, positions(maps)), len(rows), maps.shape[2:])[:, j]
        montage = f"{part['class']}-c{concept['concept']}.png"
        images = [{"path": path, "row": r, "value": v, "label": store.classes[int(label)],
                   "position": [int(i) for i in np.unravel_index(int(np.argmax(h)), h.shape)]}
                  for r, v, h, path, label in zip(rows, concept["top_values"], heat, paths, labels)]
        draw_concept_montage(
            [load_store_image(data_root, image["path"], size) for image in images], heat,
            [f"{image['value']:.2f} · {image['label']}\n{printable_path(Path(image['path']).name)}"
             for image in images],
            f"{part['class']}: concept {concept['concept']} of {len(components)}; logit drop when removed "
            f"{concept['importance']:.3f} vs {concept['random_importance']:.3f} for a random direction; "
            f"its top {len(images)} {cfg.split} regions", cfg.crop_cells, cfg.overlay_alpha, out / montage)
        entry["concepts"].append({**{key: value for key, value in concept.items()
                                     if key not in ("top_rows", "top_values")},
                                  "montage": montage, "images": images})
    figure = f"{part['class']}-samples.png"
    entry["sample_images"] = _sample_figure(network, store, part, sample, data_root, config, out / figure)
    entry["sample_figure"] = figure
    return entry


# ---------------------------------------------------------------------------------------------------- the job

def _identity(run: RunDir, store: FeatureStore, checkpoint_sha256: str, class_name: str,
              cfg: ConceptsConfig) -> dict:
    settings = cfg.model_dump(mode="json", exclude={"overlay_alpha", "crop_cells"})
    return {"run": str(run.path.resolve()), "checkpoint_sha256": checkpoint_sha256,
            "store_checkpoint_sha256": store.manifest.get("checkpoint_sha256"), "class": class_name,
            "concepts": settings}


def _check(run: RunDir, store: FeatureStore, data_root: Path, cfg: ConceptsConfig) -> None:
    require_maps_and_images(store, data_root, "concepts")
    for split in (cfg.split, cfg.importance_split, "val"):
        store.shard_infos(split)  # a one-line error naming the store's splits
    run.summary()


def part_path(run: RunDir, class_name: str) -> Path:
    return run.concepts_dir / "parts" / f"{class_name}.json"


def run_concepts(run_paths: list[str | os.PathLike], data_root: str | os.PathLike, config: Config,
                 address: str | None = None, use_ray: bool = True) -> dict[str, dict]:
    """Concepts for the shown classes (``figures.max_classes``) of every run; writes each ``RUN/concepts/`` and
    returns each run's index.

    Finished (run, class) parts are reused; the others are computed by ``compute_concepts``, on Ray with
    ``use_ray``, else in this process."""
    cfg, data_root = config.concepts, Path(data_root)
    plans = []
    for run in (RunDir(p) for p in run_paths):
        store = FeatureStore(run.features_dir)
        _check(run, store, data_root, cfg)
        shown = classes_shown(run.path, store.classes, config.figures.max_classes)
        checkpoint = file_sha256(run.best_checkpoint)
        identities = {label: _identity(run, store, checkpoint, store.classes[label], cfg) for label in shown}
        parts = {}
        for label in shown:
            path = part_path(run, store.classes[label])
            part = read_json(path) if path.is_file() else {}
            if part.get("identity") == identities[label]:
                parts[label] = part
                log.info("%s %s: reusing %s", run.path, store.classes[label], path)
        plans.append((run, store, shown, identities, parts))

    indexes = {}
    pending = any(len(parts) < len(shown) for _, _, shown, _, parts in plans)
    with ray_session(address) if use_ray and pending else contextlib.nullcontext():
        for run, store, shown, identities, parts in plans:
            network, nodes = run.load_model()[0], {}
            todo = [label for label in shown if label not in parts]
            if todo:
                computed, nodes = compute_concepts(store, network, todo, cfg, use_ray)
                for label, result in computed.items():
                    parts[label] = {"identity": identities[label], **result}
                    write_json(part_path(run, store.classes[label]), parts[label])
            save_config(config, run.concepts_dir / "config.yaml")
            index = {"split": cfg.split, "importance_split": cfg.importance_split, "concepts_per_class": cfg.concepts,
                     "factorisation": f"sklearn MiniBatchNMF (partial_fit) of the non-negative spatial positions of "
                                      f"a seeded sample of at most {cfg.reservoir_images} of each class's images",
                     "importance": "mean drop of the class's logit through the trained head when the concept's "
                                   "part is removed from the maps before pooling",
                     "random_baseline": f"the same removal along a random non-negative direction of equal norm "
                                        f"(mean of {cfg.random_directions})",
                     "cam_method": config.gradcam.methods[0], "classes_total": len(store.classes), "classes": {},
                     "nodes": nodes}
            sample = grad_cam_sample(run, store, data_root, config)
            for label in shown:
                index["classes"][store.classes[label]] = _draw_class(run, network, store, parts[label], sample,
                                                                     data_root, config)
            write_json(run.concepts_index, index)  # last: marks the stage complete
            indexes[str(run.path)] = index
    return indexes
