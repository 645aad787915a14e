import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from catdog.run import RunDir
from catdog.train import LOG_EVERY_STEPS, build_scheduler
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


DEFAULT_RECIPE = ["--config", "configs/efficientnet_lite0.yaml", "data.image_size=64"]
"""The shipped default (2 DataLoader workers, EMA, cosine schedule with warm-up, LP-FT, WiSE-FT, hflip TTA, 5 epochs)
on small images: nothing of the recipe switched off."""


def _sha256(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The default recipe trained once without a kill, on 160 train images: 5 steps an epoch."""
    tmp = tmp_path_factory.mktemp("resume")
    data = make_image_folder(tmp / "data", {"train": 80, "test": 8, "val": 8}, seed=1)
    process = _job(*DEFAULT_RECIPE, "--data", str(data), "--out", str(tmp / "straight"))
    log, _ = process.communicate(timeout=600)
    assert process.returncode == 0, log
    return data, tmp / "straight"


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_killed_at_a_random_step_and_resumed_ends_bit_identical(uninterrupted, tmp_path, seed):
    """SIGKILL right after a random step of a random epoch (the progress bar prints a line per step with
    CATDOG_PROGRESS_SECONDS=0), then --resume: the same losses and the same best.safetensors, bit for bit."""
    import random

    data, straight = uninterrupted
    epoch, step = random.Random(seed).randint(1, 5), random.Random(seed + 100).randint(1, 4)
    killed = tmp_path / "killed"
    process = _job(*DEFAULT_RECIPE, "--data", str(data), "--out", str(killed), start_new_session=True,
                   env={**os.environ, "CATDOG_PROGRESS_SECONDS": "0"})
    for line in process.stdout:
        if line.startswith(f"epoch {epoch}:") and f" {step}/5 " in line:
            os.killpg(process.pid, signal.SIGKILL)
            break
    process.wait()
    assert process.returncode == -signal.SIGKILL, f"epoch {epoch} step {step} was never reached"
    state = killed / "last.pt"
    done = torch.load(state, weights_only=True)["epoch"] if state.exists() else 0
    print(f"seed {seed}: killed after step {step} of epoch {epoch}; last.pt holds {done} completed epoch(s)")
    assert done == epoch - 1

    if done:
        refused = _job(*DEFAULT_RECIPE, "--data", str(data), "--out", str(killed))
        assert refused.wait(timeout=120) == 2  # without --resume, a run with a state is not overwritten
    resumed = _job(*DEFAULT_RECIPE, "--data", str(data), "--out", str(killed), "--resume")
    log, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, log
    if done:
        assert f"after epoch {done}" in log

    def outcomes(run):
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [{k: r[k] for k in ("epoch", "train_loss", "test_accuracy", "test_accuracy_no_tta", "lr")}
                for r in records]

    assert outcomes(killed) == outcomes(straight)  # exactly: the same losses, to the last bit
    assert _sha256(killed / "best.safetensors") == _sha256(straight / "best.safetensors")
    a, b = (json.loads((run / "summary.json").read_text()) for run in (killed, straight))
    assert (a["best_epoch"], a["val_accuracy"]) == (b["best_epoch"], b["val_accuracy"])
    assert not list(killed.rglob(".*.tmp-*")) and not (killed / "writer.lock").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_cpu_processes_split_the_data_and_count_each_eval_image_once(tmp_path, synthetic_root):
    from catdog import probe
    """Also: the linear probe is fitted once, on the main process, from features each process sends it alone."""
    # accelerate 1.15's `--cpu --num_processes 2` starts ONE process; --multi_gpu plus Accelerator(cpu=True) gives two.
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(_free_port())]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    process = subprocess.Popen([*launcher, "jobs/train.py", "--config", "configs/efficientnet_lite0.yaml",
                                "--data", str(synthetic_root), "--out", str(tmp_path / "ddp"), *TINY, "optim.epochs=1",
                                "train.linear_probe_max_rows=30"],
                               cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log, _ = process.communicate(timeout=600)
    assert process.returncode == 0, log
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["num_processes"] == 2
    # the linear probe: fitted once, by the main process, on its stratified sample of the 48 train images, each
    # once (not per rank, not padded); test and val scored by both ranks, each image once
    assert log.count("linear probe: fitting on") == 1
    assert "linear probe: fitting on 30 train images (a stratified sample of 48)" in log
    _, scores = probe.load(RunDir(tmp_path / "ddp"))
    assert (scores["test_accuracy"] * 14).is_integer() and (scores["val_accuracy"] * 10).is_integer()
    per_rank = summary["images_per_rank"]
    assert len(per_rank) == 2 and all(n <= 24 for n in per_rank) and sum(per_rank) >= 48
    # 14 test and 10 val images in batches of 4 over 2 ranks: padding is added and must not be counted
    assert (summary["test_images"], summary["val_images"]) == (14, 10)
    rows = (tmp_path / "ddp" / "val_predictions.csv").read_text().splitlines()[1:]
    listed = sorted(str(p.relative_to(synthetic_root)) for p in (synthetic_root / "val").rglob("*.jpg"))
    assert [row.split(",")[0] for row in rows] == listed  # every val image once, in the split's order


def test_linear_probe_is_reported_and_lp_ft_starts_from_its_head(tmp_path, synthetic_root, capsys):
    from catdog import probe
    from catdog.train import train

    # a learning rate too small to move anything: the trained head must still be the probe's
    summary = train(tiny_config("optim.head_init=linear_probe", "optim.lr=1e-12", "train.ema_decay=null",
                                "train.log_with=none"), synthetic_root, tmp_path / "run")
    assert "linear probe: fitting on 48 train images (process" in capsys.readouterr().out  # no bound reached
    run = RunDir(tmp_path / "run")
    state, scores = probe.load(run)
    assert summary["linear_probe_test_accuracy"] == scores["test_accuracy"]
    assert summary["linear_probe_val_accuracy"] == scores["val_accuracy"]
    trained = load_file(run.best_checkpoint)
    head = run.load_model()[0].head.state_dict()
    for key, value in state.items():
        torch.testing.assert_close(head[key], value, atol=1e-6, rtol=0)
    assert len(trained) > len(state)
    # and the probe network scores on val what the probe reported
    network = probe.load_probe_network(run)
    assert torch.equal(network.head.weight, state["weight"])


def test_probe_fit_folds_sklearn_into_one_linear_layer():
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    from catdog import probe

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16)) * 2
    def sample(n):
        labels = rng.integers(0, 3, n)
        return (centres[labels] + rng.normal(size=(n, 16))).astype(np.float32), labels
    train, test, val = sample(300), sample(100), sample(100)
    candidates = probe.fit(train, seed=0)
    counts = {name: (probe.hits(candidates, *split).sum(0), len(split[1])) for name, split in (("test", test),
                                                                                                ("val", val))}
    state, scores = probe.best(candidates, counts["test"], counts["val"])
    assert all(tensor.is_contiguous() for tensor in state.values())  # safetensors saves only contiguous tensors
    reference = LogisticRegression(C=scores["C"], max_iter=5000, random_state=0).fit(*train)
    logits = torch.from_numpy(val[0]) @ state["weight"].T + state["bias"]
    assert (logits.argmax(1).numpy() == reference.predict(val[0])).all()
    assert scores["val_accuracy"] == pytest.approx(reference.score(*val))
    assert scores["test_accuracy"] == max(LogisticRegression(C=c, max_iter=5000, random_state=0).fit(*train).score(*test)
                                          for c in probe.REGULARISATION)


def test_binary_probe_gives_sklearns_probabilities():
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    from catdog import probe

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 200)
    features = (labels[:, None] * 1.5 + rng.normal(size=(200, 8))).astype(np.float32)
    candidates = probe.fit((features, labels), seed=0)
    count = (probe.hits(candidates, features, labels).sum(0), len(labels))
    state, scores = probe.best(candidates, count, count)
    reference = LogisticRegression(C=scores["C"], max_iter=5000, random_state=0).fit(features, labels)
    probabilities = (torch.from_numpy(features) @ state["weight"].T + state["bias"]).softmax(1)
    np.testing.assert_allclose(probabilities.numpy(), reference.predict_proba(features), atol=1e-5)


def test_ema_weights_are_the_ones_kept_and_resumed(tmp_path, synthetic_root):
    from catdog.train import train

    train(tiny_config("train.ema_decay=0.5", "train.wise_ft=1", "optim.lr=1e-3", "train.log_with=none"), synthetic_root,
          tmp_path / "run")
    run = RunDir(tmp_path / "run")
    state = run.load_state()
    best = load_file(run.best_checkpoint)
    assert state["ema"] is not None
    assert all(torch.equal(best[k], state["ema"][k]) for k in best)
    moved = [k for k in best if best[k].is_floating_point() and not torch.equal(best[k], state["model"][k])]
    assert moved, "the EMA should lag the trained weights"


def test_hflip_tta_averages_the_softmax_of_each_image_and_its_mirror():
    from torch.utils.data import DataLoader, TensorDataset

    from catdog.data import no_batch_transform
    from catdog.devices import accelerator_for
    from catdog.train import evaluate

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    images, labels = torch.randn(40, 3, 8, 8), torch.randint(0, 2, (40,))
    model(images)
    loader = DataLoader(TensorDataset(images, labels, torch.arange(40)), batch_size=16)
    accelerator, _ = accelerator_for("no", force_cpu=True)  # full precision, as the reference below
    result = evaluate(model, loader, accelerator, "test", False, no_batch_transform, tta_hflip=True)
    with torch.no_grad():
        mean = model(images).softmax(1) + model(images.flip(-1)).softmax(1)
        plain = model(images).argmax(1)
    assert result["accuracy"] * 40 == pytest.approx((plain == labels).sum().item())
    assert result["accuracy_tta"] * 40 == pytest.approx((mean.argmax(1) == labels).sum().item())
    assert (mean.argmax(1) != plain).any(), "the mirror images should change some predictions"


def test_discriminative_learning_rates_put_the_head_at_lr():
    from catdog import models
    from catdog.train import build_optimizer

    network = models.create("efficientnet_lite0", 2, pretrained="none", freeze_stages=4)
    optimizer = build_optimizer(tiny_config("optim.lr=1e-3", "optim.backbone_lr_scale=0.1").optim, network)
    head, backbone = optimizer.param_groups
    assert {id(p) for p in head["params"]} == {id(p) for p in network.head.parameters()}
    assert head["lr"] == 1e-3 and backbone["lr"] == pytest.approx(1e-4)
    assert all(p.requires_grad for p in backbone["params"])
    assert len(backbone["params"]) == sum(p.requires_grad for p in network.parameters()) - 2


def test_trackers_log_the_curves_to_tensorboard(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = RunDir(tiny_run)
    events = EventAccumulator(str(run.trackers_dir / "train"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "test/accuracy", "train/images_per_second", "val/accuracy"} <= scalars
    logged = [event.value for event in events.Scalars("test/accuracy")]
    assert logged == pytest.approx([record["test_accuracy"] for record in run.metrics()])
    steps = -(-run.metrics()[-1]["images_per_rank"][0] // 8)
    assert len(events.Scalars("train/loss")) == -(-steps // LOG_EVERY_STEPS)


def test_wise_ft_mixes_the_start_and_the_trained_weights(tmp_path, synthetic_root):
    from catdog import probe
    from catdog.train import train, wise_ft

    a = {"w": torch.zeros(3), "steps": torch.tensor(1)}
    b = {"w": torch.full((3,), 4.0), "steps": torch.tensor(9)}
    mixed = wise_ft(a, b, 0.25)
    assert torch.equal(mixed["w"], torch.full((3,), 1.0)) and mixed["steps"] == 9

    overrides = ["optim.head_init=linear_probe", "optim.lr=1e-3", "train.ema_decay=null", "train.log_with=none"]
    train(tiny_config(*overrides, "train.wise_ft=0.5"), synthetic_root, tmp_path / "mixed")
    run = RunDir(tmp_path / "mixed")
    trained = run.load_state()["model"]
    start = probe.load_probe_network(run).state_dict()
    kept = load_file(run.best_checkpoint)
    for key in ("backbone.classifier.weight", "backbone.conv_head.weight"):
        torch.testing.assert_close(kept[key], (start[key] + trained[key]) / 2)
    assert not torch.equal(kept["backbone.conv_head.weight"], trained["backbone.conv_head.weight"])
