"""Top activations: for each class's top features, the training images where each fires hardest, and where.

The features are each class's first ``features_per_class`` in the forest's per-class ranking. The pure
core is a running top-k per feature (``update_topk``) and a merge of partial results (``merge_topk``):
rows are ordered by activation, highest first, ties going to the lower row id, so the result equals a
stable argsort over all images. Ray tasks each read one shard and return its partial top-k; the driver
merges them as they arrive, so memory depends on the shard size and k, never on the number of images.

Outputs in ``RUN/topact/``: a montage ``<class>-f<feature>.png`` per feature (its top images, each with
the feature's spatial map upsampled and overlaid) and ``index.json`` (features, images, activations and
the share of each class among each feature's top ``selectivity_top`` images). Ray workers import this
module to search a shard, so it imports nothing heavy (no torch).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import ray
from matplotlib.figure import Figure
from PIL import Image

from catdog.cluster import ray_session
from catdog.config import Config, TopactConfig, save_config
from catdog.errors import CatdogError
from catdog.io import atomic_path, write_json
from catdog.progress import progress_bar
from catdog.ranking import read_ranking
from catdog.run import RunDir
from catdog.store import FeatureStore, read_shard


@dataclass(frozen=True)
class TopK:
    """Per feature (one row each), the best image rows so far, best first: ``values`` and ``rows``, shape (F, <=k)."""

    values: np.ndarray
    rows: np.ndarray
    k: int


def empty_topk(n_features: int, k: int, dtype=np.float32) -> TopK:
    return TopK(np.empty((n_features, 0), dtype), np.empty((n_features, 0), np.int64), k)


def _best(values: np.ndarray, rows: np.ndarray, k: int) -> TopK:
    order = np.lexsort((rows, -values), axis=-1)[:, :k]
    return TopK(np.take_along_axis(values, order, axis=1), np.take_along_axis(rows, order, axis=1), k)


def update_topk(state: TopK, values: np.ndarray, row_ids: np.ndarray) -> TopK:
    """Fold in a batch: ``values`` (B, F) are the F features' activations of the images ``row_ids`` (B,)."""
    rows = np.broadcast_to(np.asarray(row_ids, dtype=np.int64), (state.rows.shape[0], len(row_ids)))
    return _best(np.concatenate([state.values, values.T.astype(state.values.dtype)], axis=1),
                 np.concatenate([state.rows, rows], axis=1), state.k)


def merge_topk(parts: Iterable[TopK]) -> TopK:
    """One top-k from partial top-ks over disjoint sets of rows (e.g. one per shard)."""
    parts = list(parts)
    return _best(np.concatenate([p.values for p in parts], axis=1),
                 np.concatenate([p.rows for p in parts], axis=1), parts[0].k)


def shard_topk(shard: str | os.PathLike, feature_idx: np.ndarray, k: int) -> tuple[TopK, dict[int, tuple[int, str]]]:
    """One shard's top-k rows for the chosen features, and the label and path of each row in it."""
    arrays = read_shard(shard)
    top = update_topk(empty_topk(len(feature_idx), k), arrays["features"][:, feature_idx], arrays["row_ids"])
    position = {int(row): i for i, row in enumerate(arrays["row_ids"])}
    info = {int(row): (int(arrays["labels"][position[row]]), str(arrays["paths"][position[row]]))
            for row in np.unique(top.rows)}
    return top, info


def search_top_activations(store: FeatureStore, split: str, feature_idx: np.ndarray, k: int
                           ) -> tuple[TopK, dict[int, tuple[int, str]]]:
    """Each shard of ``split`` in a Ray task; partial results merged as they finish (needs a Ray session).

    A task is retried when its worker dies or reading its shard fails (an OSError, e.g. a network filesystem).
    """
    task = ray.remote(num_cpus=1, max_retries=3, retry_exceptions=[OSError])(shard_topk)
    pending = [task.remote(str(shard), feature_idx, k) for shard in store.shards(split)]
    top, info = empty_topk(len(feature_idx), k), {}
    with progress_bar(total=len(pending), desc=f"top activations ({split})", unit="shard") as bar:
        while pending:
            [ref], pending = ray.wait(pending, num_returns=1)
            part, part_info = ray.get(ref)
            top = merge_topk([top, part])
            known = info | part_info
            info = {row: known[row] for row in np.unique(top.rows).tolist()}
            bar.update()
    return top, info


