"""data.cache: the uint8 array file of a split (built once, reused, rebuilt when its inputs change, never used half
written) and the batch transform that augments and normalises whole batches."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from catdog import cache
from catdog.cache import CachedImageDataset
from catdog.config import DataConfig
from catdog.data import BatchTransform, ImageDataset, build_batch_transform
from catdog.splits import open_split
from catdog.io import is_temp_path
from conftest import REPO, make_image_folder

# bicubic, and photos larger than 2x the size, so that JPEG draft decoding is exercised as in training
CACHED = DataConfig(image_size=32, interpolation="bicubic", mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.3),
                    cache=True, num_workers=0, hflip=True, rotation=10)


@pytest.fixture
def root(tmp_path):
    return make_image_folder(tmp_path / "data", {"train": 6, "test": 3, "val": 2}, size=(80, 96))


def count_decodes(monkeypatch) -> list:
    calls = []
    original = cache.load_rgb

    def counted(*args):
        calls.append(args[0])
        return original(*args)

    monkeypatch.setattr(cache, "load_rgb", counted)
    return calls


def test_items_are_uint8_chw_and_batches_become_normalised_float(root, tmp_path):
    dataset = open_split(root, "train", CACHED, train=True, cache_dir=tmp_path / "cache")
    assert isinstance(dataset, CachedImageDataset) and len(dataset) == 12
    image, label, index = dataset[7]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
    assert (label, index) == (1, 7)
    images, labels, indices = next(iter(DataLoader(dataset, batch_size=5)))
    assert images.dtype == torch.uint8 and images.shape == (5, 3, 32, 32)
    assert labels.tolist() == [0] * 5 and indices.tolist() == [0, 1, 2, 3, 4]
    assert torch.equal(images[3], dataset[3][0])  # the batched read (__getitems__) reads the same rows
    batch = dataset.batch_transform(images)
    assert batch.dtype == torch.float32 and batch.shape == (5, 3, 32, 32)
    assert (tmp_path / "cache" / "train.npy").is_file() and (tmp_path / "cache" / "train.json").is_file()
    assert np.load(tmp_path / "cache" / "train.npy", mmap_mode="r").shape == (12, 3, 32, 32)


def test_without_a_cache_dir_or_with_cache_off_the_jpeg_path_is_unchanged(root, tmp_path):
    cache_off = CACHED.model_copy(update={"cache": False})
    cache_dir = tmp_path / "cache"
    for dataset in (open_split(root, "test", CACHED), open_split(root, "test", cache_off, cache_dir=cache_dir)):
        assert type(dataset) is ImageDataset
        assert dataset[0][0].dtype == torch.float32
        assert torch.equal(dataset.batch_transform(dataset[0][0]), dataset[0][0])
    assert not (tmp_path / "cache").exists()


def test_eval_batches_equal_the_jpeg_path(root, tmp_path):
    jpeg = open_split(root, "test", CACHED)
    cached = open_split(root, "test", CACHED, cache_dir=tmp_path / "cache")
    with Image.open(jpeg.samples[0].path) as photo:  # JPEG draft decoding is in play, as in training
        assert photo.size == (96, 80)
    expected = torch.stack([jpeg[i][0] for i in range(len(jpeg))])
    got = cached.batch_transform(torch.stack([cached[i][0] for i in range(len(cached))]))
    assert got.shape == expected.shape == (6, 3, 32, 32)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    assert expected.std() > 0.5  # not a trivially flat image


def test_built_once_reused_then_rebuilt_when_the_images_change(root, tmp_path, monkeypatch):
    decoded = count_decodes(monkeypatch)
    open_split(root, "train", CACHED, train=True, cache_dir=tmp_path / "cache")
    assert len(decoded) == 12
    array = tmp_path / "cache" / "train.npy"
    first = array.stat()
    # another dataset on the split (eval transform, as the linear probe opens it) and a second run: no decoding
    open_split(root, "train", CACHED, cache_dir=tmp_path / "cache")
    open_split(root, "train", CACHED, train=True, cache_dir=tmp_path / "cache")
    assert len(decoded) == 12 and array.stat().st_ino == first.st_ino
    # another image: the file is rebuilt for the new list
    Image.fromarray(np.full((80, 96, 3), 200, np.uint8)).save(root / "train" / "dog" / "zzz.jpg")
    dataset = open_split(root, "train", CACHED, train=True, cache_dir=tmp_path / "cache")
    assert len(decoded) == 25 and len(dataset) == 13
    assert np.load(array, mmap_mode="r").shape == (13, 3, 32, 32)
    assert int(dataset[12][0].float().mean()) in range(195, 206)
    # a new image size or interpolation rebuilds too
    open_split(root, "train", CACHED.model_copy(update={"interpolation": "bilinear"}), cache_dir=tmp_path / "cache")
    assert len(decoded) == 38
    open_split(root, "train", CACHED.model_copy(update={"image_size": 24}), cache_dir=tmp_path / "cache")
    assert len(decoded) == 51 and np.load(array, mmap_mode="r").shape == (13, 3, 24, 24)


def test_a_new_decoder_rebuilds_the_file(root, tmp_path, monkeypatch):
    """The key records ``catdog.data.DECODER_VERSION``: images decoded by an earlier ``load_rgb`` (before EXIF
    orientation, say) are decoded again, not reused."""
    decoded = count_decodes(monkeypatch)
    open_split(root, "val", CACHED, cache_dir=tmp_path / "cache")
    open_split(root, "val", CACHED, cache_dir=tmp_path / "cache")
    assert len(decoded) == 4
    monkeypatch.setattr(cache, "DECODER_VERSION", cache.DECODER_VERSION + 1)
    open_split(root, "val", CACHED, cache_dir=tmp_path / "cache")
    assert len(decoded) == 8


def test_a_build_that_fails_half_way_leaves_nothing_that_is_used(root, tmp_path, monkeypatch):
    decoded = count_decodes(monkeypatch)
    original = cache.load_rgb

    def failing(*args):
        if len(decoded) > 3:
            raise OSError("disk gone")
        return original(*args)

    monkeypatch.setattr(cache, "load_rgb", failing)
    with pytest.raises(OSError, match="disk gone"):
        open_split(root, "train", CACHED, cache_dir=tmp_path / "cache")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [".train.lock"]


KILLED_BUILD = """
import sys, time
from catdog import cache
from catdog.config import DataConfig
from catdog.splits import open_split

