"""The feature store: sharded HDF5 files of pooled features and spatial activation maps.

Layout of ``RUN/features/``::

    manifest.json            every complete shard: file, split, first_row, rows, sha256, size, unreadable (row ids);
                             plus model metadata
    <split>-<nnnn>.h5        rows [nnnn * shard_size, ...) of one split
    .shards-<writer>.jsonl   each writer's journal of the shards it wrote (one manifest entry a line), until the
                             manifest replaces it (``JOURNAL``)

Each shard holds ``features`` (rows, D) float32, ``spatial`` (rows, C, h, w) float16 chunked per image
and compressed (optional), ``labels`` (rows,) int64, ``paths`` (rows,) each file name's bytes (UTF-8 string dtype;
any other name as it is, read back by ``decode_paths``), ``row_ids`` (rows,) int64,
the row id being the image's index in its split (sorted class, then file name), and ``readable`` (rows,) bool,
False for an image that could not be decoded: its row holds zeros, and readers leave it out
(``FeatureStore.readable``, from the manifest's ``unreadable``). Shard attributes record
the model, checkpoint hash, layer, transform and split. Shards are written under a temporary name
(``catdog.io.temp_path``) and renamed when complete, so a file with a final name is always whole.

This module owns the store's rules: shard names, which files belong to a store, the attributes its shards
share, the manifest, and the checks that a shard is the one the manifest lists (``shard_damage``).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

import h5py
import hdf5plugin
import numpy as np
from PIL import Image

from catdog.config import ExtractConfig
from catdog.errors import CatdogError
from catdog.io import file_sha256, is_temp_path, path_from_bytes, path_to_bytes, read_json, write_bytes, write_json

MANIFEST = "manifest.json"
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
"""The first 8 bytes of every HDF5 file written by catdog (the superblock sits at offset 0)."""
PER_SHARD_ATTRS = ("split", "first_row", "rows")
"""Shard attributes that differ between the shards of one store; all others must match."""
IDENTITY_KEYS = ("checkpoint_sha256", "model", "transform")
"""Manifest entries that say where the features come from: an extraction that differs refuses the store."""
COMPRESSION = {"lz4": hdf5plugin.LZ4(), "lzf": {"compression": "lzf"}, "gzip": {"compression": "gzip"}, None: {}}
"""The spatial maps' filters by ``extract.compression``. HDF5's LZ4 filter comes from ``hdf5plugin``, which this
module imports so that every reader of a shard (each imports this module) can read it; a store may mix filters."""
_SHARD_NAME = re.compile(r"^(?!\.)(?P<split>.+)-(?P<index>\d{4,})\.h5$")


def shard_name(split: str, index: int) -> str:
    """The file name of a split's ``index``-th shard (the index, not the writer's rank: stable across reruns)."""
    return f"{split}-{index:04d}.h5"


def is_shard_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` (or a bare name) has a shard's final name, as ``shard_name`` makes it (not a temporary)."""
    return bool(_SHARD_NAME.match(Path(path).name))


def decode_paths(values: Iterable) -> list[str]:
    """Image paths as stored in a shard's ``paths`` dataset (bytes or str, by h5py version) as ``str``; a name that
    is not UTF-8 comes back as the file system lists it (``catdog.io.path_from_bytes``)."""
    return [path_from_bytes(v) if isinstance(v, bytes) else v for v in values]


