"""A careless user's mistakes, through the jobs' command lines: each ends with one line, ``error: ...``, naming
the file or field and what to do, exit code 2, and nothing written or changed."""
from __future__ import annotations

import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from catdog.io import file_sha256
from conftest import REPO, make_image_folder

TINY = ["data.image_size=64", "data.batch_size=8", "data.eval_batch_size=8", "data.num_workers=0",
        "optim.epochs=1", "extract.num_workers=0"]


def run_job(job: str, args: list[str], monkeypatch, capsys) -> str:
    """Run ``jobs/<job>.py`` in this process; assert exit code 2 and one ``error:`` line; return that line."""
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", [f"jobs/{job}.py", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(f"jobs/{job}.py", run_name="__main__")
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    return errors[0]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with its sha256: what "nothing changed" is checked against."""
    return {str(p.relative_to(folder)): file_sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def copy_run(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


@pytest.mark.parametrize("override, field", [
    ("optim.lr=-0.001", "optim.lr"),
    ("optim.lr=0", "optim.lr"),
    ("optim.epochs=0", "optim.epochs"),
    ("data.batch_size=0", "data.batch_size"),
    ("optim.label_smoothing=1.0", "optim.label_smoothing"),
    ("data.num_workers=-1", "data.num_workers"),
    ("model.freeze_stages=-2", "model.freeze_stages"),
])
def test_train_config_out_of_range(override, field, synthetic_root, tmp_path, monkeypatch, capsys):
    error = run_job("train", ["--config", "configs/efficientnet_lite0.yaml", "--data", synthetic_root,
                              "--out", tmp_path / "run", override], monkeypatch, capsys)
    assert f"{field}: Input should be" in error
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, field", [
    ("gradcam.removal_fraction=1.5", "gradcam.removal_fraction"),
    ("gradcam.removal_fraction=0", "gradcam.removal_fraction"),
    ("gradcam.faithfulness_images=0", "gradcam.faithfulness_images"),
    ("gradcam.methods=[]", "gradcam.methods"),
])
def test_gradcam_config_out_of_range(override, field, tiny_run, synthetic_root, tmp_path, monkeypatch, capsys):
    error = run_job("gradcam", [override, "--runs", tiny_run, "--data", synthetic_root, "--out", tmp_path / "out"],
                    monkeypatch, capsys)
    assert field in error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("job, override, field", [
    ("extract", "extract.shard_size=0", "extract.shard_size"),
    ("extract", "extract.splits=[train,train]", "extract.splits"),
    ("forest", "forest.n_estimators=0", "forest.n_estimators"),
    ("sweep", "sweep.ks=[0]", "sweep.ks"),
    ("topact", "topact.overlay_alpha=2", "topact.overlay_alpha"),
])
def test_later_stages_config_out_of_range(job, override, field, tiny_run, synthetic_root, tmp_path, monkeypatch,
                                          capsys):
    run = copy_run(tiny_run, tmp_path)
    before = snapshot(run)
    args = ["--run", run, override] + (["--data", synthetic_root] if job in ("extract", "topact") else [])
    assert field in run_job(job, args, monkeypatch, capsys)
    assert snapshot(run) == before


def test_data_root_with_one_class(tmp_path, monkeypatch, capsys):
    root = make_image_folder(tmp_path / "data", {"train": 2, "test": 2, "val": 2}, classes=("cat",))
    error = run_job("train", ["--data", root, "--out", tmp_path / "run", *TINY], monkeypatch, capsys)
    assert f"split {root / 'train'}: 1 class folder(s) ['cat']; a classifier needs at least two" in error
    assert not (tmp_path / "run").exists()


def test_class_with_no_images_in_one_split(tmp_path, monkeypatch, capsys):
    root = make_image_folder(tmp_path / "data", {"train": 2, "test": 2, "val": 2})
    for image in (root / "val" / "dog").iterdir():
        image.unlink()
    error = run_job("train", ["--data", root, "--out", tmp_path / "run", *TINY], monkeypatch, capsys)
    assert f"class folder {root / 'val' / 'dog'}: no readable images" in error and "add images of 'dog'" in error
    assert not (tmp_path / "run").exists()


def test_out_is_an_existing_file(synthetic_root, tmp_path, monkeypatch, capsys):
    out = tmp_path / "results.txt"
    out.write_text("keep me")
    error = run_job("train", ["--data", synthetic_root, "--out", out, *TINY], monkeypatch, capsys)
    assert f"--out {out}: is an existing file" in error
    assert out.read_text() == "keep me"
    error = run_job("report", ["--runs", tmp_path, "--out", out / "report"], monkeypatch, capsys)
    assert f"{out} is a file" in error


def test_out_in_a_folder_that_cannot_be_written(synthetic_root, tmp_path):
    """As root, permission bits do not stop writes: mount a read-only tmpfs in a private mount namespace."""
    locked = tmp_path / "locked"
    locked.mkdir()
    job = [sys.executable, "jobs/train.py", "--data", str(synthetic_root), "--out", str(locked / "run"), *TINY]
    if os.geteuid() == 0:
        if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"]).returncode != 0:
            pytest.skip("unshare -m is not available here")
        command = ["unshare", "-m", "sh", "-c", f'mount -t tmpfs -o ro tmpfs "{locked}" && exec "$@"', "sh", *job]
    else:
        locked.chmod(0o555)
        command = job
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"--out {locked / 'run'}: cannot write in {locked}" in errors[0]


def test_damaged_training_state_on_resume(tiny_run, synthetic_root, tmp_path, monkeypatch, capsys):
    run = copy_run(tiny_run, tmp_path)
    state = run / "last.pt"
    state.write_bytes(state.read_bytes()[:5000])
    before = snapshot(run)
    error = run_job("train", ["--out", run, "--data", synthetic_root, "--resume"], monkeypatch, capsys)
    assert f"run {run}: last.pt is damaged" in error and "delete it" in error
    assert snapshot(run) == before


def test_training_state_of_another_model_on_resume(tiny_run, synthetic_root, tmp_path, monkeypatch, capsys):
    import torch

    run = copy_run(tiny_run, tmp_path)
    state = torch.load(run / "last.pt", weights_only=True)
    state["model"] = {name: tensor[:1] if tensor.dim() else tensor for name, tensor in state["model"].items()}
    torch.save(state, run / "last.pt")
    error = run_job("train", ["--out", run, "--data", synthetic_root, "--resume"], monkeypatch, capsys)
    assert f"run {run}: last.pt: does not fit efficientnet_lite0" in error


@pytest.mark.parametrize("job", ["extract", "gradcam"])
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_checkpoint_in_later_stages(job, damage, tiny_run, synthetic_root, tmp_path, monkeypatch, capsys):
    run = copy_run(tiny_run, tmp_path)
    checkpoint = run / "best.safetensors"
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[:len(data) // 2] if damage == "truncated" else b"\x00" * 64 + data[64:])
    before = snapshot(run)
    args = (["--run", run, "--data", synthetic_root, *TINY] if job == "extract"
            else ["--runs", run, "--data", synthetic_root, "--out", tmp_path / "out"])
    error = run_job(job, args, monkeypatch, capsys)
    assert f"run {run}: best.safetensors is damaged" in error and "train the run again" in error
    assert snapshot(run) == before
    assert not (tmp_path / "out" / "gradcam" / "summary.json").exists()


def test_damaged_shard_in_later_stages(tiny_run, synthetic_root, tmp_path, monkeypatch, capsys):
    run = copy_run(tiny_run, tmp_path)
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["jobs/extract.py", "--run", str(run), "--data", str(synthetic_root), *TINY,
                                      "extract.shard_size=20", "extract.mixed_precision=no"])
    runpy.run_path("jobs/extract.py", run_name="__main__")
    shard = run / "features" / "train-0001.h5"
    shard.write_bytes(shard.read_bytes()[:-100])
    for job, extra in [("forest", []), ("sweep", []), ("topact", ["--data", synthetic_root])]:
        error = run_job(job, ["--run", run, *extra], monkeypatch, capsys)
        assert "train-0001.h5" in error and "jobs/extract.py" in error
    assert not (run / "forest").exists()


@pytest.mark.parametrize("job", ["forest", "sweep"])
def test_a_run_directory_that_is_not_one(job, tmp_path, monkeypatch, capsys):
    error = run_job(job, ["--run", tmp_path / "nowhere"], monkeypatch, capsys)
    assert f"run {tmp_path / 'nowhere'}: no config.yaml" in error
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("job, args, option", [
    ("predict", ["--batch-size", "0"], "--batch-size"),
    ("predict", ["--batch-size", "many"], "--batch-size"),
    ("predict", ["--workers", "-1"], "--workers"),
    ("predict", ["--precision", "fp8"], "--precision"),
    ("prepare", ["--workers", "0"], "--workers"),
    ("prepare", ["--split", "0.8,0.2"], "--split"),
    ("prepare", ["--split", "0.5,0.1,0.1"], "--split"),
    ("prepare", ["--seed", "x"], "--seed"),
    ("train", ["--epochs", "3"], "--epochs"),
])
def test_nonsense_option_values(job, args, option, synthetic_root, tmp_path, monkeypatch, capsys):
    """A bad option value (or an unknown option) is one line naming the option, before any work: nothing written."""
    common = {"predict": ["--run", tmp_path / "run", "--out", tmp_path / "out", synthetic_root / "val"],
              "prepare": ["--source", synthetic_root / "train", "--out", tmp_path / "out"],
              "train": ["--data", synthetic_root, "--out", tmp_path / "out"]}[job]
    error = run_job(job, [*common, *args], monkeypatch, capsys)
    assert option in error
    assert not (tmp_path / "out").exists()


def launch(args: list[str]) -> subprocess.CompletedProcess:
    """``./launch.sh ARGS``: its options are checked before the environment is set up, so this starts nothing."""
    return subprocess.run(["./launch.sh", *args], cwd=REPO, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args, option", [
    (["--processes", "0"], "--processes 0"),
    (["--processes", "two"], "--processes two"),
    (["--processes", "-1"], "--processes -1"),
    (["--data"], "--data needs a value"),
    (["--data", "--out", "x"], "--data needs a value"),
    (["--models"], "--models needs"),
    (["--weights", "resnet50"], "--weights resnet50"),
    (["--set", "optim.epochs"], "--set optim.epochs"),
    (["--source", "/nonexistent/pool"], "--source /nonexistent/pool"),
    (["--verbose"], "unknown option --verbose"),
])
def test_launch_refuses_nonsense_options(args, option, tmp_path):
    done = launch([*args, "--out", str(tmp_path / "runs")])
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and option in done.stderr and len(done.stderr.splitlines()) == 1
    assert done.stdout == "" and not (tmp_path / "runs").exists()
