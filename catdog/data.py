"""Image datasets in the ImageFolder layout ``root/{train,test,val}/<class>/<image>`` and their transforms."""
from __future__ import annotations

import copy
import csv
import functools
import gc
import logging
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.transforms import v2

from catdog.config import SPLITS, DataConfig
from catdog.errors import CatdogError
from catdog.io import open_text


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
DECODER_VERSION = 2
"""``load_rgb``'s decoding; raised whenever its pixels change (2: EXIF orientation, JPEG draft down to
``DRAFT_MIN_SIDE``), so that what was decoded before (``data.cache``, feature shards) is rebuilt, never mixed."""
DRAFT_MIN_SIDE = 0.8
"""A JPEG is decoded at the largest reduced scale (1/2, 1/4, 1/8) whose sides are both at least this fraction of the
output size: the resize to ``size`` x ``size`` distorts the aspect anyway, and a typical 450 x 374 photo then decodes
at 225 x 187 for 224 px instead of in full (``bench/extract.py``: decoding was the bottleneck of extraction)."""

# A truncated JPEG decodes with its missing rows filled in rather than stopping an epoch.
ImageFile.LOAD_TRUNCATED_IMAGES = True
log = logging.getLogger(__name__)


def find_classes(root: str | os.PathLike, splits: tuple[str, ...] = SPLITS) -> list[str]:
    """Class names (sorted folder names), checked to be at least two and the same in every split."""
    root = Path(root)
    if not root.is_dir():
        raise CatdogError(f"data root {root}: no such directory (expected {root}/{{train,test,val}}/<class>/*.jpg; "
                          "jobs/prepare.py builds it from PetImages or Kaggle's train folder)")
    per_split = {}
    for split in splits:
        split_dir = root / split
        if not split_dir.is_dir():
            raise CatdogError(f"data root {root}: missing split folder {split_dir}; catdog picks the best epoch on test "
                              "and reports val, so it needs train/, test/ and val/, each with one folder per class: "
                              "move some images into it (jobs/prepare.py --source POOL splits a pool 80/10/10)")
        classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        if len(classes) < 2:
            raise CatdogError(f"split {split_dir}: {len(classes)} class folder(s) {classes}; a classifier needs at "
                              "least two: make one folder per class in every split")
        per_split[split] = classes
    first, reference = next(iter(per_split.items()))
    for split, classes in per_split.items():
        if classes != reference:
            raise CatdogError(f"data root {root}: class folders differ between splits: "
                              f"{first} has {reference}, {split} has {classes}")
    return reference


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int


def limit_image_pixels(cfg: DataConfig) -> None:
    """Make ``cfg.max_image_pixels`` PIL's own limit (``Image.MAX_IMAGE_PIXELS``), the one every check and decoder
    reads, in this process and in the loader workers it forks."""
    Image.MAX_IMAGE_PIXELS = cfg.max_image_pixels


def unreadable_reason(path: Path, exc: BaseException) -> str:
    """A short reason why an image file cannot be used: what is wrong with it, not a traceback."""
    if isinstance(exc, IsADirectoryError) or path.is_dir():
        return "a folder, not an image file"
    if isinstance(exc, FileNotFoundError):
        return "file vanished before it was read"
    try:
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
    except OSError:
        pass
    if isinstance(exc, UnidentifiedImageError):
        return "not an image (PIL cannot identify it)"
    if isinstance(exc, Image.DecompressionBombError):  # ours says "W x H pixels, ...", PIL's "Image size (N pixels)"
        size = re.search(r"\d+ x \d+ pixels|\((\d+) pixels\)", str(exc))
        pixels = size and (size[0] if size[1] is None else f"{int(size[1]):,} pixels")
        return (f"too large{f' ({pixels})' if pixels else ''}: over data.max_image_pixels "
                f"({Image.MAX_IMAGE_PIXELS:,}); raise it to use this image")
    message = " ".join(str(exc).split())[:120]
    return f"cannot decode ({type(exc).__name__}: {message})" if message else f"cannot decode ({type(exc).__name__})"


