"""Build the ``{train,test,val}/<class>/`` layout from a flat pool of photos (PetImages or Kaggle naming).

Each image is decoded once, here: RGB JPEGs are copied byte for byte, anything else that decodes
(PNG with alpha, GIF, CMYK, greyscale) is converted to an RGB JPEG, and what does not decode is copied to
``quarantine/`` and listed in ``prepare_report.json``. The split of each file depends only on a hash of
its name and the seed, so adding photos to the pool never moves the ones already placed.
"""
from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageFile

from catdog.config import SPLITS
from catdog.data import IMAGE_SUFFIXES
from catdog.errors import CatdogError
from catdog.io import atomic_path, read_json, write_json
from catdog.progress import progress_bar

KAGGLE_NAME = re.compile(r"^(?P<cls>[a-zA-Z]+)\.(?P<id>[^.]+)\.[a-zA-Z]+$")


@dataclass(frozen=True)
class PoolImage:
    source: Path
    cls: str
    name: str
    """Destination file name, ``<class>.<id>.jpg`` (unique across classes)."""


def assign_split(name: str, seed: int, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> str:
    """Deterministic split of one file name: a hash of (seed, name) mapped to [0, 1) against the fractions."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise CatdogError(f"split fractions {fractions}: need three non-negative numbers that sum to 1")
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < fractions[0]:
        return SPLITS[0]
    return SPLITS[1] if u < fractions[0] + fractions[1] else SPLITS[2]


def discover_pool(source: str | os.PathLike) -> list[PoolImage]:
    """Images of a PetImages tree (``Cat/123.jpg``) or a Kaggle folder (``cat.123.jpg``), with their class."""
    source = Path(source)
    if not source.is_dir():
        raise CatdogError(f"source {source}: no such directory (give the PetImages folder or Kaggle's train folder)")
    class_dirs = [p for p in sorted(source.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    pool = []
    if class_dirs:
        for class_dir in class_dirs:
            cls = class_dir.name.lower()
            for path in sorted(class_dir.iterdir()):
                if path.suffix.lower() in IMAGE_SUFFIXES:
                    pool.append(PoolImage(path, cls, f"{cls}.{path.stem}.jpg"))
    else:
        for path in sorted(source.iterdir()):
            match = KAGGLE_NAME.match(path.name)
            if match and path.suffix.lower() in IMAGE_SUFFIXES:
                cls = match["cls"].lower()
                pool.append(PoolImage(path, cls, f"{cls}.{match['id']}.jpg"))
    if not pool:
        raise CatdogError(f"source {source}: found no images (expected Cat/ and Dog/ folders, or files named cat.1.jpg)")
    return pool


def _strict_decoding() -> None:
    ImageFile.LOAD_TRUNCATED_IMAGES = False


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB with any transparency composited onto white."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def place_image(item: PoolImage, dest: Path, quarantine: Path) -> tuple[str, str]:
    """Decode one image and write it to ``dest``: returns (``copied``|``converted``|``quarantined``, reason)."""
    try:
        with Image.open(item.source) as image:
            image.load()
            is_rgb_jpeg = image.format == "JPEG" and image.mode == "RGB"
            if not is_rgb_jpeg:
                converted = _to_rgb(image)
                reason = f"{image.format} {image.mode} -> RGB JPEG"
    except Exception as exc:  # PIL raises many types for broken files; every one means "undecodable"
        quarantine.mkdir(parents=True, exist_ok=True)
        with atomic_path(quarantine / item.source.name) as tmp:
            shutil.copyfile(item.source, tmp)
        return "quarantined", f"{type(exc).__name__}: {exc}"
    with atomic_path(dest) as tmp:
        if is_rgb_jpeg:
            shutil.copyfile(item.source, tmp)
            return "copied", ""
        converted.save(tmp, format="JPEG", quality=95)
    return "converted", reason


def _place(args: tuple[PoolImage, Path, Path]) -> tuple[PoolImage, str, str]:
    item, dest, quarantine = args
    return item, *place_image(item, dest, quarantine)


def prepare(source: str | os.PathLike, out: str | os.PathLike, seed: int = 0,
            fractions: tuple[float, float, float] = (0.8, 0.1, 0.1), workers: int | None = None) -> dict:
    """Place every pool image into ``out/<split>/<class>/``; files already placed are skipped. Returns the report."""
    out = Path(out)
    pool = discover_pool(source)
    quarantine = out / "quarantine"
    report_path = out / "prepare_report.json"
    previous = read_json(report_path) if report_path.exists() else {}
    converted, quarantined = previous.get("converted", []), previous.get("quarantined", [])
    todo, counts = [], Counter(f"quarantined/{q['class']}" for q in quarantined)
    for item in pool:
        split = assign_split(item.name, seed, fractions)
        dest = out / split / item.cls / item.name
        if dest.exists():
            counts[f"{split}/{item.cls}"] += 1
        elif not (quarantine / item.cls / item.source.name).exists():
            todo.append((item, dest, quarantine / item.cls))
    with mp.Pool(workers or os.cpu_count(), initializer=_strict_decoding) as workers_pool:
        for item, status, reason in progress_bar(workers_pool.imap_unordered(_place, todo, chunksize=16),
                                         total=len(todo), desc="prepare", unit="img"):
            entry = {"source": str(item.source), "class": item.cls, "reason": reason}
            if status == "quarantined":
                quarantined.append(entry)
                counts[f"quarantined/{item.cls}"] += 1
                continue
            if status == "converted":
                converted.append(entry)
            counts[f"{assign_split(item.name, seed, fractions)}/{item.cls}"] += 1
    report = {
        "source": str(Path(source).resolve()),
        "seed": seed,
        "fractions": list(fractions),
        "images": len(pool),
        "placed_this_run": len(todo),
        "counts": dict(sorted(counts.items())),
        "converted": converted,
        "quarantined": quarantined,
    }
    write_json(report_path, report)
    return report
