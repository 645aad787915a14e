import gc
import os
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image
from skimage import data as skimage_data
from torchvision import transforms as T
from torchvision.transforms import v2

from catdog.config import DataConfig
from catdog.data import (DRAFT_MIN_SIDE, build_transform, decode_steps, find_classes, list_files, list_samples,
                         load_rgb, loader_options)
from catdog.splits import open_split
from catdog.errors import CatdogError
from conftest import make_image_folder

SMALL = DataConfig(image_size=32, interpolation="bilinear", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def test_classes_and_samples(synthetic_root):
    assert find_classes(synthetic_root) == ["cat", "dog"]
    dataset = open_split(synthetic_root, "test", SMALL)
    assert len(dataset) == 14
    image, label, index = dataset[13]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert (label, index) == (1, 13)
    assert dataset.relative_path(0) == "test/cat/cat.0.jpg"


def test_train_transform_augments_eval_does_not(synthetic_root):
    train_set = open_split(synthetic_root, "train", SMALL, train=True)
    eval_set = open_split(synthetic_root, "train", SMALL)
    torch.manual_seed(0)
    draws = [train_set[0][0] for _ in range(4)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])
    assert torch.equal(eval_set[0][0], eval_set[0][0])
    view = train_set.unaugmented(SMALL)  # the linear probe's train split: same samples, eval transform
    assert view.samples is train_set.samples and torch.equal(view[0][0], eval_set[0][0])
    assert any(not torch.equal(train_set[0][0], train_set[0][0]) for _ in range(4))  # the original still augments


def test_unreadable_files_are_skipped_not_fatal(tmp_path):
    root = make_image_folder(tmp_path / "d", {"train": 3, "test": 2, "val": 2})
    (root / "train" / "cat" / "empty.jpg").write_bytes(b"")
    (root / "train" / "dog" / "text.jpg").write_text("not an image")
    assert len(open_split(root, "train", SMALL)) == 6


@pytest.mark.parametrize("breakage, message", [
    (lambda r: shutil.rmtree(r / "val"), "missing split folder"),
    (lambda r: (r / "test" / "bird").mkdir(), "class folders differ between splits"),
    (lambda r: [shutil.rmtree(r / "test" / c) for c in ("cat", "dog")], r"0 class folder\(s\) \[\]"),
    (lambda r: shutil.rmtree(r / "val" / "dog"), r"1 class folder\(s\) \['cat'\]; a classifier needs at least two"),
])
def test_layout_errors_name_the_problem(tmp_path, breakage, message):
    root = make_image_folder(tmp_path / "d", {"train": 2, "test": 2, "val": 2})
    breakage(root)
    with pytest.raises(CatdogError, match=message):
        find_classes(root)


def test_empty_split_and_missing_root(tmp_path):
    root = make_image_folder(tmp_path / "d", {"train": 2, "test": 2, "val": 2})
    for f in (root / "val").rglob("*.jpg"):
        f.unlink()
    with pytest.raises(CatdogError, match="no readable images"):
        open_split(root, "val", SMALL)
    with pytest.raises(CatdogError, match="no such directory"):
        find_classes(tmp_path / "nowhere")


def test_a_class_without_images_in_one_split_is_named(tmp_path):
    root = make_image_folder(tmp_path / "d", {"train": 2, "test": 2, "val": 2})
    for f in (root / "test" / "dog").iterdir():
        f.unlink()
    (root / "test" / "dog" / "notes.txt").write_text("not an image")
    assert len(open_split(root, "train", SMALL)) == 4
    with pytest.raises(CatdogError, match=f"class folder {root / 'test' / 'dog'}: no readable images"):
        open_split(root, "test", SMALL)


def test_jpeg_training_items_are_uint8_and_normalised_per_batch(synthetic_root):
    """The workers ship uint8 training images; the dataset's batch transform normalises them on the device to what
    the eval transform makes of each image (float rounding apart)."""
    plain = SMALL.model_copy(update={"hflip": False, "rotation": 0.0})
    train_set = open_split(synthetic_root, "train", plain, train=True)
    eval_set = open_split(synthetic_root, "train", plain)
    items = torch.stack([train_set[i][0] for i in range(4)])
    assert items.dtype == torch.uint8 and items.shape == (4, 3, 32, 32)
    expected = torch.stack([eval_set[i][0] for i in range(4)])
    assert torch.allclose(train_set.batch_transform(items), expected, atol=1e-5)
    assert train_set.unaugmented(plain).batch_transform(expected) is expected
    assert open_split(synthetic_root, "train", SMALL, train=True)[0][0].dtype == torch.uint8  # augmented, still uint8