def clear_store(folder: str | os.PathLike, everything: bool) -> None:
    """Remove temporary files left by a killed writer; with ``everything``, also the shards and the manifest."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if is_temp_path(path) or (everything and (is_shard_file(path) or path.name == MANIFEST)):
            path.unlink()


def store_attrs(*, model: str, checkpoint_sha256: str, layer: str, transform: str, image_size: int, shard_size: int,
                precision: str, classes: list[str], feature_dim: int, spatial_shape: list[int] | None) -> dict:
    """Attributes every shard of one store shares (``shard_attrs`` adds the per-shard ones)."""
    return {
        "model": model,
        "checkpoint_sha256": checkpoint_sha256,
        "layer": layer,
        "transform": transform,
        "image_size": image_size,
        "shard_size": shard_size,
        "precision": precision,
        "classes": json.dumps(classes),
        "feature_dim": feature_dim,
        "spatial_shape": json.dumps(spatial_shape),
    }


def shard_attrs(attrs: dict, split: str, first_row: int, rows: int) -> dict:
    """One shard's attributes: the store's ``attrs`` plus ``PER_SHARD_ATTRS``."""
    return {**attrs, "split": split, "first_row": first_row, "rows": rows}


def attr_conflict(found: dict, expected: dict) -> str | None:
    """The first store-wide attribute whose value differs, as ``key``, or None when they all agree."""
    for key, value in expected.items():
        if key not in PER_SHARD_ATTRS and found.get(key) != value:
            return key
    return None


def manifest_metadata(attrs: dict) -> dict:
    """The manifest's model metadata, from the store's attributes (``store_attrs``)."""
    return {
        "model": attrs["model"],
        "checkpoint_sha256": attrs["checkpoint_sha256"],
        "classes": json.loads(attrs["classes"]),
        "feature_dim": attrs["feature_dim"],
        "spatial_shape": json.loads(attrs["spatial_shape"]),
        "layer": attrs["layer"],
        "transform": attrs["transform"],
        "shard_size": attrs["shard_size"],
        "image_size": attrs["image_size"],
        "precision": attrs["precision"],
    }


class ShardWriter:
    """Write one shard row batch by row batch; the file appears under its final name only on ``close()``.

    The shard is built in memory (HDF5 through a ``BytesIO``, ``shard_size`` rows at most) and written to disk in
    one piece, under a temporary name, by ``close``: a full disk is then a plain ``OSError`` from Python, never a
    failed write inside HDF5, which leaves HDF5 unable to close the file (it crashed the process at exit). ``close``
    hashes the bytes it writes, so the manifest never reads a shard back.

    ``readable`` (rows,) bool is False for a row whose image could not be decoded: the row keeps its place (row ids
    stay each file's index in the split's listing), with zero features and maps.

    Use as a context manager: an exception inside the block leaves no shard behind.
    """

    def __init__(self, path: str | os.PathLike, rows: int, feature_dim: int,
                 spatial_shape: tuple[int, int, int] | None, attrs: dict,
                 compression: str | None = ExtractConfig.model_fields["compression"].default):
        self.path = Path(path)
        self.rows = rows
        self._buffer = io.BytesIO()
        self._file = h5py.File(self._buffer, "w")
        for key, value in attrs.items():
            self._file.attrs[key] = value
        f = self._file
        f.create_dataset("features", (rows, feature_dim), dtype="float32")
        f.create_dataset("labels", (rows,), dtype="int64")
        f.create_dataset("row_ids", (rows,), dtype="int64")
        f.create_dataset("paths", (rows,), dtype=h5py.string_dtype())
        f.create_dataset("readable", (rows,), dtype="bool")
        if spatial_shape is not None:
            f.create_dataset("spatial", (rows, *spatial_shape), dtype="float16",
                             chunks=(1, *spatial_shape), **COMPRESSION[compression])
        self._filled = 0
        self.unreadable: list[int] = []
        """Row ids written with ``readable`` False."""

    def write(self, features: np.ndarray, labels: np.ndarray, row_ids: np.ndarray, paths: list[str],
              spatial: np.ndarray | None = None, readable: np.ndarray | None = None) -> None:
        """Append a batch of rows (``readable`` None: all of them)."""
        start, stop = self._filled, self._filled + len(features)
        if stop > self.rows:
            raise ValueError(f"{self.path.name}: {stop} rows written, shard holds {self.rows}")
        f = self._file
        f["features"][start:stop] = features
        f["labels"][start:stop] = labels
        f["row_ids"][start:stop] = row_ids
        f["paths"][start:stop] = [path_to_bytes(path) for path in paths]  # any file name, UTF-8 or not
        if "spatial" in f:
            f["spatial"][start:stop] = spatial.astype(np.float16, copy=False)
        readable = np.ones(stop - start, dtype=bool) if readable is None else np.asarray(readable, dtype=bool)
        f["readable"][start:stop] = readable
        self.unreadable += np.asarray(row_ids)[~readable].tolist()
        self._filled = stop

    def close(self) -> tuple[str, int]:
        """Write the shard to a temporary name and rename it into place, or raise with nothing left behind.
        Returns the sha256 and size of the bytes written (hashed in memory: the file is not read back)."""
        self._file.close()
        if self._filled != self.rows:
            raise ValueError(f"{self.path.name}: only {self._filled} of {self.rows} rows were written")
        with self._buffer.getbuffer() as data:
            sha256, size = hashlib.sha256(data).hexdigest(), data.nbytes
            write_bytes(self.path, data)
        self._buffer = io.BytesIO()
        return sha256, size

    def abort(self) -> None:
        self._file.close()
        self._buffer = io.BytesIO()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


@dataclass(frozen=True)
class ShardInfo:
    """A shard as ``manifest.json`` lists it. ``size`` (bytes) is None in manifests written before it was recorded.
    ``unreadable``: the row ids of images that could not be decoded (``ShardWriter``'s ``readable`` False), whose
    rows hold zeros: readers leave them out."""

    file: str
    split: str
    first_row: int
    rows: int
    sha256: str
    size: int | None = None
    unreadable: tuple[int, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "unreadable", tuple(self.unreadable))  # JSON gives a list

    @classmethod
    def of_file(cls, path: str | os.PathLike, split: str, first_row: int, rows: int) -> "ShardInfo":
        """The manifest entry of a complete shard file, read back: its name, rows, size, sha256 and unreadable rows
        (only for a shard no writer recorded: ``ShardWriter.close`` returns the hash of what it wrote)."""
        path = Path(path)
        with h5py.File(path, "r") as f:
            unreadable = f["row_ids"][:][~f["readable"][:]].tolist() if "readable" in f else []
        return cls(path.name, split, first_row, rows, file_sha256(path), path.stat().st_size, tuple(unreadable))


JOURNAL = ".shards-{writer}.jsonl"
"""Each writer's record of the shards it has written (one ``ShardInfo`` a line), beside them until the manifest
replaces it: the manifest is assembled from these without reading a shard back, on one host or many (the store's
folder is shared), and the shards of a killed run keep their hashes for the next."""
_JOURNAL_NAME = re.compile(r"^\.shards-[\w.-]+\.jsonl$")


def record_shard(folder: str | os.PathLike, writer: str, info: ShardInfo) -> None:
    """Append ``info`` to ``writer``'s journal, flushed to disk before the next shard starts."""
    with open(Path(folder) / JOURNAL.format(writer=writer), "a", encoding="utf-8") as handle:
        handle.write(json.dumps(asdict(info)) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def recorded_shards(folder: str | os.PathLike) -> dict[str, dict[str, ShardInfo]]:
    """Every journal's shards, by writer then file; a line cut short by a kill is ignored (its shard is then
    hashed from the file, ``ShardInfo.of_file``)."""
    folder = Path(folder)
    recorded = {}
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if not _JOURNAL_NAME.match(path.name):
            continue
        entries = recorded.setdefault(path.name[len(".shards-"):-len(".jsonl")], {})
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                info = ShardInfo(**json.loads(line))
            except (json.JSONDecodeError, TypeError):
                continue
            entries[info.file] = info
    return recorded


def restart_journals(folder: str | os.PathLike, kept: list[ShardInfo]) -> None:
    """Before the writers start (one process): the kept shards' entries in one journal (``kept``), every other
    journal removed, so each writer's journal holds this run's shards alone."""
    folder = Path(folder)
    remove_journals(folder)
    write_bytes(folder / JOURNAL.format(writer="kept"),
                "".join(json.dumps(asdict(info)) + "\n" for info in kept).encode())


def remove_journals(folder: str | os.PathLike) -> None:
    folder = Path(folder)
    for path in folder.iterdir() if folder.is_dir() else []:
        if _JOURNAL_NAME.match(path.name):
            path.unlink()


def write_manifest(folder: str | os.PathLike, metadata: dict, shards: list[ShardInfo]) -> None:
    """Write ``manifest.json`` (atomically): the store's metadata and its complete shards; then remove the writers'
    journals, which it replaces."""
    write_json(Path(folder) / MANIFEST, {**metadata, "shards": [asdict(s) for s in shards]})
    remove_journals(folder)


def read_manifest(folder: str | os.PathLike) -> tuple[dict, list[ShardInfo]]:
    """``manifest.json``'s metadata and shards; a CatdogError if it is missing or not a catdog manifest."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise CatdogError(f"feature store {folder}: no {MANIFEST}; the extraction did not finish "
                          f"(run jobs/extract.py --run {folder.parent} --data DATA_ROOT to complete it)")
    try:
        manifest = read_json(path)
        shards = [ShardInfo(**s) for s in manifest["shards"]]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise CatdogError(f"feature store {folder}: {MANIFEST} is not a catdog manifest ({exc}); rerun "
                          f"jobs/extract.py --run {folder.parent} --data DATA_ROOT --overwrite to rebuild it") from None
    return manifest, shards


def shard_damage(path: str | os.PathLike, info: ShardInfo | None, verify: bool = False) -> str | None:
    """Why the shard file at ``path`` is not the one its manifest entry ``info`` describes, or None when it passes.

    Cheap checks (a stat and 8 bytes): the size recorded in the manifest, and the HDF5 signature at the start,
    which needs no manifest entry. With ``verify``, also the sha256 of the whole file (when ``info`` is given).
    """
    path = Path(path)
    size = path.stat().st_size
    if info is not None and info.size is not None and size != info.size:
        return f"{size} bytes, {MANIFEST} says {info.size}"
    with open(path, "rb") as handle:
        start = handle.read(len(HDF5_SIGNATURE))
    if start != HDF5_SIGNATURE:
        return f"its first {len(HDF5_SIGNATURE)} bytes are {start!r}, not the HDF5 signature"
    if verify and info is not None:
        sha256 = file_sha256(path)
        if sha256 != info.sha256:
            return f"sha256 {sha256[:12]}..., {MANIFEST} says {info.sha256[:12]}..."
    return None


def _damaged(folder: Path, file: str, reason: str, verify: bool) -> CatdogError:
    return CatdogError(f"feature store {folder}: shard {file} is damaged or was altered ({reason}); rebuild it with "
                       f"jobs/extract.py --run {folder.parent} --data DATA_ROOT{' --verify' if verify else ''}, "
                       "which rewrites shards that fail this check")


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


def _read_header(path: Path) -> tuple[dict, list[str]]:
    """A shard's attributes and stored paths; OSError, KeyError, ValueError or RuntimeError (h5py) when it is not
    a whole shard."""
    with h5py.File(path, "r") as f:
        attrs = {key: _plain(value) for key, value in f.attrs.items()}
        rows = {f[name].shape[0] for name in ("features", "labels", "row_ids", "paths")}
        if "spatial" in f:
            rows.add(f["spatial"].shape[0])
        if len(rows) != 1 or ("rows" in attrs and attrs["rows"] not in rows):
            raise ValueError(f"datasets of {sorted(rows)} rows, attributes say {attrs.get('rows')}")
        return attrs, decode_paths(f["paths"][:])


def _at(paths: list[str], row: int) -> str:
    return repr(paths[row]) if row < len(paths) else "past its end"


def _refuse(folder: Path, what: str, key: str, found, expected) -> CatdogError:
    if key == "checkpoint_sha256":
        reason = (f"was extracted from another checkpoint (sha256 {str(found)[:12]}..., the run's "
                  f"best.safetensors is {str(expected)[:12]}...)")
    else:
        reason = f"was made with {key}={found!r}, this extraction uses {expected!r}"
    return CatdogError(f"feature store {folder}: {what} {reason}; pass --overwrite to rebuild the store "
                       "(or extract into another run directory)")


def _old_manifest(folder: Path) -> tuple[dict, dict[str, ShardInfo]]:
    """An earlier extraction's manifest and shards by file; empty when absent or unreadable (it is rewritten)."""
    try:
        manifest, shards = read_manifest(folder)
    except CatdogError:
        return {}, {}
    return manifest, {s.file: s for s in shards}


def check_store(folder: str | os.PathLike, attrs: dict, planned: dict[str, list[str]],
                verify: bool = False) -> tuple[dict[str, ShardInfo | None], dict[str, str]]:
    """Which planned shards already in ``folder`` can be kept, and which must be rebuilt.

    ``attrs``: the store attributes this extraction writes (``store_attrs``); ``planned``: each shard file to
    write, with the image paths of its rows in order. Returns ``(complete, damaged)``: the planned shards that
    pass, each with its recorded entry (the earlier manifest's, or a killed run's journal: ``recorded_shards``; None
    when neither has it), and ``{file: reason}`` for the planned shards that fail ``shard_damage`` against that
    entry (or cannot be read as a whole HDF5 shard), which the caller deletes and rewrites. Raises a CatdogError for
    a store made from another checkpoint, other settings or other images, so that shards are never mixed.
    """
    folder = Path(folder)
    manifest, listed = _old_manifest(folder)
    for entries in recorded_shards(folder).values():
        listed.update(entries)
    for key in IDENTITY_KEYS:
        if key in manifest and manifest[key] != attrs[key]:
            raise _refuse(folder, MANIFEST, key, manifest[key], attrs[key])
    complete, damaged = {}, {}
    for path in sorted(folder.glob("*.h5")) if folder.is_dir() else []:
        if not is_shard_file(path):
            continue
        reason = shard_damage(path, listed.get(path.name), verify)
        if reason is None:
            try:
                found, stored = _read_header(path)
            except (OSError, KeyError, ValueError, RuntimeError) as exc:
                reason = f"cannot be read as a whole HDF5 shard: {' '.join(str(exc).split())[:160]}"
        if reason is not None:
            if path.name in planned:
                damaged[path.name] = reason
            continue
        key = attr_conflict(found, attrs)
        if key is not None:
            raise _refuse(folder, path.name, key, found.get(key), attrs[key])
        expected = planned.get(path.name)
        if expected is None:
            continue
        if stored != expected:
            row = next(i for i, (a, b) in enumerate(zip([*stored, None], [*expected, None])) if a != b)
            raise CatdogError(f"feature store {folder}: {path.name} holds other images than this extraction plans "
                              f"for it (its row {row} is {_at(stored, row)}, expected {_at(expected, row)}); did the "
                              "data change? pass --overwrite to rebuild the store")
        complete[path.name] = listed.get(path.name)
    return complete, damaged


def read_shard(path: str | os.PathLike, spatial: bool = False) -> dict[str, np.ndarray]:
    """One shard's arrays (``spatial`` only when asked: it is the large part)."""
    with h5py.File(path, "r") as f:
        out = {
            "features": f["features"][:],
            "labels": f["labels"][:],
            "row_ids": f["row_ids"][:],
            "paths": np.array(decode_paths(f["paths"][:]), dtype=object),
        }
        if spatial:
            out["spatial"] = f["spatial"][:]
    return out


class FeatureStore:
    """Read a ``features/`` folder: per split, its shards in row order (``shard_infos``, ``shards``: the streaming
    path every stage takes), chosen rows of any dataset (``take``: one open per shard), spatial maps in batches
    (``iter_spatial``), and the readable rows (``readable``, from the manifest alone). ``features``, ``labels``,
    ``paths`` and ``row_ids`` concatenate a whole split: O(N) memory, for small stores, notebooks and per-row
    columns (labels: 8 bytes a row).

    Every shard the manifest lists is checked on opening (``shard_damage``): its size and HDF5 signature, and
    with ``verify`` its full sha256 (reads the whole store once).
    """

    def __init__(self, path: str | os.PathLike, verify: bool = False):
        self.path = Path(path)
        self.manifest, self._shards = read_manifest(self.path)
        missing = [s.file for s in self._shards if not (self.path / s.file).is_file()]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CatdogError(f"feature store {self.path}: shard {missing[0]}{more} listed in {MANIFEST} is missing; "
                              f"rebuild it with jobs/extract.py --run {self.path.parent} --data DATA_ROOT, which "
                              "writes the missing shards")
        for info in self._shards:
            reason = shard_damage(self.path / info.file, info, verify)
            if reason is not None:
                raise _damaged(self.path, info.file, reason, verify)

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

    def shard_infos(self, split: str) -> list[ShardInfo]:
        """The manifest entries of a split's shards, in row order."""
        infos = sorted((s for s in self._shards if s.split == split), key=lambda s: s.first_row)
        if not infos:
            raise CatdogError(f"feature store {self.path}: no split {split!r}; it has {self.splits}")
        return infos

    def shards(self, split: str) -> list[Path]:
        """Shard files of a split, in row order."""
        return [self.path / s.file for s in self.shard_infos(split)]

    def num_rows(self, split: str) -> int:
        return sum(s.rows for s in self._shards if s.split == split)

    @staticmethod
    def shard_readable(info: ShardInfo) -> np.ndarray:
        """(rows,) bool by place in the shard ``info``: False at a row whose image could not be decoded (its
        ``unreadable`` row ids, from the manifest), which every reader leaves out: it holds zeros, not features."""
        readable = np.ones(info.rows, dtype=bool)
        readable[np.asarray(info.unreadable, dtype=np.int64) - info.first_row] = False
        return readable

    def readable(self, split: str) -> np.ndarray:
        """(N,) bool by row id: which rows of the split readers use (``shard_readable``); from the manifest alone."""
        return np.concatenate([self.shard_readable(info) for info in self.shard_infos(split)])

    def readable_rows(self, split: str) -> np.ndarray:
        """The split's readable row ids, ascending (what a sample of the split draws from)."""
        return np.flatnonzero(self.readable(split))

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
        return decode_paths(self._concat(split, "paths"))

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
        return self.take(split, "spatial", rows)

    def take(self, split: str, name: str, rows: np.ndarray | list[int]) -> np.ndarray:
        """Dataset ``name`` (``spatial``, ``labels``, ``paths``, ...) at the chosen row ids, in the order given.

        The rows are located by a binary search over the shards' first rows and grouped by shard: each shard that
        holds any is opened once and read in ascending row order (``read_rows``), so the cost follows the rows
        asked for, not the number of shards."""
        infos = self.shard_infos(split)
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        total = self.num_rows(split)
        if rows.size and (rows.min() < 0 or rows.max() >= total):
            raise CatdogError(f"feature store {self.path}: row ids must lie in 0..{total - 1} for split {split!r}")
        firsts = np.array([info.first_row for info in infos], dtype=np.int64)
        wanted, back = np.unique(rows, return_inverse=True)  # ascending and distinct, as HDF5 reads them
        shard_of = np.searchsorted(firsts, wanted, side="right") - 1
        parts = []
        for shard in np.unique(shard_of).tolist():
            info = infos[shard]
            with h5py.File(self.path / info.file, "r") as f:
                parts.append(self.read_rows(f[name], wanted[shard_of == shard] - info.first_row))
        if not parts:
            with h5py.File(self.path / infos[0].file, "r") as f:
                return np.empty((0, *f[name].shape[1:]), dtype=f[name].dtype)
        return np.concatenate(parts)[back]

    @staticmethod
    def read_rows(dataset: h5py.Dataset, local: np.ndarray) -> np.ndarray:
        """A shard dataset's rows at ascending, distinct indices ``local``: one slice when they are contiguous,
        else an HDF5 point selection (each chunk read once)."""
        local = np.asarray(local, dtype=np.int64)
        if local.size and local[-1] - local[0] + 1 == local.size:
            return dataset[int(local[0]):int(local[-1]) + 1]
        return dataset[local] if local.size else dataset[0:0]

    def _need_spatial(self) -> None:
        if not self.has_spatial:
            raise CatdogError(f"feature store {self.path}: extracted without spatial maps (extract.spatial=false)")


def load_store_image(data_root: str | os.PathLike, relative: str, size: int) -> Image.Image:
    """A stored row's image (``paths`` are relative to the data root) as the network saw it: ``size`` x ``size``."""
    path = Path(data_root) / relative
    if not path.is_file():
        raise CatdogError(f"image {relative} of the feature store is missing under {data_root}; pass the --data "
                          "root the features were extracted from")
    from catdog.data import load_rgb  # decoded as training decodes it (upright by its EXIF tag); torch only here

    return load_rgb(path).resize((size, size), Image.BILINEAR)


def require_maps_and_images(store: "FeatureStore", data_root: str | os.PathLike, purpose: str) -> None:
    """What drawing on stored maps needs (the montages, the concepts): spatial maps in the store, and the data root
    its paths are relative to."""
    if not Path(data_root).is_dir():
        raise CatdogError(f"data root {data_root}: no such directory; pass the --data root the features were "
                          "extracted from")
    if not store.has_spatial:
        raise CatdogError(f"feature store {store.path}: extracted without spatial maps (extract.spatial=false); "
                          f"{purpose} need them: extract again with extract.spatial=true")
