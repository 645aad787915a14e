"""Concepts mined from the feature store, in the spirit of CRAFT (Fel et al., CVPR 2023).

For each class, the non-negative spatial activations of its images in ``concepts.split`` (every spatial position
of every image is a row of C channels) are factorised as ``A ~ U W`` with scikit-learn's ``MiniBatchNMF``:
``W`` (k, C) holds k concept directions in channel space, ``U`` (positions, k) how strongly each position shows
each concept. The maps are streamed from the HDF5 store ``batch_images`` images at a time (``partial_fit``,
``passes`` times in a seeded order), so memory depends on the batch, never on the number of images.

Per concept:

* **montage**: the ``images_per_concept`` images where the concept is strongest (each image's highest position),
  each cropped to ``crop_cells`` x ``crop_cells`` cells around that position, with the concept's map overlaid;
* **importance**: the mean drop of the class's logit, through the trained head, when the concept's part
  ``U[:, j] W[j]`` is removed from the spatial maps of the class's ``importance_split`` images before pooling
  (for average pooling: removed from the pooled features), against a **baseline**: the same removal, with the
  same coefficients, of a random non-negative direction of equal norm (the mean over ``random_directions``
  seeded directions). A concept that matters beats its baseline by a wide margin;
* its map on each Grad-CAM sample image of the class (``gradcam.images_per_class``, ``gradcam.seed``), beside
  that image's CAM (``gradcam.methods[0]``).

Each (run, class) is one task (a Ray task when several are pending); its result is kept in
``RUN/concepts/parts/`` with what it was computed from, so a rerun reuses finished classes. ``index.json`` is
written last. Ray workers import this module, so torch and grad-cam are imported only where needed.
"""
from __future__ import annotations

import logging
import math
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from catdog.config import Config, ConceptsConfig, save_config
from catdog.errors import CatdogError
from catdog.io import atomic_path, file_sha256, read_json, write_json
from catdog.progress import progress_bar
from catdog.run import RunDir
from catdog.store import FeatureStore, load_store_image, require_maps_and_images
from catdog.topact import empty_topk, update_topk

log = logging.getLogger(__name__)

OVERLAY_COLORMAP = "jet"


def class_rows(store: FeatureStore, split: str, label: int) -> np.ndarray:
    """Row ids of one class's images in a split, ascending."""
    return store.row_ids(split)[store.labels(split) == label]


def iter_maps(store: FeatureStore, split: str, rows: np.ndarray, batch_images: int):
    """``(rows, maps)`` batches of float32 (B, C, h, w) spatial maps, ``batch_images`` at a time, in the order
    given; only one batch is in memory."""
    for start in range(0, len(rows), batch_images):
        chosen = rows[start:start + batch_images]
        yield chosen, store.spatial(split, chosen).astype(np.float32)


def positions(maps: np.ndarray) -> np.ndarray:
    """(B, C, h, w) maps as (B * h * w, C) rows, one per position (image-major), clipped at 0 for the NMF."""
    batch, channels, height, width = maps.shape
    return np.maximum(maps.transpose(0, 2, 3, 1).reshape(-1, channels), 0)


def coefficient_maps(u: np.ndarray, batch: int, grid: tuple[int, int]) -> np.ndarray:
    """``positions``-ordered coefficients (B * h * w, k) as (B, k, h, w) concept maps."""
    return u.reshape(batch, grid[0], grid[1], -1).transpose(0, 3, 1, 2)


def fit_nmf(store: FeatureStore, split: str, rows: np.ndarray, cfg: ConceptsConfig, desc: str = "NMF"):
    """A ``MiniBatchNMF`` of k components fitted by ``partial_fit`` on the rows' spatial positions, streamed."""
    from sklearn.decomposition import MiniBatchNMF

    nmf = MiniBatchNMF(n_components=cfg.concepts, init="nndsvda", random_state=cfg.seed)
    rng = np.random.default_rng([cfg.seed, 3])
    with progress_bar(total=cfg.passes * len(rows), desc=desc, unit="img") as bar:
        for _ in range(cfg.passes):
            order = rng.permutation(rows)
            for chosen, maps in iter_maps(store, split, order, cfg.batch_images):
                nmf.partial_fit(positions(maps))
                bar.update(len(chosen))
    return nmf


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