def test_the_tensor_resize_matches_pil():
    """decode_steps resizes on the uint8 tensor; a photo comes out as PIL's own resize would make it, to about one
    grey level."""
    photo = Image.fromarray(skimage_data.chelsea())
    cfg = SMALL.model_copy(update={"image_size": 224, "interpolation": "bicubic"})
    ours = v2.Compose(decode_steps(cfg))(photo).int()
    pil = T.PILToTensor()(T.Resize((224, 224), interpolation=T.InterpolationMode.BICUBIC)(photo)).int()
    difference = (ours - pil).abs()
    assert difference.max() <= 8 and (difference > 1).float().mean() < 1e-3


def test_a_transform_needs_a_resolved_data_config():
    with pytest.raises(ValueError, match="mean, std unset"):
        build_transform(DataConfig(image_size=32, interpolation="bicubic"), train=False)


class _WorkerState(torch.utils.data.Dataset):
    """Each item is the scheduling policy of the process that loads it and how many objects its GC leaves alone."""

    def __len__(self):
        return 4

    def __getitem__(self, index):
        return os.sched_getscheduler(0), gc.get_freeze_count()


def _worker_states(options: dict) -> list[tuple[int, int]]:
    loader = torch.utils.data.DataLoader(_WorkerState(), batch_size=None, **options)
    return [(int(policy), int(frozen)) for policy, frozen in loader]


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux's")
def test_loader_workers_leave_inherited_objects_alone_and_on_the_cpu_run_only_when_it_is_idle():
    mine, inherited = os.sched_getscheduler(0), len(gc.get_objects())
    assert mine != os.SCHED_IDLE and gc.get_freeze_count() == 0
    cpu = _worker_states(loader_options(2, torch.device("cpu")))
    assert [policy for policy, _ in cpu] == [os.SCHED_IDLE] * 4
    assert all(frozen >= inherited / 2 for _, frozen in cpu)  # the parent's objects, frozen in each worker
    assert os.sched_getscheduler(0) == mine and gc.get_freeze_count() == 0  # this process keeps its own state
    gpu = loader_options(2, torch.device("cuda"))
    assert gpu["pin_memory"] and gpu["persistent_workers"]
    states = _worker_states({**gpu, "pin_memory": False})
    assert [policy for policy, _ in states] == [mine] * 4 and all(frozen >= inherited / 2 for _, frozen in states)
    assert loader_options(0, torch.device("cpu")) == {"num_workers": 0, "pin_memory": False}


def test_data_exclude_leaves_the_listed_files_out_of_every_split(tmp_path):
    """``data.exclude``: a CSV with a ``path`` column or a text file, paths relative to the data root."""
    root = make_image_folder(tmp_path / "d", {"train": 3, "test": 2, "val": 2})
    csv_file = tmp_path / "suspects.csv"
    csv_file.write_text("path,score\ntrain/cat/cat.1.jpg,0.9\nval/dog/dog.0.jpg,0.5\n")
    text_file = tmp_path / "suspects.txt"
    text_file.write_text("# from the audit\ntrain/dog/dog.2.jpg\n\n")
    for exclude, gone in ((csv_file, {"train/cat/cat.1.jpg", "val/dog/dog.0.jpg"}), (text_file, {"train/dog/dog.2.jpg"})):
        cfg = SMALL.model_copy(update={"exclude": str(exclude)})
        listed = {split: [open_split(root, split, cfg).relative_path(i) for i in range(len(open_split(root, split, cfg)))]
                  for split in ("train", "val")}
        everything = {p.relative_to(root).as_posix() for p in root.rglob("*.jpg") if p.parts[-3] in ("train", "val")}
        assert set(listed["train"]) | set(listed["val"]) == everything - gone
        assert listed["train"] == sorted(listed["train"], key=lambda p: (p.split("/")[1], p))


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ("train/cat/nope.jpg\n", "line 1, 'train/cat/nope.jpg', is not an image file under the data root"),
    ("../d/train/cat/cat.0.jpg\n", "line 1, '../d/train/cat/cat.0.jpg', is not an image file under"),
    ("file,score\ntrain/cat/cat.0.jpg,1\n", "a CSV needs a 'path' column"),
])
def test_a_bad_exclude_file_is_one_error_naming_it(tmp_path, content, message):
    root = make_image_folder(tmp_path / "d", {"train": 2, "test": 2, "val": 2})
    exclude = tmp_path / ("list.csv" if content and content.startswith("file") else "list.txt")
    if content is not None:
        exclude.write_text(content)
    cfg = SMALL.model_copy(update={"exclude": str(exclude)})
    with pytest.raises(CatdogError, match=re.escape(f"data.exclude {exclude}: ") + ".*" + re.escape(message)):
        open_split(root, "train", cfg)


