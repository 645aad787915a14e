"""Shared fixtures: small synthetic image folders the tests make themselves, and a tiny trained run."""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from catdog.config import load_config

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "cats_vs_dogs"


def make_image_folder(root: Path, counts: dict[str, int], classes=("cat", "dog"), size=(40, 48), seed=0) -> Path:
    """``root/<split>/<class>/<class>.<i>.jpg``: noisy images whose dominant colour channel is the class."""
    rng = np.random.default_rng(seed)
    for split, n in counts.items():
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 80, (*size, 3), dtype=np.uint8)
                y, x = rng.integers(0, size[0] // 2), rng.integers(0, size[1] // 2)
                pixels[y:y + size[0] // 2, x:x + size[1] // 2, c % 3] += 170
                Image.fromarray(pixels).save(folder / f"{name}.{i}.jpg", quality=90)
    return root


def tiny_config(*overrides: str):
    """Lite0 with bundled ImageNet weights at 64 px: trains on the CPU in seconds."""
    return load_config(REPO / "configs" / "efficientnet_lite0.yaml", [
        "data.image_size=64", "data.batch_size=8", "data.eval_batch_size=8", "data.num_workers=0",
        "optim.epochs=1", "extract.batch_size=8", "extract.num_workers=0", *overrides])


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """24/7/5 images per class in train/test/val: odd counts, so batches never divide evenly."""
    return make_image_folder(tmp_path_factory.mktemp("data"), {"train": 24, "test": 7, "val": 5})


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, synthetic_root) -> Path:
    """A run directory trained for one epoch on ``synthetic_root`` (read-only for tests: copy to modify)."""
    from catdog.train import train

    out = tmp_path_factory.mktemp("run") / "lite0"
    train(tiny_config(), synthetic_root, out)
    return out


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent (acceptance data)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_local():
    """One small local Ray (2 CPUs, no dashboard) shared by the tests of the Ray stages."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def run_script(script: str, args: list, monkeypatch, capsys) -> tuple[int, str, str]:
    """``python SCRIPT ARGS`` in this process, from the repository root: (exit code, stdout, stderr)."""
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", [script, *map(str, args)])
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        code = exc.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need a CUDA GPU: without one they are deselected (pytest counts them as such), not
    skipped, so a run on the CPU reports only tests that could run here; bench/gpu_check.sh runs them on a GPU."""
    import torch

    if torch.cuda.is_available():
        return
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if not item.get_closest_marker("gpu")]
