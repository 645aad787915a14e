"""Build tiny feature stores (with ``ShardWriter``, as the extraction does) for tests of the later stages,
and damage their shards the ways a disk or a copy can."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from catdog.forest import per_class_csv, ranking_csv
from catdog.store import ShardInfo, ShardWriter, shard_attrs, shard_name, write_manifest

DAMAGES = ("truncated", "header", "data")
"""What ``damage_shard`` can do: cut the file in half, flip a byte of its HDF5 signature, flip a byte of the
``features`` data (the same size and header: only a sha256 finds it)."""


def damage_shard(path: Path, how: str) -> None:
    """Damage a shard file in place (see ``DAMAGES``)."""
    data = bytearray(path.read_bytes())
    if how == "truncated":
        del data[len(data) // 2:]
    elif how == "header":
        data[1] ^= 0xFF
    elif how == "data":
        with h5py.File(path, "r") as f:
            offset = f["features"].id.get_offset()  # contiguous, uncompressed: the raw float32 values
        data[offset + 1] ^= 0x01
    else:
        raise ValueError(f"damage_shard: how must be one of {DAMAGES}")
    path.write_bytes(bytes(data))


def write_store(folder: Path, splits: dict[str, dict], classes: list[str], shard_size: int,
                spatial_shape: tuple[int, int, int] | None = None, image_size: int = 32,
                attrs: dict | None = None) -> Path:
    """``splits[name]`` holds ``features`` (N, D), ``labels`` (N,), ``paths`` and optionally ``spatial``.
    Each shard gets ``attrs`` (store-wide attributes, as ``catdog.store.store_attrs`` makes them) and its own
    split, first row and row count."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for split, arrays in splits.items():
        n, dim = arrays["features"].shape
        for index, first in enumerate(range(0, n, shard_size)):
            rows = slice(first, min(n, first + shard_size))
            count = rows.stop - rows.start
            path = folder / shard_name(split, index)
            with ShardWriter(path, count, dim, spatial_shape, shard_attrs(attrs or {}, split, first, count)) as writer:
                writer.write(arrays["features"][rows], arrays["labels"][rows], np.arange(rows.start, rows.stop),
                             list(arrays["paths"][rows]), arrays["spatial"][rows] if spatial_shape else None)
            shards.append(ShardInfo.of_file(path, split, first, count))
    write_manifest(folder, {"model": "synthetic", "checkpoint_sha256": "0" * 64, "classes": classes,
                            "feature_dim": dim, "spatial_shape": list(spatial_shape) if spatial_shape else None,
                            "layer": "synthetic", "transform": "none", "shard_size": shard_size,
                            "image_size": image_size}, shards)
    return folder


def write_rankings(forest_dir: Path, order: list[int], per_class: dict[str, list[int]]) -> Path:
    """``ranking.csv`` and ``ranking_per_class.csv``, by catdog.forest's writers, ranking features as given."""
    dim = len(order)
    importances = np.zeros(dim)
    importances[order] = np.arange(dim, 0, -1) / dim
    signed = np.full((len(per_class), dim), -1.0)
    for c, features in enumerate(per_class.values()):
        signed[c, features] = np.arange(len(features), 0, -1)
    means = np.zeros((len(per_class), dim))
    forest_dir.mkdir(parents=True, exist_ok=True)
    (forest_dir / "ranking.csv").write_text(ranking_csv(importances))
    (forest_dir / "ranking_per_class.csv").write_text(per_class_csv(list(per_class), importances, signed, means, means))
    return forest_dir