def test_list_files_opens_nothing_and_list_samples_checks_each_header(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "d", {"train": 2, "test": 2, "val": 2})
    (root / "train" / "cat" / "broken.jpg").write_bytes(b"not a jpeg")
    checked = list_samples(root, "train", ["cat", "dog"])
    monkeypatch.setattr(Image, "open", lambda *args, **kwargs: pytest.fail("list_files opened an image"))
    listed = list_files(root, "train", ["cat", "dog"])
    assert [s.path.name for s in listed] == ["broken.jpg", "cat.0.jpg", "cat.1.jpg", "dog.0.jpg", "dog.1.jpg"]
    assert [s.path.name for s in checked] == [s.path.name for s in listed if s.path.name != "broken.jpg"]


def blocky_photo(width: int, height: int) -> Image.Image:
    """Flat 16 x 16 colour blocks: turned by a multiple of 90 degrees they stay on JPEG's 8 x 8 grid, so an upright
    and a turned copy encode (4:4:4) to the same pixels."""
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
    return Image.fromarray(blocks.repeat(16, axis=0).repeat(16, axis=1))


@pytest.mark.parametrize("orientation", [3, 5, 6, 8])
def test_exif_orientation_decodes_as_a_viewer_shows_it(tmp_path, orientation):
    """The same picture stored upright, and stored turned with the EXIF tag that says how to turn it back, decode to
    the same pixels, at full size and at a JPEG draft scale."""
    upright = blocky_photo(128, 96)
    undo = {3: Image.Transpose.ROTATE_180, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90,
            8: Image.Transpose.ROTATE_270}[orientation]  # the inverse of what the tag asks for
    upright.save(tmp_path / "upright.jpg", quality=95, subsampling=0)
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    upright.transpose(undo).save(tmp_path / "turned.jpg", quality=95, subsampling=0, exif=exif)
    with Image.open(tmp_path / "turned.jpg") as stored:
        assert stored.size == ((96, 128) if orientation >= 5 else (128, 96))  # 5-8 swap the sides
    for size, expected in ((None, (128, 96)), (32, (64, 48))):  # 32 px: both sides >= 0.8 * 32 at half scale
        a, b = (load_rgb(tmp_path / name, size) for name in ("upright.jpg", "turned.jpg"))
        assert a.size == b.size == expected
        difference = np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int))
        assert difference.max() <= 2, difference.max()


def test_jpeg_draft_reduces_a_typical_photo_to_no_less_than_draft_min_side(tmp_path):
    """A 450 x 374 photo (the shared photos' median) for 224 px: half scale, 225 x 187, both sides >= 0.8 x 224;
    PIL's own rule (both sides >= 224) would decode it in full."""
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (374, 450, 3), dtype=np.uint8)).save(tmp_path / "p.jpg")
    decoded = load_rgb(tmp_path / "p.jpg", 224)
    assert decoded.size == (225, 187) and min(decoded.size) >= DRAFT_MIN_SIDE * 224
    assert load_rgb(tmp_path / "p.jpg", 240).size == (450, 374)  # half scale would be under 0.8 x 240 = 192