def _open_checked(path: Path) -> Image.Image:
    """``Image.open``, refusing an image over ``Image.MAX_IMAGE_PIXELS`` from its header, before any decoding (PIL
    itself only warns below twice its limit)."""
    with warnings.catch_warnings():  # PIL warns between its limit and twice it; this refuses instead
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = Image.open(path)
    if image.width * image.height > Image.MAX_IMAGE_PIXELS:
        image.close()
        raise Image.DecompressionBombError(f"{image.width} x {image.height} pixels, over the limit of "
                                           f"{Image.MAX_IMAGE_PIXELS:,}")
    return image


def image_problem(path: Path) -> str | None:
    """Why ``path`` cannot be used, from its header alone (cheap: nothing is decoded), or None."""
    try:
        with _open_checked(path):
            return None
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        return unreadable_reason(path, exc)


def warn_skipped(where: str | os.PathLike, skipped: list[tuple[Path | str, str]]) -> None:
    """The one warning for image files a job leaves out, with a few of them and why."""
    if skipped:
        examples = "; ".join(f"{path} ({reason})" for path, reason in skipped[:3])
        log.warning("%s: skipped %d image file(s) PIL cannot use: %s%s (jobs/prepare.py quarantines such files)",
                    where, len(skipped), examples, "; ..." if len(skipped) > 3 else "")


def path_list(file: Path, what: str, root: Path) -> list[tuple[int, str]]:
    """The paths a list file names, with their line numbers: a CSV's ``path`` column (an audit list such as
    ``RUN/audit/duplicates.csv``) or a text file of one path per line (blank lines and ``#`` comments skipped).
    ``what`` names the list in errors (an option or a config key)."""
    if not file.is_file():
        raise CatdogError(f"{what} {file}: no such file; give a CSV with a 'path' column or a text file of one "
                          f"path per line, relative to the data root {root}")
    with open_text(file) as handle:
        if file.suffix.lower() == ".csv":
            reader = csv.DictReader(handle)
            if "path" not in (reader.fieldnames or []):
                raise CatdogError(f"{what} {file}: a CSV needs a 'path' column (its columns: "
                                  f"{reader.fieldnames or []})")
            lines = [(reader.line_num, row["path"] or "") for row in reader]
        else:
            lines = [(number, line.strip()) for number, line in enumerate(handle, 1)]
    return [(number, text) for number, text in lines if text and not text.startswith("#")]


def excluded_paths(exclude: str | os.PathLike | None, root: Path) -> frozenset[str]:
    """``data.exclude``: the paths a listing leaves out (e.g. a data audit's suspects), relative to the data root in
    POSIX form, from a CSV with a ``path`` column or a text file of one path per line (blank lines and ``#`` comments
    skipped). Each must be a file under ``root``: a stale list would otherwise exclude nothing, silently."""
    if exclude is None:
        return frozenset()
    file = Path(exclude)
    paths = set()
    for number, text in path_list(file, "data.exclude", root):
        path = PurePosixPath(text)
        if path.is_absolute() or ".." in path.parts or not (root / path).is_file():
            raise CatdogError(f"data.exclude {file}: line {number}, {text!r}, is not an image file under the data "
                              f"root {root}; give paths relative to it (train/cat/cat.1.jpg), or remove the line")
        paths.add(path.as_posix())
    return frozenset(paths)


