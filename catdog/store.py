"""The feature store: sharded HDF5 files of pooled features and spatial activation maps.

Layout of ``RUN/features/``::

    manifest.json            every complete shard: file, split, first_row, rows, sha256; plus model metadata
    <split>-<nnnn>.h5        rows [nnnn * shard_size, ...) of one split

Each shard holds ``features`` (rows, D) float32, ``spatial`` (rows, C, h, w) float16 chunked per image
and compressed (optional), ``labels`` (rows,) int64, ``paths`` (rows,) UTF-8 and ``row_ids`` (rows,) int64,
the row id being the image's index in its split (sorted class, then file name). Shard attributes record
the model, checkpoint hash, layer, transform and split. Shards are written under a temporary name and
renamed when complete, so a file with a final name is always whole.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from catdog.errors import CatdogError
from catdog.io import atomic_path, file_sha256, read_json, write_json

MANIFEST = "manifest.json"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:04d}.h5"



class ShardWriter:
    """Write one shard row batch by row batch; the file appears under its final name only on ``close()``.

    Use as a context manager: an exception inside the block leaves no shard behind.
    """

    def __init__(self, path: str | os.PathLike, rows: int, feature_dim: int,
                 spatial_shape: tuple[int, int, int] | None, attrs: dict, compression: str | None = "lzf"):
        self.path = Path(path)
        self.rows = rows
        self._atomic = atomic_path(self.path)
        self._tmp = self._atomic.__enter__()
        self._file = h5py.File(self._tmp, "w")
        for key, value in attrs.items():
            self._file.attrs[key] = value
        f = self._file
        f.create_dataset("features", (rows, feature_dim), dtype="float32")
        f.create_dataset("labels", (rows,), dtype="int64")
        f.create_dataset("row_ids", (rows,), dtype="int64")
        f.create_dataset("paths", (rows,), dtype=h5py.string_dtype())
        if spatial_shape is not None:
            f.create_dataset("spatial", (rows, *spatial_shape), dtype="float16",
                             chunks=(1, *spatial_shape), compression=compression)
        self._filled = 0

    def write(self, features: np.ndarray, labels: np.ndarray, row_ids: np.ndarray, paths: list[str],
              spatial: np.ndarray | None = None) -> None:
        """Append a batch of rows."""
        start, stop = self._filled, self._filled + len(features)
        if stop > self.rows:
            raise ValueError(f"{self.path.name}: {stop} rows written, shard holds {self.rows}")
        f = self._file
        f["features"][start:stop] = features
        f["labels"][start:stop] = labels
        f["row_ids"][start:stop] = row_ids
        f["paths"][start:stop] = paths
        if "spatial" in f:
            f["spatial"][start:stop] = spatial.astype(np.float16, copy=False)
        self._filled = stop

    def close(self) -> None:
        self._file.close()
        if self._filled != self.rows:
            self._atomic.__exit__(ValueError, None, None)
            raise ValueError(f"{self.path.name}: only {self._filled} of {self.rows} rows were written")
        self._atomic.__exit__(None, None, None)

    def abort(self) -> None:
        self._file.close()
        self._atomic.__exit__(RuntimeError, None, None)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


@dataclass(frozen=True)
class ShardInfo:
    file: str
    split: str
    first_row: int
    rows: int
    sha256: str


def write_manifest(folder: str | os.PathLike, metadata: dict, shards: list[ShardInfo]) -> None:
    """Write ``manifest.json`` (atomically): the store's metadata and its complete shards."""
    write_json(Path(folder) / MANIFEST, {**metadata, "shards": [asdict(s) for s in shards]})


def read_shard(path: str | os.PathLike, spatial: bool = False) -> dict[str, np.ndarray]:
    """One shard's arrays (``spatial`` only when asked: it is the large part)."""
    with h5py.File(path, "r") as f:
        out = {
            "features": f["features"][:],
            "labels": f["labels"][:],
            "row_ids": f["row_ids"][:],
            "paths": np.array([p.decode() if isinstance(p, bytes) else p for p in f["paths"][:]], dtype=object),
        }
        if spatial:
            out["spatial"] = f["spatial"][:]
    return out