def class_shares(labels: list[int], classes: list[str]) -> dict[str, float]:
    """Fraction of each class among ``labels`` (fractions in [0, 1])."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(classes))
    return {name: float(counts[i] / max(1, len(labels))) for i, name in enumerate(classes)}


def draw_montage(images: list[Image.Image], maps: np.ndarray, titles: list[str], suptitle: str, path: Path,
                 colormap: str, alpha: float) -> None:
    """Images in a grid (5 per line), each with its map upsampled to the image and overlaid on one shared scale."""
    cols = min(5, len(images))
    lines = math.ceil(len(images) / cols)
    fig = Figure(figsize=(2.6 * cols, 2.9 * lines + 0.4))
    vmin, vmax = min(0.0, float(maps.min())), max(float(maps.max()), 1e-6)
    for i, (image, heat, title) in enumerate(zip(images, maps, titles)):
        ax = fig.add_subplot(lines, cols, i + 1)
        upsampled = Image.fromarray(heat.astype(np.float32)).resize(image.size, Image.BILINEAR)
        ax.imshow(image)
        ax.imshow(np.asarray(upsampled), cmap=colormap, alpha=alpha, vmin=vmin, vmax=vmax)
        ax.set_title(title, fontsize=7)
        ax.axis("off")
    fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def _check_inputs(store: FeatureStore, data_root: Path) -> None:
    if not data_root.is_dir():
        raise CatdogError(f"data root {data_root}: no such directory; pass the --data root the features were "
                          "extracted from")
    if not store.has_spatial:
        raise CatdogError(f"feature store {store.path}: extracted without spatial maps (extract.spatial=false); "
                          "the montages need them: extract again with extract.spatial=true")


def run_topact(run_dir: str | os.PathLike, data_root: str | os.PathLike, config: Config,
               address: str | None = None, verify: bool = False) -> dict:
    """The top-activation job: search on Ray, then a montage per feature and ``index.json``; returns the index."""
    run, data_root, tcfg = RunDir(run_dir), Path(data_root), config.topact
    store = FeatureStore(run.features_dir, verify=verify)
    _check_inputs(store, data_root)
    chosen = {name: read_ranking(run, name, store.feature_dim)[:tcfg.features_per_class]
              for name in store.classes}
    feature_idx = np.unique(np.concatenate(list(chosen.values())))
    out = run.topact_dir
    save_config(config, out / "config.yaml")

    with ray_session(address):
        top, info = search_top_activations(store, tcfg.split, feature_idx,
                                           max(tcfg.images_per_feature, tcfg.selectivity_top))

    index = {"split": tcfg.split, "images_per_feature": tcfg.images_per_feature,
             "selectivity_top": tcfg.selectivity_top, "classes": {}}
    for class_name, features in chosen.items():
        index["classes"][class_name] = []
        for rank, feature in enumerate(features.tolist(), start=1):
            i = int(np.searchsorted(feature_idx, feature))
            entry = feature_entry(store, tcfg, class_name, rank, feature, top.rows[i], top.values[i], info)
            draw_feature(entry, class_name, store, tcfg, data_root, out / entry["montage"])
            index["classes"][class_name].append(entry)
    write_json(run.topact_index, index)  # last: marks the stage complete
    return index


def feature_entry(store: FeatureStore, cfg: TopactConfig, class_name: str, rank: int, feature: int,
                  rows: np.ndarray, values: np.ndarray, info: dict[int, tuple[int, str]]) -> dict:
    """A feature's index.json entry: its top images and the class shares among its top ``selectivity_top``."""
    shares = class_shares([info[r][0] for r in rows[:cfg.selectivity_top].tolist()], store.classes)
    images = [{"path": info[r][1], "row": r, "activation": v, "label": store.classes[info[r][0]]}
              for r, v in zip(rows[:cfg.images_per_feature].tolist(), values[:cfg.images_per_feature].tolist())]
    return {"feature": feature, "rank": rank, "montage": f"{class_name}-f{feature}.png",
            "class_shares": shares, "top_for_shares": int(min(cfg.selectivity_top, len(rows))), "images": images}


def draw_feature(entry: dict, class_name: str, store: FeatureStore, cfg: TopactConfig, data_root: Path,
                 path: Path) -> None:
    """The montage of one index entry: its images as the network saw them, with the feature's spatial maps."""
    size = store.manifest["image_size"]
    images = entry["images"]
    shares = ", ".join(f"{name} {100 * share:.0f}%" for name, share in entry["class_shares"].items())
    draw_montage(
        [_load_image(data_root, image["path"], size) for image in images],
        store.spatial(cfg.split, [image["row"] for image in images])[:, entry["feature"]].astype(np.float32),
        [f"{image['activation']:.2f} · {image['label']}\n{Path(image['path']).name}" for image in images],
        f"{class_name}: feature {entry['feature']} (rank {entry['rank']}), top {len(images)} "
        f"{cfg.split} images; among its top {entry['top_for_shares']}: {shares}",
        path, cfg.colormap, cfg.overlay_alpha)


def _load_image(data_root: Path, relative: str, size: int) -> Image.Image:
    """The image as the network saw it: resized to ``size`` x ``size``."""
    path = data_root / relative
    if not path.is_file():
        raise CatdogError(f"topact: image {relative} of the feature store is missing under {data_root}; "
                          "pass the --data root the features were extracted from")
    with Image.open(path) as image:
        return image.convert("RGB").resize((size, size), Image.BILINEAR)