def scan_concepts(store: FeatureStore, split: str, rows: np.ndarray, components: np.ndarray, k_images: int,
                  batch_images: int) -> dict:
    """One more streamed pass: each concept's top images (by their strongest position), its mean coefficient,
    and the relative reconstruction error of the factorisation."""
    k = len(components)
    top = empty_topk(k, k_images)
    sums, residual, total, count = np.zeros(k), 0.0, 0.0, 0
    for chosen, maps in iter_maps(store, split, rows, batch_images):
        x = positions(maps)
        u = transform(components, x)
        per_image = coefficient_maps(u, len(chosen), maps.shape[2:]).reshape(len(chosen), k, -1).max(axis=2)
        top = update_topk(top, per_image, chosen)
        sums += u.sum(axis=0)
        residual += float(((x - u @ components) ** 2).sum())
        total += float((x.astype(np.float64) ** 2).sum())
        count += len(x)
    return {"top": top, "mean_coefficient": sums / max(count, 1), "positions": count,
            "reconstruction_error": math.sqrt(residual / max(total, 1e-12))}


def random_directions(components: np.ndarray, count: int, seed) -> np.ndarray:
    """(k, count, C): for each concept, ``count`` random non-negative directions (|Gaussian|) scaled to the
    concept direction's norm."""
    rng = np.random.default_rng(seed)
    k, channels = components.shape
    directions = np.abs(rng.standard_normal((k, count, channels)))
    directions /= np.linalg.norm(directions, axis=2, keepdims=True)
    return directions * np.linalg.norm(components, axis=1)[:, None, None]


def concept_importance(network, store: FeatureStore, split: str, rows: np.ndarray, label: int,
                       components: np.ndarray, baselines: np.ndarray, batch_images: int) -> dict:
    """Mean drop of the class's logit (``network.head(network.pool(maps))``) when each concept's part, or the same
    coefficients along each of its random ``baselines`` (k, R, C), is subtracted from the maps, over ``rows``."""
    import torch

    k, repeats = baselines.shape[:2]
    drops, random_drops, logits = [], [], []
    with torch.no_grad():
        for chosen, maps in iter_maps(store, split, rows, batch_images):
            batch, channels, height, width = maps.shape
            u = coefficient_maps(transform(components, positions(maps)), batch, (height, width))  # (B, k, h, w)
            fmap = torch.from_numpy(maps)

            def logit(removed: np.ndarray) -> np.ndarray:
                shifted = fmap - torch.from_numpy(removed.astype(np.float32))
                return network.head(network.pool(shifted))[:, label].double().numpy()

            before = network.head(network.pool(fmap))[:, label].double().numpy()
            logits.append(before)
            drop, random_drop = np.empty((batch, k)), np.empty((batch, k, repeats))
            for j in range(k):
                drop[:, j] = before - logit(np.einsum("bhw,c->bchw", u[:, j], components[j]))
                for r in range(repeats):
                    random_drop[:, j, r] = before - logit(np.einsum("bhw,c->bchw", u[:, j], baselines[j, r]))
            drops.append(drop)
            random_drops.append(random_drop)
    drops, random_drops = np.concatenate(drops), np.concatenate(random_drops)
    return {"importance": drops.mean(axis=0), "importance_std": drops.std(axis=0),
            "random_importance": random_drops.mean(axis=(0, 2)),
            "random_importance_std": random_drops.mean(axis=2).std(axis=0),
            "beats_random": (drops > random_drops.mean(axis=2)).mean(axis=0),
            "logit": float(np.concatenate(logits).mean()), "images": int(len(drops))}


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def class_concepts(run_path: str, class_name: str, cfg: ConceptsConfig) -> dict:
    """The pure per-(run, class) work, store and trained head only (no images): fit, scan, importance.

    Returns JSON-ready numbers plus ``components`` (k, C), concepts ordered by importance, highest first."""
    start = time.perf_counter()
    run = RunDir(run_path)
    store = FeatureStore(run.features_dir)
    label = store.classes.index(class_name)
    rows = class_rows(store, cfg.split, label)
    if len(rows) == 0:
        raise CatdogError(f"feature store {store.path}: no {cfg.split} images of class {class_name!r}")
    nmf = fit_nmf(store, cfg.split, rows, cfg, desc=f"{run.path.name} {class_name}: NMF")
    components = nmf.components_.astype(np.float64)
    scan = scan_concepts(store, cfg.split, rows, components, cfg.images_per_concept, cfg.batch_images)
    network, _ = run.load_model()
    baselines = random_directions(components, cfg.random_directions, [cfg.seed, 4, label])
    importance = concept_importance(network, store, cfg.importance_split,
                                    class_rows(store, cfg.importance_split, label), label, components, baselines,
                                    cfg.batch_images)
    order = np.argsort(-importance["importance"], kind="stable")
    concepts = []
    for rank, j in enumerate(order.tolist(), start=1):
        count = int(np.count_nonzero(scan["top"].rows[j] >= 0))
        concepts.append({
            "concept": rank, "importance": float(importance["importance"][j]),
            "importance_std": float(importance["importance_std"][j]),
            "random_importance": float(importance["random_importance"][j]),
            "random_importance_std": float(importance["random_importance_std"][j]),
            "beats_random": float(importance["beats_random"][j]),
            "mean_coefficient": float(scan["mean_coefficient"][j]),
            "top_channels": np.argsort(-components[j])[:5].tolist(),
            "top_rows": scan["top"].rows[j][:count].tolist(),
            "top_values": scan["top"].values[j][:count].tolist()})
    return {"class": class_name, "label": label, "images": int(len(rows)), "positions": scan["positions"],
            "reconstruction_error": scan["reconstruction_error"], "importance_images": importance["images"],
            "mean_logit": importance["logit"], "n_iter": int(getattr(nmf, "n_steps_", 0)),
            "components": components[order].tolist(), "concepts": concepts,
            "seconds": time.perf_counter() - start, "peak_rss_mib": peak_rss_mib()}


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


