"""Top activations: for each shown class's top features, the training images where each fires hardest, and where.

The classes are ``catdog.classes.classes_shown`` (at most ``figures.max_classes``, the most confused first), their
features each class's first ``features_per_class`` in the forest's per-class ranking. The pure core is a running
top-k per feature (``update_topk``) and a merge of partial results (``merge_topk``): rows are ordered by activation,
highest first, ties going to the lower row id, so the result equals a stable argsort over all images (those that
could not be decoded left out: ``FeatureStore.shard_readable``, sent with each task). A Ray task per shard
(``catdog.cluster.map_shards``) reads its own shard and returns its partial top-k; the driver only merges them as
they arrive, so memory depends on the shard size and k, never on the number of images. A task reads the shard
file where its node sees the run directory, and gets the file's bytes through the object store where it does not
(``catdog.cluster``'s rule). The montages' images and spatial maps are read by the driver (a bounded number: shown
classes x features x images) and drawn by Ray tasks, which return PNG bytes, so no worker needs the data root.

Outputs in ``RUN/topact/``: a montage ``<class>-f<feature>.png`` per feature (its top images, each with
the feature's spatial map upsampled and overlaid) and ``index.json`` (features, images, activations,
the share of each class among each feature's top ``selectivity_top`` images, and which node did each piece).
Ray workers import this module to search a shard, so it imports nothing heavy (no torch).
"""
from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import ray
from matplotlib.figure import Figure
from PIL import Image

from catdog.classes import classes_shown
from catdog.cluster import ShardJob, map_shards, ray_session, remote_task, resolve_address
from catdog.config import Config, TopactConfig, save_config
from catdog.io import atomic_path, printable_path, write_json
from catdog.progress import progress_bar
from catdog.ranking import read_ranking
from catdog.run import RunDir
from catdog.store import FeatureStore, decode_paths, load_store_image, require_maps_and_images


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


def shard_topk(shard, feature_idx: np.ndarray, k: int,
               readable: np.ndarray | None = None) -> tuple[TopK, dict[int, tuple[int, str]]]:
    """One shard's top-k rows for the chosen features among its ``readable`` rows (``FeatureStore.shard_readable``;
    None: all), and the label and path of each of those rows.

    ``shard``: the shard's open ``h5py.File`` (a ``map_shards`` task)."""
    row_ids = shard["row_ids"][:]
    readable = np.ones(len(row_ids), dtype=bool) if readable is None else readable
    values = shard["features"][:][readable][:, feature_idx]
    top = update_topk(empty_topk(values.shape[1], k), values, row_ids[readable])
    kept = np.unique(top.rows)
    local = np.flatnonzero(np.isin(row_ids, kept))
    labels = FeatureStore.read_rows(shard["labels"], local)
    paths = decode_paths(FeatureStore.read_rows(shard["paths"], local))
    return top, {int(row): (int(label), path) for row, label, path in zip(row_ids[local], labels, paths)}


def search_top_activations(store: FeatureStore, split: str, feature_idx: np.ndarray, k: int,
                           in_flight: int | None = None) -> tuple[TopK, dict[int, tuple[int, str]], list[dict]]:
    """Each shard of ``split`` in a Ray task that reads it (``map_shards``: at most ``in_flight`` at once); partial
    results merged as they finish (needs a Ray session). A task whose worker or node dies is rerun.

    Returns the merged top-k, each top row's label and path, and per shard the node that searched it and how it
    read the shard."""
    infos = store.shard_infos(split)
    jobs = [ShardJob(str(store.path), info, shard_topk, (feature_idx, k, store.shard_readable(info))) for info in infos]
    top, info, nodes = empty_topk(len(feature_idx), k), {}, [None] * len(infos)
    for i, (part, part_info), where in map_shards(jobs, f"top activations ({split})", in_flight=in_flight):
        top = merge_topk([top, part])
        known = info | part_info
        info = {row: known[row] for row in np.unique(top.rows).tolist()}
        nodes[i] = where
    return top, info, nodes