def list_files(root: str | os.PathLike, split: str, classes: list[str],
               exclude: str | os.PathLike | None = None) -> list[Sample]:
    """Every image file of a split (by suffix), sorted by class then file name, less those ``data.exclude`` names
    (``excluded_paths``). Nothing is opened: one directory read per class, so N files cost N names, not N headers.
    The one listing every job's split goes through; ``list_samples`` adds the header checks.

    Every class needs at least one image in every split: an empty class would train a head that never sees it, or
    make an accuracy that means nothing.
    """
    root = Path(root)
    skip = excluded_paths(exclude, root)
    samples = []
    for label, name in enumerate(classes):
        class_dir = root / split / name
        if not class_dir.is_dir():
            raise CatdogError(f"split {root / split}: missing class folder {class_dir}")
        with os.scandir(class_dir) as entries:
            names = sorted(entry.name for entry in entries if os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES)
        kept = [Sample(class_dir / file, label) for file in names if f"{split}/{name}/{file}" not in skip]
        if not kept:
            raise CatdogError(f"class folder {class_dir}: no readable images (suffixes {sorted(IMAGE_SUFFIXES)}"
                              f"{', after data.exclude' if names else ''}); add images of {name!r} to {split}, or "
                              "remove the class from every split")
        samples += kept
    return samples


def list_samples(root: str | os.PathLike, split: str, classes: list[str],
                 exclude: str | os.PathLike | None = None) -> list[Sample]:
    """``list_files``, less the files PIL cannot use (unreadable, or over ``Image.MAX_IMAGE_PIXELS``: see
    ``limit_image_pixels``), found from each header and skipped with a warning: what training reads, where a file
    that fails in a loader worker would end the epoch. Opens every header (about 0.1 ms each): extraction, which
    decodes every image anyway, finds them in its workers instead (``catdog.extract``).
    """
    root = Path(root)
    samples, skipped = [], []
    for sample in list_files(root, split, classes, exclude):
        problem = image_problem(sample.path)
        if problem:
            skipped.append((sample.path, problem))
        else:
            samples.append(sample)
    for label, name in enumerate(classes):
        if not any(sample.label == label for sample in samples):
            raise CatdogError(f"class folder {root / split / name}: no readable images; add images of {name!r} to "
                              f"{split}, or remove the class from every split")
    warn_skipped(root / split, skipped)
    return samples


def load_rgb(path: Path, size: int | None = None) -> Image.Image:
    """Decode an image as RGB, turned as a viewer shows it (its EXIF orientation applied). For a ``size``, JPEGs are
    decoded at a reduced scale whose sides stay at least ``DRAFT_MIN_SIDE`` x ``size`` (the request is square, so it
    holds for the turned image too). An image over ``Image.MAX_IMAGE_PIXELS`` is refused before it is decoded
    (``Image.DecompressionBombError``). ``DECODER_VERSION`` names this decoding."""
    with _open_checked(path) as image:
        if size is not None and image.format == "JPEG":
            side = math.ceil(size * DRAFT_MIN_SIDE)
            image.draft("RGB", (side, side))
        ImageOps.exif_transpose(image, in_place=True)
        return image.convert("RGB")


def decode_steps(cfg: DataConfig) -> list:
    """What every path first makes of a decoded image: a uint8 tensor ``(3, size, size)``. The resize runs on the
    tensor: torch's antialiased uint8 kernel gives PIL's result to about one grey level at a fraction of the cost
    (``bench/train.py``, line (b) of the JPEG path)."""
    unset = [key for key in ("image_size", "interpolation", "mean", "std") if getattr(cfg, key) is None]
    if unset:
        raise ValueError(f"data config not resolved ({', '.join(unset)} unset): use catdog.models.data_config")
    return [v2.PILToTensor(), v2.Resize((cfg.image_size, cfg.image_size),
                                        interpolation=T.InterpolationMode(cfg.interpolation), antialias=True)]