def _sample_figure(run: RunDir, network, store: FeatureStore, part: dict, data_root: Path, config: Config,
                   path: Path) -> list[str]:
    """Concept maps of the class's Grad-CAM sample images (val) beside their CAMs; returns the images drawn."""
    import torch

    from catdog.cam import class_activation_maps, sample_per_class
    from catdog.splits import open_split

    gcfg = config.gradcam
    dataset = open_split(data_root, "val", run.config().data, classes=store.classes)
    chosen = [i for i in sample_per_class(dataset.labels, gcfg.images_per_class, gcfg.seed)
              if dataset.samples[i].label == part["label"]]
    relative = [dataset.relative_path(i) for i in chosen]
    row_of = {p: r for r, p in zip(store.row_ids("val").tolist(), store.paths("val"))}
    missing = [p for p in relative if p not in row_of]
    if missing:
        raise CatdogError(f"feature store {store.path}: the Grad-CAM sample image {missing[0]} is not in its val "
                          "split; pass the --data root the features were extracted from")
    images = torch.stack([dataset[i][0] for i in chosen])
    targets = torch.full((len(chosen),), part["label"])
    method = gcfg.methods[0]
    cams = class_activation_maps(network, method, images, targets)
    maps = store.spatial("val", [row_of[p] for p in relative]).astype(np.float32)
    components = np.asarray(part["components"])
    u = coefficient_maps(transform(components, positions(maps)), len(maps), maps.shape[2:])
    size = store.manifest["image_size"]
    photos = [load_store_image(data_root, p, size) for p in relative]
    titles = [Path(p).name for p in relative]
    concept_titles = [f"concept {c['concept']}" for c in part["concepts"]]
    draw_samples(photos, cams, u, titles, method, concept_titles, config.concepts.overlay_alpha, path)
    return relative


