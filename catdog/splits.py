"""Which dataset reads a split: images decoded from their files (``catdog.data``) or the decoded cache
(``catdog.cache``). It sits above both, so that ``cache`` builds on ``data`` and ``data`` knows nothing of it."""
from __future__ import annotations

import os

from catdog.cache import CachedImageDataset
from catdog.config import DataConfig
from catdog.data import (ImageDataset, Sample, build_batch_transform, build_transform, find_classes,
                         limit_image_pixels, list_samples, no_batch_transform)


def open_split(root: str | os.PathLike, split: str, cfg: DataConfig, train: bool = False,
               classes: list[str] | None = None, cache_dir: str | os.PathLike | None = None,
               samples: list[Sample] | None = None) -> ImageDataset:
    """One split of a data root, with the train or eval transform; the loop applies the dataset's
    ``batch_transform`` to each batch on its device. The split is listed by ``catdog.data.list_samples``: less
    ``cfg.exclude``'s files, and files over ``cfg.max_image_pixels`` or that PIL cannot read left out with a
    warning; ``samples`` passes a listing made beforehand instead (extraction's, ``catdog.data.list_files``).

    With ``cfg.cache`` and a ``cache_dir`` (``RunDir.cache_dir``): a ``catdog.cache.CachedImageDataset``, whose
    items are uint8 images already resized, read from ``cache_dir/<split>.npy`` (built on first use), and whose
    ``batch_transform`` augments (for training) and normalises. Otherwise each image is decoded and transformed in
    the loader (``build_transform``): uint8 and augmented for training, normalised by ``batch_transform``; float32
    and normalised for evaluation, where ``batch_transform`` does nothing.
    """
    limit_image_pixels(cfg)
    classes = classes or find_classes(root)
    transform = build_transform(cfg, train)  # also checks that the config is resolved
    if samples is None:
        samples = list_samples(root, split, classes, cfg.exclude)
    if cfg.cache and cache_dir is not None:
        return CachedImageDataset(root, split, classes, samples, cfg, train, cache_dir)
    batch_transform = build_batch_transform(cfg, augment=False) if train else no_batch_transform
    return ImageDataset(root, split, classes, samples, transform, cfg.image_size, batch_transform)
