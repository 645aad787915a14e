"""Faults a user meets in ordinary use, through the jobs' command lines and ./launch.sh: a typo, an image PIL refuses,
a full disk, Ctrl-C, two jobs writing one run, and a resume with another config. Each ends in one line
``error: ...`` with the right exit code and no traceback, loses nothing, and a rerun completes.

The full-disk tests need root and ``unshare`` (a small tmpfs in a private mount namespace) and say so when they
skip; the Ctrl-C test sends SIGINT to a job whose SIGINT disposition is the default, as a terminal would.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from catdog.data import image_problem, limit_image_pixels, load_rgb
from catdog.config import DataConfig
from catdog.run import RunDir
from conftest import REPO, make_image_folder, run_script

TINY = ["data.image_size=64", "data.batch_size=8", "data.eval_batch_size=8", "data.num_workers=0", "optim.epochs=1",
        "extract.batch_size=8", "extract.num_workers=0"]


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def assert_one_error_line(text: str, *needles: str) -> str:
    """Exactly one ``error:`` line holding every needle, and no traceback anywhere."""
    errors = error_lines(text)
    assert len(errors) == 1, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def temporary_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*") if ".tmp-" in p.name]


def huge_png(path: Path, side: int = 20000) -> Path:
    """A PNG whose header says ``side`` x ``side`` pixels (400 million by default: PIL refuses it as a possible
    decompression bomb); only its header is real, which is all a check before decoding may read."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


# ------------------------------------------------------------------------------------------- a typo in launch.sh

