"""Build the ``{train,test,val}/<class>/`` layout from a flat pool of photos (PetImages or Kaggle naming).

Each image is decoded once, here: RGB JPEGs are copied byte for byte, anything else that decodes
(PNG with alpha, GIF, CMYK, greyscale) is converted to an RGB JPEG, and what does not decode is copied to
``quarantine/`` and listed in ``prepare_report.json``. The split of each file depends only on a hash of
its name and the seed, so adding photos to the pool never moves the ones already placed.
``quarantine_listed`` sets aside, the same way, the images a list names (e.g. a data audit's CSV).
"""
from __future__ import annotations

import csv
import hashlib
import io
import multiprocessing as mp
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageFile, ImageOps

from catdog.config import SPLITS
from catdog.data import IMAGE_SUFFIXES, path_list
from catdog.errors import CatdogError
from catdog.io import atomic_path, open_text, path_to_bytes, read_json, write_json, write_text
from catdog.progress import progress_bar

KAGGLE_NAME = re.compile(r"^(?P<cls>[a-zA-Z]+)\.(?P<id>[^.]+)\.[a-zA-Z]+$")


@dataclass(frozen=True)
class PoolImage:
    source: Path
    cls: str
    name: str
    """Destination file name, ``<class>.<id>.jpg`` (unique across classes)."""


def check_fractions(fractions: tuple[float, ...], what: str = "split fractions") -> None:
    """Train, test and val fractions: three non-negative numbers that sum to 1 (``what`` names them in the error)."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise CatdogError(f"{what} {','.join(f'{f:g}' for f in fractions)}: need three non-negative numbers (train, "
                          "test, val) that sum to 1, e.g. 0.8,0.1,0.1")


def assign_split(name: str, seed: int, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> str:
    """Deterministic split of one file name: a hash of (seed, the name's bytes) mapped to [0, 1) against the
    fractions. The bytes are the file system's (``path_to_bytes``), so any name has a split (UTF-8 names the one
    they always had)."""
    check_fractions(fractions)
    digest = hashlib.sha256(f"{seed}:".encode() + path_to_bytes(name)).digest()
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
            if not is_rgb_jpeg:  # re-encoded without EXIF, so turned upright by its orientation tag first
                converted = _to_rgb(ImageOps.exif_transpose(image))
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


QUARANTINE_LOG = "quarantined.csv"
"""``DATA/quarantine/quarantined.csv``: every image ``quarantine_listed`` moved, with the list that named it."""


def quarantine_listed(data_root: str | os.PathLike, csv_path: str | os.PathLike) -> dict:
    """Move the images a CSV lists (``path`` relative to ``data_root``) to ``data_root/quarantine/<path>``, as
    unreadable files are set aside, and log each in ``quarantine/quarantined.csv``. Images already moved are
    skipped, so a rerun is harmless; a path outside the data root, or in neither place, is an error before anything
    moves. Returns the counts ``moved`` and ``already`` and the ``log`` file's path."""
    root = Path(data_root).resolve()
    quarantine = root / "quarantine"
    todo, already = [], 0
    listed = [text for _, text in path_list(Path(csv_path), "--quarantine", root)]
    for relative in dict.fromkeys(listed):
        source = (root / relative).resolve()
        if not source.is_relative_to(root) or source.is_relative_to(quarantine):
            raise CatdogError(f"{csv_path}: path {relative!r} is not an image inside {root}; list paths relative to "
                              "the data root, as the audit writes them")
        if source.is_file():
            todo.append((relative, source, quarantine / source.relative_to(root)))
        elif (quarantine / source.relative_to(root)).is_file():
            already += 1
        else:
            raise CatdogError(f"{csv_path}: {relative} is in neither {root} nor {quarantine}; was the list made "
                              "for another data root?")
    log_path = quarantine / QUARANTINE_LOG
    with (open_text(log_path) if log_path.is_file() else io.StringIO("path,list\n")) as handle:
        lines = io.StringIO(handle.read())
    lines.seek(0, io.SEEK_END)
    for relative, source, dest in todo:
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, dest)  # one file system: a rename, never a partial copy
        csv.writer(lines, lineterminator="\n").writerow([relative, Path(csv_path).resolve()])
    if todo:
        write_text(log_path, lines.getvalue())
    return {"moved": len(todo), "already": already, "log": log_path}
