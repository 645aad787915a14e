import hashlib
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from catdog.errors import CatdogError
from catdog.prepare import assign_split, discover_pool, prepare


def _petimages(root):
    """A small PetImages-like pool with the kinds of broken files the real archive has."""
    rng = np.random.default_rng(0)
    for cls in ("Cat", "Dog"):
        (root / cls).mkdir(parents=True)
        for i in range(20):
            Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(root / cls / f"{i}.jpg")
    (root / "Cat" / "100.jpg").write_bytes(b"")                                          # 0 bytes
    good = (root / "Cat" / "1.jpg").read_bytes()
    (root / "Cat" / "101.jpg").write_bytes(good[: len(good) // 2])                        # truncated JPEG
    Image.new("RGBA", (20, 20), (255, 0, 0, 0)).save(root / "Dog" / "102.jpg", format="PNG")  # PNG named .jpg
    Image.new("CMYK", (20, 20)).save(root / "Dog" / "103.jpg", format="JPEG")             # CMYK
    Image.new("L", (20, 20)).save(root / "Dog" / "104.jpg", format="JPEG")                # greyscale
    Image.new("P", (20, 20)).save(root / "Dog" / "105.jpg", format="GIF")                 # GIF
    (root / "Dog" / "Thumbs.db").write_bytes(b"junk")
    return root


def test_split_is_deterministic_stable_and_proportional():
    names = [f"cat.{i}.jpg" for i in range(5000)]
    splits = [assign_split(n, seed=0) for n in names]
    assert splits == [assign_split(n, seed=0) for n in names]
    counts = Counter(splits)
    assert abs(counts["train"] / 5000 - 0.8) < 0.02 and abs(counts["val"] / 5000 - 0.1) < 0.02
    assert splits != [assign_split(n, seed=1) for n in names]
    with pytest.raises(CatdogError, match="sum to 1"):
        assign_split("x", 0, (0.5, 0.5, 0.5))


def test_prepare_converts_quarantines_and_resumes(tmp_path):
    source = _petimages(tmp_path / "PetImages")
    out = tmp_path / "data"
    report = prepare(source, out, workers=2)
    assert report["images"] == 46
    assert {q["source"].rsplit("/", 1)[1] for q in report["quarantined"]} == {"100.jpg", "101.jpg"}
    assert len(report["converted"]) == 4
    placed = [p for split in ("train", "test", "val") for p in (out / split).glob("*/*")]
    assert len(placed) == 44 and all(p.suffix == ".jpg" for p in placed)
    assert len(list((out / "quarantine").rglob("*.jpg"))) == 2
    for path in placed:
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
    copied = next((out / "train" / "cat").glob("cat.*.jpg"))
    original = source / "Cat" / f"{copied.name.split('.')[1]}.jpg"
    assert copied.read_bytes() == original.read_bytes()
    again = prepare(source, out, workers=2)
    assert again["placed_this_run"] == 0 and len(again["quarantined"]) == 2
    assert json.loads((out / "prepare_report.json").read_text())["counts"] == report["counts"]


def test_kaggle_naming_and_bad_source(tmp_path):
    flat = tmp_path / "train"
    flat.mkdir()
    for name in ("cat.1.jpg", "dog.7.jpg"):
        Image.new("RGB", (8, 8)).save(flat / name, format="JPEG")
    (flat / "notes.txt").write_text("")
    assert [(p.cls, p.name) for p in discover_pool(flat)] == [("cat", "cat.1.jpg"), ("dog", "dog.7.jpg")]
    with pytest.raises(CatdogError, match="no such directory"):
        discover_pool(tmp_path / "absent")


def test_a_name_that_is_not_utf8_is_placed_and_reported(tmp_path):
    """A photo named in Latin-1 (an old camera card) keeps its name; UTF-8 names keep the split they always had."""
    source = _petimages(tmp_path / "PetImages")
    latin1 = os.fsdecode(b"chat_\xe9t\xe9.jpg")
    os.rename(source / "Cat" / "3.jpg", source / "Cat" / latin1)
    out = tmp_path / "data"
    report = prepare(source, out, workers=2)
    placed = [p for p in out.glob("*/cat/*") if "chat" in p.name]
    assert [p.name for p in placed] == [f"cat.{Path(latin1).stem}.jpg"]
    assert placed[0].parent.parent.name == assign_split(placed[0].name, seed=0)
    assert placed[0].read_bytes() == (source / "Cat" / latin1).read_bytes()
    assert json.loads((out / "prepare_report.json").read_text())["counts"] == report["counts"]
    name = "cat.ü.jpg"  # UTF-8: hashed from the same bytes as before names that are not UTF-8 were allowed
    u = int.from_bytes(hashlib.sha256(f"0:{name}".encode()).digest()[:8], "big") / 2**64
    assert assign_split(name, seed=0) == ("train" if u < 0.8 else "test" if u < 0.9 else "val")


def test_a_converted_photo_is_turned_upright_by_its_exif_tag(tmp_path):
    """A PNG stored on its side with EXIF orientation 6 (rotate 90° clockwise to view) is re-encoded upright."""
    y, x = np.mgrid[0:30, 0:40]
    upright = np.stack([x * 6, y * 8, np.full_like(x, 128)], axis=-1).astype(np.uint8)  # smooth: JPEG keeps it
    pool = tmp_path / "pool" / "Cat"
    pool.mkdir(parents=True)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90).save(pool / "1.png", exif=exif.tobytes())
    report = prepare(tmp_path / "pool", tmp_path / "data", workers=1)
    assert len(report["converted"]) == 1
    with Image.open(next((tmp_path / "data").glob("*/cat/cat.1.jpg"))) as placed:
        assert placed.size == (40, 30)
        assert np.abs(np.asarray(placed, dtype=float) - upright).mean() < 8  # JPEG loss; turned the wrong way: 80