def _draw_class(run: RunDir, network, store: FeatureStore, part: dict, data_root: Path, config: Config) -> dict:
    """The class's montages and sample figure; its index.json entry."""
    cfg, out = config.concepts, run.concepts_dir
    size, paths = store.manifest["image_size"], store.paths(cfg.split)
    labels = store.labels(cfg.split)
    components = np.asarray(part["components"])
    entry = {key: part[key] for key in ("images", "positions", "reconstruction_error", "importance_images",
                                        "mean_logit", "seconds", "peak_rss_mib")}
    entry["concepts"] = []
    for j, concept in enumerate(part["concepts"]):
        rows = concept["top_rows"]
        maps = store.spatial(cfg.split, rows).astype(np.float32)
        heat = coefficient_maps(transform(components, positions(maps)), len(rows), maps.shape[2:])[:, j]
        montage = f"{part['class']}-c{concept['concept']}.png"
        images = [{"path": paths[r], "row": r, "value": v, "label": store.classes[int(labels[r])],
                   "position": [int(i) for i in np.unravel_index(int(np.argmax(h)), h.shape)]}
                  for r, v, h in zip(rows, concept["top_values"], heat)]
        draw_concept_montage(
            [load_store_image(data_root, image["path"], size) for image in images], heat,
            [f"{image['value']:.2f} · {image['label']}\n{Path(image['path']).name}" for image in images],
            f"{part['class']}: concept {concept['concept']} of {len(components)}; logit drop when removed "
            f"{concept['importance']:.3f} vs {concept['random_importance']:.3f} for a random direction; "
            f"its top {len(images)} {cfg.split} regions", cfg.crop_cells, cfg.overlay_alpha, out / montage)
        entry["concepts"].append({**{key: value for key, value in concept.items()
                                     if key not in ("top_rows", "top_values")},
                                  "montage": montage, "images": images})
    sample = f"{part['class']}-samples.png"
    entry["sample_images"] = _sample_figure(run, network, store, part, data_root, config, out / sample)
    entry["sample_figure"] = sample
    return entry


# ---------------------------------------------------------------------------------------------------- the job

def _identity(run: RunDir, store: FeatureStore, class_name: str, cfg: ConceptsConfig) -> dict:
    settings = cfg.model_dump(mode="json", exclude={"overlay_alpha", "crop_cells"})
    return {"run": str(run.path.resolve()), "checkpoint_sha256": file_sha256(run.best_checkpoint),
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
    """Concepts for every class of every run; writes each ``RUN/concepts/`` and returns each run's index.

    Finished (run, class) parts are reused. Pending ones run as Ray tasks when there are several (and
    ``use_ray``), else in this process."""
    cfg, data_root = config.concepts, Path(data_root)
    runs = [RunDir(p) for p in run_paths]
    stores, pending, parts = {}, [], {}
    for run in runs:
        store = stores[run.path] = FeatureStore(run.features_dir)
        _check(run, store, data_root, cfg)
        for class_name in store.classes:
            identity = _identity(run, store, class_name, cfg)
            path = part_path(run, class_name)
            if path.is_file() and read_json(path).get("identity") == identity:
                parts[(run.path, class_name)] = read_json(path)
                log.info("%s %s: reusing %s", run.path, class_name, path)
            else:
                pending.append((run, class_name, identity))

    def finish(run: RunDir, class_name: str, identity: dict, result: dict) -> None:
        result = {"identity": identity, **result}
        write_json(part_path(run, class_name), result)
        parts[(run.path, class_name)] = result

    if len(pending) > 1 and use_ray:
        import ray

        from catdog.cluster import ray_session

        with ray_session(address):
            task = ray.remote(num_cpus=1, max_retries=2, retry_exceptions=[OSError])(class_concepts)
            refs = {task.remote(str(run.path), name, cfg): (run, name, identity) for run, name, identity in pending}
            waiting = list(refs)
            while waiting:
                [ref], waiting = ray.wait(waiting, num_returns=1)
                finish(*refs[ref], ray.get(ref))
    else:
        for run, name, identity in pending:
            finish(run, name, identity, class_concepts(str(run.path), name, cfg))

    indexes = {}
    for run in runs:
        store, network = stores[run.path], run.load_model()[0]
        save_config(config, run.concepts_dir / "config.yaml")
        index = {"split": cfg.split, "importance_split": cfg.importance_split, "concepts_per_class": cfg.concepts,
                 "factorisation": "sklearn MiniBatchNMF (partial_fit, streamed) of the non-negative spatial "
                                  "positions of each class's images",
                 "importance": "mean drop of the class's logit through the trained head when the concept's part "
                               "is removed from the maps before pooling",
                 "random_baseline": f"the same removal along a random non-negative direction of equal norm "
                                    f"(mean of {cfg.random_directions})",
                 "cam_method": config.gradcam.methods[0], "classes": {}}
        for class_name in store.classes:
            index["classes"][class_name] = _draw_class(run, network, store, parts[(run.path, class_name)],
                                                       data_root, config)
        write_json(run.concepts_index, index)  # last: marks the stage complete
        indexes[str(run.path)] = index
    return indexes