original = cache.load_rgb
def slow(*args):
    time.sleep(0.5)
    return original(*args)
cache.load_rgb = slow
open_split(sys.argv[1], "train", DataConfig.model_validate_json(sys.argv[2]), cache_dir=sys.argv[3])
"""


def test_a_killed_build_leaves_no_half_file_used(root, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    builder = subprocess.Popen(
        [sys.executable, "-c", KILLED_BUILD, str(root), CACHED.model_dump_json(), str(cache_dir)], cwd=REPO)
    deadline = time.monotonic() + 60
    while not any(is_temp_path(p) for p in cache_dir.glob(".*")):
        assert builder.poll() is None and time.monotonic() < deadline, "the build did not start"
        time.sleep(0.1)
    os.kill(builder.pid, signal.SIGKILL)
    builder.wait()
    left = sorted(p.name for p in cache_dir.iterdir())
    assert "train.npy" not in left and "train.json" not in left
    assert any(is_temp_path(name) for name in left)  # the killed writer's partial file, under its temporary name
    decoded = count_decodes(monkeypatch)
    dataset = open_split(root, "train", CACHED, cache_dir=cache_dir)
    assert len(decoded) == 12  # rebuilt from scratch, and the stale temporary file removed
    assert sorted(p.name for p in cache_dir.iterdir()) == [".train.lock", "train.json", "train.npy"]
    jpeg = open_split(root, "train", CACHED)
    assert torch.allclose(dataset.batch_transform(dataset[11][0][None])[0], jpeg[11][0], atol=1e-5)


def test_a_damaged_array_file_is_rebuilt(root, tmp_path, monkeypatch):
    open_split(root, "val", CACHED, cache_dir=tmp_path / "cache")
    (tmp_path / "cache" / "val.npy").write_bytes(b"\x93NUMPY garbage")
    decoded = count_decodes(monkeypatch)
    dataset = open_split(root, "val", CACHED, cache_dir=tmp_path / "cache")
    assert len(decoded) == 4 and dataset[3][0].shape == (3, 32, 32)


def identical_batch(size=32, n=16) -> torch.Tensor:
    """``n`` copies of one asymmetric image (no row reads the same mirrored)."""
    image = torch.randint(0, 256, (3, size, size), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    return image.expand(n, -1, -1, -1).contiguous()


def test_flips_are_drawn_per_image():
    batch = identical_batch()
    transform = BatchTransform(mean=(0.5,) * 3, std=(0.5,) * 3, hflip=True)
    torch.manual_seed(0)
    out = transform(batch)
    plain = BatchTransform(mean=(0.5,) * 3, std=(0.5,) * 3)(batch[:1])[0]
    flipped = [torch.equal(o, plain.flip(-1)) for o in out]
    kept = [torch.equal(o, plain) for o in out]
    assert all(f != k for f, k in zip(flipped, kept))  # each is the image or its mirror image
    assert 0 < sum(flipped) < len(out)  # some of each in one batch


def test_rotations_are_drawn_per_image_and_match_torchvision():
    batch = identical_batch()
    transform = BatchTransform(mean=(0.0,) * 3, std=(1 / 255,) * 3, hflip=True, rotation=10)  # normalising is a no-op
    torch.manual_seed(3)
    out = transform(batch)
    torch.manual_seed(3)
    flips, angles = transform.draw(len(batch))
    assert angles.abs().max() <= 10 and len(set(angles.tolist())) == len(batch)
    assert len({o.numpy().tobytes() for o in out}) == len(batch)  # every image augmented differently
    for image, flip, angle in zip(out, flips, angles):
        source = batch[0].float().flip(-1) if flip else batch[0].float()
        expected = F.rotate(source, angle.item(), interpolation=InterpolationMode.NEAREST, fill=0)
        assert torch.allclose(image, expected, atol=1e-3)


def test_augmentation_is_reproducible_under_the_global_seed():
    batch = identical_batch()
    transform = build_batch_transform(CACHED, augment=True)
    torch.manual_seed(7)
    first = transform(batch)
    torch.manual_seed(7)
    again = transform(batch)
    torch.manual_seed(8)
    other = transform(batch)
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_eval_transform_does_not_augment_and_the_transform_pickles():
    import pickle

    batch = identical_batch()
    transform = build_batch_transform(CACHED, augment=False)
    assert (transform.hflip, transform.rotation) == (False, 0.0)
    out = pickle.loads(pickle.dumps(transform))(batch)
    expected = (batch.float() / 255 - torch.tensor(CACHED.mean).view(3, 1, 1)) / torch.tensor(CACHED.std).view(3, 1, 1)
    assert torch.allclose(out, expected, atol=1e-5)
    with pytest.raises(TypeError, match="uint8"):
        transform(batch.float())


def test_the_unaugmented_view_shares_the_array_file_and_does_not_augment(root, tmp_path):
    train_set = open_split(root, "train", CACHED, train=True, cache_dir=tmp_path)
    view = train_set.unaugmented(CACHED)
    assert view.path == train_set.path and view.samples is train_set.samples
    assert train_set.batch_transform.rotation > 0 and (view.batch_transform.hflip, view.batch_transform.rotation) == (
        False, 0.0)
    batch = torch.stack([view[i][0] for i in range(len(view))])
    assert torch.equal(view.batch_transform(batch), open_split(root, "train", CACHED, cache_dir=tmp_path)
                       .batch_transform(batch))


def test_loader_workers_read_the_cache(root, tmp_path):
    dataset = open_split(root, "train", CACHED, train=True, cache_dir=tmp_path / "cache")
    dataset[0]  # mapped in this process: the workers must map their own, not receive pickled pages
    serial = [b[0] for b in DataLoader(dataset, batch_size=4)]
    parallel = [b[0] for b in DataLoader(dataset, batch_size=4, num_workers=2, multiprocessing_context="spawn")]
    assert all(torch.equal(a, b) for a, b in zip(serial, parallel)) and len(parallel) == 3


def test_training_runs_on_the_cache(synthetic_root, tmp_path):
    from catdog.run import RunDir
    from catdog.train import train
    from conftest import tiny_config

    run = RunDir(tmp_path / "run")
    summary = train(tiny_config("data.cache=true"), synthetic_root, run.path)
    assert 0 <= summary["val_accuracy"] <= 1 and summary["val_images"] == 10
    shapes = {split: np.load(run.cache_dir / f"{split}.npy", mmap_mode="r").shape for split in ("train", "test", "val")}
    assert shapes == {"train": (48, 3, 64, 64), "test": (14, 3, 64, 64), "val": (10, 3, 64, 64)}
