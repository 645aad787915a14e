import json
from collections import Counter

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
