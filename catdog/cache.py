"""``data.cache``: each image of a split decoded and resized once into a uint8 array file, read memory-mapped.

    RUN/cache/<split>.npy    uint8 (images, 3, size, size), in the split's sample order (a plain .npy file)
    RUN/cache/<split>.json   the key it was built for: every sample's path, label, file size and mtime, the size,
                             the interpolation and the decoding, hashed

A split's file is built once (by the first process to take ``.<split>.lock``; the others wait for it) and reused
while its key matches, so a changed image list, a new image size or interpolation rebuilds it. The array is
written under a temporary name and renamed, and the key is removed before a rebuild and written last: a killed
build leaves no file that a later run would take for a cache (its temporary file is removed by the next build).

Images are decoded exactly as the JPEG path decodes them (``catdog.data.load_rgb``: EXIF orientation, JPEG draft
mode; then ``catdog.data.decode_steps``), so an eval batch equals the JPEG path's to float rounding; the key records
``catdog.data.DECODER_VERSION``, so a file decoded by an earlier ``load_rgb`` is rebuilt. Training
augmentation runs on whole batches on the model's device: ``catdog.data.BatchTransform``.
"""
from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from catdog.config import DataConfig
from catdog.data import DECODER_VERSION, ImageDataset, Sample, build_batch_transform, decode_steps, load_rgb
from catdog.io import atomic_path, read_json, write_json
from catdog.progress import progress_bar

CACHE_VERSION = 1
DECODING = ("catdog.data.load_rgb(path, size) (EXIF orientation, JPEG draft mode), torchvision v2 Resize((size, size), "
            "antialias) on the uint8 tensor")
log = logging.getLogger(__name__)


def array_path(cache_dir: str | os.PathLike, split: str) -> Path:
    return Path(cache_dir) / f"{split}.npy"


def key_path(cache_dir: str | os.PathLike, split: str) -> Path:
    return Path(cache_dir) / f"{split}.json"


def cache_key(root: Path, samples: list[Sample], cfg: DataConfig) -> dict:
    """What a split's file depends on: the decoder (``DECODER_VERSION``), the settings, and ``samples_sha256``, a hash
    of the sample list (relative path, label, bytes, mtime)."""
    listing = hashlib.sha256()
    for sample in samples:
        stat = sample.path.stat()
        listing.update(json.dumps([sample.path.relative_to(root).as_posix(), sample.label, stat.st_size,
                                   stat.st_mtime_ns]).encode())
    return {"version": CACHE_VERSION, "decoder_version": DECODER_VERSION, "images": len(samples),
            "image_size": cfg.image_size,
            "interpolation": cfg.interpolation, "decoding": DECODING, "samples_sha256": listing.hexdigest()}


class _Decoded(Dataset):
    """The split's images decoded in a DataLoader's workers while the file is built, each as the JPEG path sees it
    before augmentation (``catdog.data.decode_steps``): uint8, channels first, ``size`` x ``size``."""

    def __init__(self, samples: list[Sample], cfg: DataConfig):
        self.paths = [s.path for s in samples]
        self.size = cfg.image_size
        self.decode = v2.Compose(decode_steps(cfg))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.decode(load_rgb(self.paths[index], self.size)).numpy()


def _stack(arrays: list[np.ndarray]) -> np.ndarray:
    return np.stack(arrays)


def build(path: Path, samples: list[Sample], cfg: DataConfig, workers: int, desc: str) -> None:
    """Decode every sample into a new ``.npy`` file at ``path`` (written under a temporary name, then renamed)."""
    size = cfg.image_size
    loader = DataLoader(_Decoded(samples, cfg), batch_size=32, num_workers=workers,
                        collate_fn=_stack)
    with atomic_path(path) as tmp:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(samples), 3, size, size))
        start = 0
        with progress_bar(total=len(samples), desc=desc, unit="image") as bar:
            for block in loader:
                array[start:start + len(block)] = block
                start += len(block)
                bar.update(len(block))
        array.flush()
        del array


@contextlib.contextmanager
def _locked(cache_dir: Path, split: str) -> Iterator[None]:
    """One builder per split at a time among the processes of this machine (``flock``)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f".{split}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _usable(cache_dir: Path, split: str, key: dict) -> bool:
    keys, array = key_path(cache_dir, split), array_path(cache_dir, split)
    if not (keys.is_file() and array.is_file()):
        return False
    try:
        if read_json(keys) != key:
            return False
        images = np.load(array, mmap_mode="r")
    except (OSError, ValueError):
        return False
    size = key["image_size"]
    return images.dtype == np.uint8 and images.shape == (key["images"], 3, size, size)


def ensure_cache(root: Path, split: str, samples: list[Sample], cfg: DataConfig, cache_dir: str | os.PathLike,
                 workers: int = 0) -> Path:
    """The split's array file in ``cache_dir``, built now unless one for exactly these samples and settings is
    there. Returns its path."""
    cache_dir = Path(cache_dir)
    key = cache_key(root, samples, cfg)
    with _locked(cache_dir, split):
        if not _usable(cache_dir, split, key):
            key_path(cache_dir, split).unlink(missing_ok=True)  # never a key beside a half-replaced array
            log.info("data.cache: decoding %d %s images into %s (%d px, %s)", len(samples), split,
                     array_path(cache_dir, split), cfg.image_size, cfg.interpolation)
            build(array_path(cache_dir, split), samples, cfg, workers, desc=f"cache {split}")
            write_json(key_path(cache_dir, split), key)
    return array_path(cache_dir, split)


class CachedImageDataset(ImageDataset):
    """``(uint8 image tensor (3, size, size), label, index)`` read from the split's memory-mapped array file;
    ``batch_transform`` turns each batch into the model's normalised float input (augmented for training), on the
    device the batch is on."""

    def __init__(self, root: str | os.PathLike, split: str, classes: list[str], samples: list[Sample], cfg: DataConfig,
                 train: bool, cache_dir: str | os.PathLike):
        super().__init__(root, split, classes, samples, transform=None, image_size=cfg.image_size)
        self.path = ensure_cache(self.root, split, self.samples, cfg, cache_dir, workers=cfg.num_workers)
        self.batch_transform = build_batch_transform(cfg, augment=train)
        self._images: np.ndarray | None = None

    @property
    def images(self) -> np.ndarray:
        """The memory-mapped array, opened on first use in each process (a DataLoader worker opens its own)."""
        if self._images is None:
            self._images = np.load(self.path, mmap_mode="r")
        return self._images

    def unaugmented(self, cfg: DataConfig) -> "CachedImageDataset":
        """The same samples and array file with the evaluation batch transform."""
        view = copy.copy(self)
        view.batch_transform = build_batch_transform(cfg, augment=False)
        return view

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_images": None}  # a worker maps the file itself; never pickle its pages

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        return torch.from_numpy(np.array(self.images[index])), self.samples[index].label, index

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int, int]]:
        """A whole batch in one read (the DataLoader's fetcher calls this when it exists)."""
        block = torch.from_numpy(self.images[np.asarray(indices)])
        return [(block[i], self.samples[index].label, index) for i, index in enumerate(indices)]