def build_transform(cfg: DataConfig, train: bool) -> v2.Compose:
    """The per-image transform of the JPEG path, run in the loader's workers: ``decode_steps`` (size, interpolation
    and statistics resolved from the model by ``catdog.models.data_config``), then

    - for training, the seed's augmentation (horizontal flip, rotation) on the PIL image, whose nearest-neighbour
      rotation is cheaper than torch's on a uint8 tensor; the image stays uint8, and
      ``build_batch_transform(cfg, augment=False)`` normalises the whole batch on the model's device, as timm's
      prefetcher does: a quarter of the bytes through the workers' queue, and less of the CPU taken from the step;
    - for evaluation, float32 and normalised, the input every reader of a split expects.
    """
    steps = decode_steps(cfg)
    if not train:
        return v2.Compose([*steps, v2.ToDtype(torch.float32, scale=True), v2.Normalize(cfg.mean, cfg.std)])
    augment = ([v2.RandomHorizontalFlip()] if cfg.hflip else []) + ([v2.RandomRotation(cfg.rotation)]
                                                                      if cfg.rotation else [])
    if augment:
        steps += [v2.ToPILImage(), *augment, v2.PILToTensor()]
    return v2.Compose(steps)


def no_batch_transform(batch: torch.Tensor) -> torch.Tensor:
    """The JPEG path's evaluation batches arrive ready (transformed per image in the loader's workers)."""
    return batch


class BatchTransform:
    """Turns a uint8 batch ``(B, 3, H, W)`` into the model's input on whatever device it is on: float32, for
    ``data.cache``'s training batches the JPEG path's augmentation drawn per image (horizontal flip with p = 0.5,
    rotation uniform in ``[-rotation, rotation]`` degrees, nearest neighbour with zero fill like
    ``T.RandomRotation``; one ``grid_sample`` for both), then the normalisation.

    The draws come from torch's global CPU generator (``set_seed`` / ``torch.manual_seed``), two per batch when both
    augmentations are on (flips, then angles), so a seeded run draws the same augmentations on any device.
    A plain object, so it pickles (DataLoader workers, ``accelerate launch``).
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], hflip: bool = False, rotation: float = 0.0):
        self.mean, self.std, self.hflip, self.rotation = tuple(mean), tuple(std), hflip, float(rotation)

    def __repr__(self) -> str:
        return (f"BatchTransform(mean={self.mean}, std={self.std}, hflip={self.hflip}, "
                f"rotation={self.rotation})")

    def draw(self, batch_size: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Per-image flips (bool) and angles (degrees) for a batch, or None for an augmentation that is off."""
        flips = torch.rand(batch_size) < 0.5 if self.hflip else None
        angles = (torch.rand(batch_size) * 2 - 1) * self.rotation if self.rotation > 0 else None
        return flips, angles

    @staticmethod
    def augment(images: torch.Tensor, flips: torch.Tensor | None, angles: torch.Tensor | None) -> torch.Tensor:
        """Flip the images where ``flips``, then rotate each by its angle (counter-clockwise degrees, as
        ``torchvision.transforms.v2.functional.rotate``) about its centre; float images in, float images out."""
        if angles is None:
            if flips is None:
                return images
            return torch.where(flips.to(images.device)[:, None, None, None], images.flip(-1), images)
        # affine_grid's theta maps each output pixel (x, y in [-1, 1], y down) to the input pixel it samples:
        # undo the rotation, then the flip
        radians = torch.deg2rad(angles.double())
        cos, sin = torch.cos(radians), torch.sin(radians)
        sign = 1.0 - 2.0 * flips.double() if flips is not None else torch.ones_like(cos)
        theta = torch.zeros(len(angles), 2, 3, dtype=torch.float64)
        theta[:, 0, 0], theta[:, 0, 1] = sign * cos, -sign * sin
        theta[:, 1, 0], theta[:, 1, 1] = sin, cos
        theta = theta.to(device=images.device, dtype=images.dtype)
        grid = torch.nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
        return torch.nn.functional.grid_sample(images, grid, mode="nearest", padding_mode="zeros",
                                               align_corners=False)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"BatchTransform expects uint8 batches, got {images.dtype}")
        batch = images.float()
        if self.hflip or self.rotation > 0:
            batch = self.augment(batch, *self.draw(len(batch)))
        # (x / 255 - mean) / std, in one pass
        scale = torch.tensor([1 / (255 * s) for s in self.std], device=batch.device).view(1, -1, 1, 1)
        shift = torch.tensor([m / s for m, s in zip(self.mean, self.std)], device=batch.device).view(1, -1, 1, 1)
        return batch.mul_(scale).sub_(shift)