def class_shares(labels: list[int], classes: list[str]) -> dict[str, float]:
    """Fraction of each class among ``labels`` (fractions in [0, 1])."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(classes))
    return {name: float(counts[i] / max(1, len(labels))) for i, name in enumerate(classes)}


def montage_png(images: list[np.ndarray], maps: np.ndarray, titles: list[str], suptitle: str, colormap: str,
                alpha: float) -> bytes:
    """Images (H, W, 3 uint8) in a grid (5 per line), each with its map upsampled to the image and overlaid on one
    shared scale; the figure as PNG bytes."""
    cols = min(5, len(images))
    lines = math.ceil(len(images) / cols)
    fig = Figure(figsize=(2.6 * cols, 2.9 * lines + 0.4))
    vmin, vmax = min(0.0, float(maps.min())), max(float(maps.max()), 1e-6)
    for i, (image, heat, title) in enumerate(zip(images, maps, titles)):
        ax = fig.add_subplot(lines, cols, i + 1)
        size = (image.shape[1], image.shape[0])
        upsampled = Image.fromarray(heat.astype(np.float32)).resize(size, Image.BILINEAR)
        ax.imshow(image)
        ax.imshow(np.asarray(upsampled), cmap=colormap, alpha=alpha, vmin=vmin, vmax=vmax)
        ax.set_title(title, fontsize=7)
        ax.axis("off")
    fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def draw_montage(images: list[Image.Image], maps: np.ndarray, titles: list[str], suptitle: str, path: Path,
                 colormap: str, alpha: float) -> None:
    """``montage_png`` of PIL images, written to ``path``."""
    png = montage_png([np.asarray(image.convert("RGB")) for image in images], maps, titles, suptitle, colormap, alpha)
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(png)


def run_topact(run_dir: str | os.PathLike, data_root: str | os.PathLike, config: Config,
               address: str | None = None, verify: bool = False) -> dict:
    """The top-activation job for the shown classes (``figures.max_classes``): search on Ray, then a montage per
    feature (drawn on Ray) and ``index.json``; returns the index.

    Search tasks read their shards (or get their bytes: ``catdog.cluster``); the montages' images and spatial maps
    are read here and reach the tasks through Ray's object store, and the montages come back as PNG bytes.
    ``index.json`` records the node of every shard search (``shards``) and montage (each feature's ``node``).
    """
    run, data_root, tcfg = RunDir(run_dir), Path(data_root), config.topact
    store = FeatureStore(run.features_dir, verify=verify)
    require_maps_and_images(store, data_root, "the montages")
    shown = [store.classes[c] for c in classes_shown(run.path, store.classes, config.figures.max_classes)]
    chosen = {name: read_ranking(run, name, store.feature_dim)[:tcfg.features_per_class] for name in shown}
    feature_idx = np.unique(np.concatenate(list(chosen.values())))
    if not ray.is_initialized():
        address = resolve_address(address)  # a bad address fails here, before anything is written
    out = run.topact_dir
    save_config(config, out / "config.yaml")

    index = {"split": tcfg.split, "images_per_feature": tcfg.images_per_feature,
             "selectivity_top": tcfg.selectivity_top, "classes_total": len(store.classes), "classes": {}}
    with ray_session(address):
        top, info, shard_nodes = search_top_activations(store, tcfg.split, feature_idx,
                                                        max(tcfg.images_per_feature, tcfg.selectivity_top))
        render = remote_task(montage_png)
        montages = {}
        for class_name, features in chosen.items():
            index["classes"][class_name] = []
            for rank, feature in enumerate(features.tolist(), start=1):
                i = int(np.searchsorted(feature_idx, feature))
                entry = feature_entry(store, tcfg, class_name, rank, feature, top.rows[i], top.values[i], info)
                montages[render.remote(*montage_inputs(entry, class_name, store, tcfg, data_root))] = entry
                index["classes"][class_name].append(entry)
        pending = list(montages)
        with progress_bar(total=len(pending), desc="montages", unit="feature") as bar:
            while pending:
                [done], pending = ray.wait(pending, num_returns=1)
                png, (node, node_id) = ray.get(done)
                entry = montages[done]
                with atomic_path(out / entry["montage"]) as tmp:
                    Path(tmp).write_bytes(png)
                entry["node"], entry["node_id"] = node, node_id
                bar.update()
    index["shards"] = shard_nodes
    index["nodes"] = node_counts(index)
    write_json(run.topact_index, index)  # last: marks the stage complete
    return index


def node_counts(index: dict) -> dict[str, dict[str, int]]:
    """Per node (IP address), how many shard searches (of them, how many on shard bytes sent through the object
    store) and montages it ran."""
    counts: dict[str, dict[str, int]] = {}

    def count(node: str) -> dict[str, int]:
        return counts.setdefault(node, {"shards": 0, "shards_sent": 0, "montages": 0})

    for shard in index.get("shards", []):
        count(shard["node"])["shards"] += 1
        count(shard["node"])["shards_sent"] += shard["read"] == "object store"
    for entries in index["classes"].values():
        for entry in entries:
            if "node" in entry:
                count(entry["node"])["montages"] += 1
    return dict(sorted(counts.items()))


def feature_entry(store: FeatureStore, cfg: TopactConfig, class_name: str, rank: int, feature: int,
                  rows: np.ndarray, values: np.ndarray, info: dict[int, tuple[int, str]]) -> dict:
    """A feature's index.json entry: its top images and the class shares among its top ``selectivity_top``."""
    shares = class_shares([info[r][0] for r in rows[:cfg.selectivity_top].tolist()], store.classes)
    images = [{"path": info[r][1], "row": r, "activation": v, "label": store.classes[info[r][0]]}
              for r, v in zip(rows[:cfg.images_per_feature].tolist(), values[:cfg.images_per_feature].tolist())]
    return {"feature": feature, "rank": rank, "montage": f"{class_name}-f{feature}.png",
            "class_shares": shares, "top_for_shares": int(min(cfg.selectivity_top, len(rows))), "images": images}


def montage_inputs(entry: dict, class_name: str, store: FeatureStore, cfg: TopactConfig, data_root: Path) -> tuple:
    """``montage_png``'s arguments for one index entry: its images as the network saw them, the feature's
    spatial maps, titles, and the colour settings (read here, on the driver)."""
    size = store.manifest["image_size"]
    images = entry["images"]
    shares = ", ".join(f"{name} {100 * share:.0f}%" for name, share in entry["class_shares"].items())
    return ([np.asarray(load_store_image(data_root, image["path"], size)) for image in images],
            store.spatial(cfg.split, [image["row"] for image in images])[:, entry["feature"]].astype(np.float32),
            [f"{image['activation']:.2f} · {image['label']}\n{printable_path(Path(image['path']).name)}"
             for image in images],
            f"{class_name}: feature {entry['feature']} (rank {entry['rank']}), top {len(images)} "
            f"{cfg.split} images; among its top {entry['top_for_shares']}: {shares}",
            cfg.colormap, cfg.overlay_alpha)


def draw_feature(entry: dict, class_name: str, store: FeatureStore, cfg: TopactConfig, data_root: Path,
                 path: Path) -> None:
    """The montage of one index entry, drawn here (no Ray) and written to ``path``."""
    png = montage_png(*montage_inputs(entry, class_name, store, cfg, data_root))
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(png)