@pytest.mark.parametrize("args, needle", [
    (["--models", "resnet1O1"], "timm has no model 'resnet1O1'"),
    (["--models", "efficientnet_lite0", "--set", "optim.lr=0"], "optim.lr"),
    (["--models", "efficientnet_lite0", "--set", "optim.nope=1"], "optim.nope: unknown key"),
    (["--models", "efficientnet_lite0", "--weights", "mobilenetv2_100=x.safetensors"],
     "mobilenetv2_100 is not one of --models"),
])
def test_launch_checks_models_and_overrides_before_the_first_stage(synthetic_root, tmp_path, args, needle):
    out = tmp_path / "runs"
    done = subprocess.run(["./launch.sh", "--data", str(synthetic_root), "--out", str(out), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert_one_error_line(done.stderr, needle)
    assert "== train" not in done.stdout and not out.exists()


def test_launcher_passes_a_jobs_exit_code_without_a_traceback(synthetic_root, tmp_path):
    """Several processes go through catdog.launcher (accelerate launch): a bad input ends it with exit 2 and the
    job's one line, which the first process alone prints."""
    done = subprocess.run([sys.executable, "-m", "catdog.launcher", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "jobs/train.py", "--model", "resnet1O1", "--data", str(synthetic_root), "--out",
                           str(tmp_path / "run")], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 2
    assert_one_error_line(done.stderr + done.stdout, "timm has no model 'resnet1O1'")


# ------------------------------------------------------------------------------------- images PIL refuses

def test_an_image_over_the_pixel_limit_is_refused_before_it_is_decoded(tmp_path, monkeypatch):
    from PIL import Image

    make_image_folder(tmp_path, {"train": 1})
    photo = tmp_path / "train" / "cat" / "cat.0.jpg"  # 48 x 40 = 1920 pixels
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self) or None)
    limit_image_pixels(DataConfig(max_image_pixels=1000))
    try:
        assert image_problem(photo) == ("too large (48 x 40 pixels): over data.max_image_pixels (1,000); raise it "
                                        "to use this image")
        with pytest.raises(Image.DecompressionBombError):
            load_rgb(photo)
        assert not decoded
    finally:
        limit_image_pixels(DataConfig())
    assert image_problem(photo) is None
    assert image_problem(huge_png(tmp_path / "huge.png")).startswith("too large (400,000,000 pixels)")


@pytest.fixture(scope="module")
def root_with_a_huge_image(tmp_path_factory, synthetic_root):
    """``synthetic_root`` with a 20000 x 20000 PNG in every split (header only)."""
    root = Path(shutil.copytree(synthetic_root, tmp_path_factory.mktemp("huge") / "data"))
    for split in ("train", "test", "val"):
        huge_png(root / split / "dog" / "dog.huge.png")
    return root


@pytest.mark.slow
def test_every_job_that_lists_a_split_skips_a_huge_image(root_with_a_huge_image, tmp_path, monkeypatch, capsys,
                                                         caplog):
    root, run = root_with_a_huge_image, tmp_path / "run"
    jobs = [
        ("jobs/train.py", ["--config", "configs/efficientnet_lite0.yaml", "--data", root, "--out", run, *TINY]),
        ("jobs/extract.py", ["--run", run, "--data", root, "extract.batch_size=8", "extract.num_workers=0"]),
        ("jobs/gradcam.py", ["gradcam.faithfulness_images=4", "gradcam.sanity_images_per_class=1",
                             "gradcam.road_percentiles=[90]", "--runs", run, "--data", root, "--out", tmp_path]),
        ("jobs/robustness.py", ["--run", run, "--data", root]),
        ("jobs/predict.py", ["--run", run, "--out", tmp_path / "predicted", "--labelled", root / "val"]),
    ]
    for script, args in jobs:
        caplog.clear()
        code, out, err = run_script(script, args, monkeypatch, capsys)
        assert code == 0, f"{script}: {err[-2000:]}"
        warnings = [r.getMessage() for r in caplog.records if "PIL cannot use" in r.getMessage()]
        assert warnings and all("dog.huge.png" in w and "too large" in w for w in warnings), (script, warnings)
    store_paths = json.dumps(json.loads((run / "features" / "manifest.json").read_text()))
    assert "dog.huge.png" not in store_paths  # topact and concepts read only the store's images
    assert RunDir(run).summary()["val_images"] == 10


# ------------------------------------------------------------------------------------------------- a full disk

def _namespace_script(script: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a bash ``script`` as root in a private mount namespace (its tmpfs mounts vanish with it)."""
    return subprocess.run(["unshare", "-m", "bash", "-c", script], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


needs_namespaces = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="a small disk needs a tmpfs in a private mount namespace: root and unshare(1)")


@pytest.mark.slow
@needs_namespaces
@pytest.mark.parametrize("job", ["extract", "train"])
def test_a_full_disk_is_one_line_and_a_rerun_with_space_completes(job, tiny_run, synthetic_root, tmp_path):
    """The run sits on a small tmpfs: the job fills it, ends with exit 2 and one line, leaves no temporary file and
    no partial file under a final name; with the disk grown, the same command completes."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if job == "extract":
        command = [sys.executable, "jobs/extract.py", "--run", f"{disk}/run", "--data", str(synthetic_root),
                   "extract.shard_size=10", "extract.batch_size=8", "extract.num_workers=0"]
        prepare = f"cp -r {tiny_run} {disk}/run && rm -rf {disk}/run/features {disk}/run/trackers"
        size, room = "80m", 300  # the run's own files fit; the store leaves 300 KiB for its first shards
    else:
        command = [sys.executable, "jobs/train.py", "--config", "configs/efficientnet_lite0.yaml", "--data",
                   str(synthetic_root), "--out", f"{disk}/run", *TINY, "optim.epochs=2"]
        prepare = "true"
        size, room = "200m", 40 * 1024  # room for the probe and best.safetensors, not for last.pt as well
    line = " ".join(f"'{part}'" for part in command)
    script = f"""
        mount -t tmpfs -o size={size} tmpfs {disk} && {prepare} || exit 99
        free=$(df --output=avail -k {disk} | tail -1)
        fallocate -l $(( (free - {room}) * 1024 )) {disk}/filler || exit 98
        {line} > {disk}/first.log 2>&1; echo "first $?"
        find {disk}/run -name '.*.tmp-*' | sed 's/^/temporary /'
        ls {disk}/run {disk}/run/features 2>/dev/null | sed 's/^/file /'
        cat {disk}/first.log | grep -v '^INFO' | tail -5 | sed 's/^/log /'
        rm {disk}/filler
        {line} {"--resume" if job == "train" else ""} > {disk}/second.log 2>&1; echo "second $?"
        tail -3 {disk}/second.log | sed 's/^/log2 /'
    """
    done = _namespace_script(script)
    report = done.stdout
    assert "first 2" in report and "second 0" in report, report + done.stderr
    first_log = "\n".join(l[4:] for l in report.splitlines() if l.startswith("log "))
    assert_one_error_line(first_log, f"no space left on the device writing in {disk}/run",
                          "--resume" if job == "train" else "run the same command again")
    assert "temporary" not in report, report
    if job == "train":
        assert "file summary.json" not in report.split("second")[0]


# ---------------------------------------------------------------------------------------------------- Ctrl-C

@pytest.mark.slow
def test_ctrl_c_during_training_ends_with_130_and_a_resume_line(tmp_path):
    data = make_image_folder(tmp_path / "data", {"train": 40, "test": 4, "val": 4}, seed=2)
    args = [sys.executable, "jobs/train.py", "--config", "configs/efficientnet_lite0.yaml", "--data", str(data),
            "--out", str(tmp_path / "run"), "data.image_size=64", "optim.epochs=3"]  # 2 DataLoader workers
    process = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True, env={**os.environ, "CATDOG_PROGRESS_SECONDS": "0"},
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    log = []
    for line in process.stdout:
        log.append(line)
        if line.startswith("epoch 2:") and " 1/3 " in line:  # mid-epoch, the loader's workers running
            os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group
            break
    log.append(process.communicate(timeout=120)[0])
    text = "".join(log)
    assert process.returncode == 130, text[-3000:]
    assert_one_error_line(text, "interrupted (Ctrl-C)", "--resume")
    assert not temporary_files(tmp_path / "run") and not (tmp_path / "run" / "writer.lock").exists()
    resumed = subprocess.run([*args, "--resume"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0 and "after epoch 1" in resumed.stdout, resumed.stdout[-2000:] + resumed.stderr


# ----------------------------------------------------------------------------------- two jobs writing one run

def test_a_second_writer_is_refused_and_readers_are_not(tiny_run, synthetic_root, tmp_path, monkeypatch, capsys):
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    with RunDir(run).writer("train"):
        holder = (run / "writer.lock").read_text().strip()
        assert f"process {os.getpid()}" in holder
        code, _, err = run_script("jobs/forest.py", ["--run", run], monkeypatch, capsys)
        assert code == 2
        assert_one_error_line(err, f"run {run} is being written by {holder}")
        assert not (run / "forest").exists()
        code, _, err = run_script("jobs/train.py", ["--out", run, "--data", synthetic_root, "--resume"],
                                  monkeypatch, capsys)
        assert code == 2 and "is being written by" in err
        code, out, err = run_script("jobs/predict.py", ["--run", run, "--out", tmp_path / "p", "--labelled",
                                                        synthetic_root / "val"], monkeypatch, capsys)
        assert code == 0, err  # readers are not blocked
    assert not (run / "writer.lock").exists()


def test_a_lock_left_by_a_killed_job_is_taken_over(tiny_run, synthetic_root, tmp_path, monkeypatch, capsys):
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from catdog.run import RunDir\n"
                               "with RunDir(sys.argv[1]).writer('train'):\n    print('held', flush=True); "
                               "time.sleep(600)", str(run)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    extract = ["--run", run, "--data", synthetic_root, "extract.batch_size=8", "extract.num_workers=0"]
    code, _, err = run_script("jobs/extract.py", extract, monkeypatch, capsys)
    assert code == 2 and f"train (process {holder.pid}" in err
    holder.kill()
    holder.wait()
    assert (run / "writer.lock").exists()  # SIGKILL ran no cleanup, but the kernel released the lock
    code, _, err = run_script("jobs/extract.py", extract, monkeypatch, capsys)
    assert code == 0, err
    assert RunDir(run).stage_marker("extract").is_file() and not (run / "writer.lock").exists()


# ---------------------------------------------------------------------------------- resume with another config

@pytest.mark.parametrize("overrides, needles", [
    (["model.name=mobilenetv2_100"], ["model.name 'efficientnet_lite0' -> 'mobilenetv2_100'"]),
    (["optim.lr=0.01", "data.image_size=96"], ["optim.lr 0.0001 -> 0.01", "data.image_size 64 -> 96"]),
])
def test_resume_names_each_difference_from_the_runs_config(overrides, needles, tiny_run, synthetic_root, tmp_path,
                                                           monkeypatch, capsys):
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    code, _, err = run_script("jobs/train.py", ["--out", run, "--data", synthetic_root, "--resume", *overrides],
                              monkeypatch, capsys)
    assert code == 2
    error = assert_one_error_line(err, *needles)
    assert "download" not in error


def test_which_differences_refuse_a_resume():
    from catdog.config import load_config
    from catdog.train import resume_differences

    saved = load_config(REPO / "configs" / "efficientnet_lite0.yaml")
    allowed = load_config(REPO / "configs" / "efficientnet_lite0.yaml",
                          ["optim.epochs=7", "train.log_with=none", "data.eval_batch_size=16", "extract.batch_size=4"])
    assert resume_differences(saved, allowed) == []
    shrunk = load_config(REPO / "configs" / "efficientnet_lite0.yaml", ["optim.epochs=3", "train.seed=1"])
    assert resume_differences(saved, shrunk) == ["optim.epochs 5 -> 3", "train.seed 42 -> 1"]


def test_resume_with_more_epochs_or_another_logger_is_allowed(tiny_run, synthetic_root, tmp_path, monkeypatch,
                                                              capsys):
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    code, out, err = run_script("jobs/train.py", ["--out", run, "--data", synthetic_root, "--resume",
                                                  "optim.epochs=2", "train.log_with=none"], monkeypatch, capsys)
    assert code == 0, err
    assert [r["epoch"] for r in RunDir(run).metrics()] == [1, 2]


def test_resume_on_a_data_root_with_other_classes(tiny_run, tmp_path, monkeypatch, capsys):
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    other = make_image_folder(tmp_path / "other", {"train": 4, "test": 2, "val": 2}, classes=("bird", "fish"))
    code, _, err = run_script("jobs/train.py", ["--out", run, "--data", other, "--resume"], monkeypatch, capsys)
    assert code == 2
    assert_one_error_line(err, "trained on classes ['cat', 'dog']", "['bird', 'fish']")