def build_batch_transform(cfg: DataConfig, augment: bool) -> BatchTransform:
    """The normalisation of uint8 batches on the device, with ``cfg``'s augmentation when ``augment``
    (``data.cache``'s training batches, whose images were resized when the cache was built)."""
    if cfg.mean is None or cfg.std is None:
        raise ValueError("data config not resolved (mean, std unset): use catdog.models.data_config")
    return BatchTransform(cfg.mean, cfg.std, hflip=augment and cfg.hflip, rotation=cfg.rotation if augment else 0.0)


class ImageDataset(Dataset):
    """``(image tensor, label, index)`` for each of a split's ``samples`` (``list_samples`` or ``list_files``);
    ``batch_transform`` finishes each batch on the model's device (``catdog.splits.open_split`` says which)."""

    def __init__(self, root: str | os.PathLike, split: str, classes: list[str], samples: list[Sample], transform,
                 image_size: int, batch_transform=no_batch_transform):
        self.root = Path(root)
        self.split = split
        self.classes = classes
        self.samples = samples
        self.transform = transform
        self.image_size = image_size
        self.batch_transform = batch_transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        sample = self.samples[index]
        return self.transform(load_rgb(sample.path, self.image_size)), sample.label, index

    def relative_path(self, index: int) -> str:
        return self.samples[index].path.relative_to(self.root).as_posix()

    def unaugmented(self, cfg: DataConfig) -> "ImageDataset":
        """The same samples with the evaluation transform (the train split as the linear probe reads it), without
        listing the folder again."""
        view = copy.copy(self)
        view.transform, view.batch_transform = build_transform(cfg, train=False), no_batch_transform
        return view

    @property
    def labels(self) -> list[int]:
        return [s.label for s in self.samples]


def run_when_idle() -> None:
    """Put this process under ``SCHED_IDLE`` (the lowest nice where Linux has no such policy), so that it runs only on
    a core the training step leaves idle. A worker that merely has a lower priority still takes a core from one of
    the step's OpenMP threads now and then (and, likely, the other spins at the next barrier meanwhile): the JPEG
    loop kept 0.91 of the step with workers at nice 10, 0.94-0.97 with ``SCHED_IDLE`` (``bench/train.py``)."""
    if hasattr(os, "SCHED_IDLE"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    else:
        os.nice(19)


def start_worker(worker_id: int, idle: bool) -> None:
    """A DataLoader worker's first step. It freezes the Python objects it inherited from the process that forked it
    (the model, the listings, torch's modules): its garbage collector never scans them, where the first full
    collection otherwise touched each one and so copied the parent's pages. That cost each of extraction's workers
    about 200 ms of a core (and the memory of the copies) at every start, with the model loaded (``gc.freeze``'s
    own advice for ``fork``). With ``idle``, the worker then runs only when the CPU is idle (``run_when_idle``)."""
    gc.freeze()
    if idle:
        run_when_idle()


def loader_options(num_workers: int, device: torch.device, persistent: bool = True) -> dict:
    """DataLoader keyword arguments for a loader feeding ``device``: ``num_workers`` workers (kept between passes
    when ``persistent``), pinned memory for a GPU, and workers started by ``start_worker``: they leave the objects
    they inherit alone and, when they share the CPU with the step, run only when it is idle."""
    options = dict(num_workers=num_workers, pin_memory=device.type == "cuda")
    if num_workers:
        options["persistent_workers"] = persistent
        options["worker_init_fn"] = functools.partial(start_worker, idle=device.type == "cpu")
    return options
