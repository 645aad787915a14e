import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from catdog.run import RunDir
from catdog.train import build_scheduler
from conftest import REPO, make_image_folder, tiny_config

TINY = ["data.image_size=64", "data.batch_size=4", "data.eval_batch_size=4", "data.num_workers=0"]


def _job(*args, launcher=(), env=None, **kwargs):
    return subprocess.Popen([*launcher, sys.executable, "jobs/train.py", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def test_run_directory_contract(tiny_run):
    run = RunDir(tiny_run)
    summary = run.summary()
    for key in ("model", "best_epoch", "best_test_accuracy", "val_accuracy", "train_seconds", "images_per_second"):
        assert key in summary
    assert 0 <= summary["best_test_accuracy"] <= 1 and 0 <= summary["val_accuracy"] <= 1
    assert (summary["test_images"], summary["val_images"]) == (14, 10)
    lines = [json.loads(line) for line in run.metrics_path.read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1]
    assert {"epoch", "train_loss", "test_accuracy", "seconds", "images_per_second"} <= set(lines[0])
    assert run.config().data.image_size == 64
    network, classes = run.load_model()
    assert classes == ["cat", "dog"] and not network.training
    assert not list(tiny_run.glob(".*tmp*"))


def test_learns_the_synthetic_task(tmp_path, synthetic_root):
    from catdog.train import train

    summary = train(tiny_config("optim.epochs=2", "optim.lr=1e-3"), synthetic_root, tmp_path / "run")
    assert summary["best_test_accuracy"] >= 0.85


def test_cosine_schedule_warms_up_and_decays():
    config = tiny_config("optim.schedule=cosine", "optim.warmup_epochs=1", "optim.epochs=3").optim
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = build_scheduler(config, optimizer, steps_per_epoch=10)
    lrs = []
    for _ in range(30):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] > lrs[20] > lrs[29] > 0


@pytest.mark.parametrize("args, message", [
    (["--data", "nowhere"], "data root nowhere: no such directory"),
    (["model.name=vgg"], "timm has no model 'vgg'"),
    (["optim.nope=1"], "optim.nope: unknown key"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, synthetic_root, monkeypatch, capsys, args, message):
    import runpy

    base = ["--config", "configs/efficientnet_lite0.yaml", "--data", str(synthetic_root), "--out", str(tmp_path / "r")]
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["jobs/train.py", *base, *args])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path("jobs/train.py", run_name="__main__")
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith("error: ") and message in error[-1]


@pytest.mark.slow
def test_kill_mid_epoch_then_resume_matches_uninterrupted(tmp_path):
    data = make_image_folder(tmp_path / "data", {"train": 24, "test": 4, "val": 4}, seed=1)
    args = ["--config", "configs/efficientnet_lite0.yaml", "--data", str(data), *TINY, "optim.epochs=2"]
    killed = tmp_path / "killed"
    process = _job(*args, "--out", str(killed), start_new_session=True)
    state = killed / "last.pt"
    while not state.exists() and process.poll() is None:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert torch.load(state, weights_only=True)["epoch"] == 1, "the kill should land in epoch 2"
    assert not (killed / "summary.json").exists()

    refused = _job(*args, "--out", str(killed))
    assert refused.wait(timeout=120) == 2
    resumed = _job("--data", str(data), "--out", str(killed), "--resume")
    log, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, log
    assert "resuming" in log and "after epoch 1" in log

    straight = _job(*args, "--out", str(tmp_path / "straight"))
    straight.communicate(timeout=300)
    epochs = [[json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (killed, tmp_path / "straight")]
    assert [r["epoch"] for r in epochs[0]] == [1, 2]
    assert epochs[0][1]["train_loss"] == pytest.approx(epochs[1][1]["train_loss"], rel=1e-4)
    a, b = (load_file(d / "best.safetensors") for d in (killed, tmp_path / "straight"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_cpu_processes_split_the_data_and_count_each_eval_image_once(tmp_path, synthetic_root):
    # accelerate 1.15's `--cpu --num_processes 2` starts ONE process; --multi_gpu plus Accelerator(cpu=True) gives two.
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(_free_port())]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    process = subprocess.Popen([*launcher, "jobs/train.py", "--config", "configs/efficientnet_lite0.yaml",
                                "--data", str(synthetic_root), "--out", str(tmp_path / "ddp"), *TINY, "optim.epochs=1"],
                               cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log, _ = process.communicate(timeout=600)
    assert process.returncode == 0, log
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["num_processes"] == 2
    per_rank = summary["images_per_rank"]
    assert len(per_rank) == 2 and all(n <= 24 for n in per_rank) and sum(per_rank) >= 48
    # 14 test and 10 val images in batches of 4 over 2 ranks: padding is added and must not be counted
    assert (summary["test_images"], summary["val_images"]) == (14, 10)