class FeatureStore:
    """Read a ``features/`` folder: per split, features as one (N, D) array, labels, paths, row ids,
    and spatial maps streamed in batches or fetched by row id. Works the same with one shard or thousands."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise CatdogError(f"feature store {self.path}: no {MANIFEST}; the extraction did not finish "
                              f"(run jobs/extract.py --run {self.path.parent} to complete it)")
        try:
            self.manifest = read_json(manifest_path)
            self._shards = [ShardInfo(**s) for s in self.manifest["shards"]]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CatdogError(f"feature store {self.path}: {MANIFEST} is not a catdog manifest ({exc}); "
                              f"rerun jobs/extract.py --run {self.path.parent} --overwrite to rebuild it") from None
        missing = [s.file for s in self._shards if not (self.path / s.file).is_file()]
        if missing:
            raise CatdogError(f"feature store {self.path}: {len(missing)} shard(s) listed in {MANIFEST} are missing, "
                              f"e.g. {missing[0]}; rerun jobs/extract.py to rebuild them")

    @property
    def classes(self) -> list[str]:
        return self.manifest["classes"]

    @property
    def splits(self) -> list[str]:
        return sorted({s.split for s in self._shards})

    @property
    def feature_dim(self) -> int:
        return self.manifest["feature_dim"]

    @property
    def has_spatial(self) -> bool:
        return self.manifest.get("spatial_shape") is not None

    def shards(self, split: str) -> list[Path]:
        """Shard files of a split, in row order."""
        infos = sorted((s for s in self._shards if s.split == split), key=lambda s: s.first_row)
        if not infos:
            raise CatdogError(f"feature store {self.path}: no split {split!r}; it has {self.splits}")
        return [self.path / s.file for s in infos]

    def num_rows(self, split: str) -> int:
        return sum(s.rows for s in self._shards if s.split == split)

    def _concat(self, split: str, name: str) -> np.ndarray:
        parts = []
        for shard in self.shards(split):
            with h5py.File(shard, "r") as f:
                parts.append(f[name][:])
        return np.concatenate(parts)

    def features(self, split: str) -> np.ndarray:
        return self._concat(split, "features")

    def labels(self, split: str) -> np.ndarray:
        return self._concat(split, "labels")

    def row_ids(self, split: str) -> np.ndarray:
        return self._concat(split, "row_ids")

    def paths(self, split: str) -> list[str]:
        return [p.decode() if isinstance(p, bytes) else p for p in self._concat(split, "paths")]

    def iter_spatial(self, split: str, batch_size: int = 256) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(row_ids, maps)`` batches; only one batch of maps is in memory at a time."""
        self._need_spatial()
        for shard in self.shards(split):
            with h5py.File(shard, "r") as f:
                for start in range(0, f["row_ids"].shape[0], batch_size):
                    stop = start + batch_size
                    yield f["row_ids"][start:stop], f["spatial"][start:stop]

    def spatial(self, split: str, rows: np.ndarray | list[int]) -> np.ndarray:
        """Spatial maps of the chosen row ids, in the order given."""
        self._need_spatial()
        rows = np.asarray(rows, dtype=np.int64)
        total = self.num_rows(split)
        if rows.size and (rows.min() < 0 or rows.max() >= total):
            raise CatdogError(f"feature store {self.path}: row ids must lie in 0..{total - 1} for split {split!r}")
        out = np.empty((len(rows), *self.manifest["spatial_shape"]), dtype=np.float16)
        infos = sorted((s for s in self._shards if s.split == split), key=lambda s: s.first_row)
        for info in infos:
            inside = np.flatnonzero((rows >= info.first_row) & (rows < info.first_row + info.rows))
            if inside.size:
                with h5py.File(self.path / info.file, "r") as f:
                    for i in inside:
                        out[i] = f["spatial"][rows[i] - info.first_row]
        return out

    def _need_spatial(self) -> None:
        if not self.has_spatial:
            raise CatdogError(f"feature store {self.path}: extracted without spatial maps (extract.spatial=false)")
