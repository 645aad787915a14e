import os
import shutil

import pytest
import torch
from PIL import Image
from skimage import data as skimage_data
from torchvision import transforms as T
from torchvision.transforms import v2

from catdog.config import DataConfig
from catdog.data import build_transform, decode_steps, find_classes, loader_options
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


class _SchedulingPolicy(torch.utils.data.Dataset):
    """Each item is the scheduling policy of the process that loads it."""

    def __len__(self):
        return 4

    def __getitem__(self, index):
        return os.sched_getscheduler(0)


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux's")
def test_cpu_loader_workers_run_only_when_the_cpu_is_idle():
    mine = os.sched_getscheduler(0)
    assert mine != os.SCHED_IDLE
    cpu = torch.utils.data.DataLoader(_SchedulingPolicy(), batch_size=2, **loader_options(2, torch.device("cpu")))
    assert [int(p) for batch in cpu for p in batch] == [os.SCHED_IDLE] * 4
    assert os.sched_getscheduler(0) == mine  # the training process keeps its own policy
    gpu = loader_options(2, torch.device("cuda"))
    assert gpu["pin_memory"] and gpu["persistent_workers"] and "worker_init_fn" not in gpu
    assert loader_options(0, torch.device("cpu")) == {"num_workers": 0, "pin_memory": False}
