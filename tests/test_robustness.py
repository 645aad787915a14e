"""jobs/robustness.py on the tiny run: every corruption and both models in summary.json, the clean accuracy equal
to jobs/predict.py's, corruptions that really change the inputs, a run without a probe, one-line errors."""
from __future__ import annotations

import contextlib
import io
import json
import runpy
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torchvision.transforms.v2 import functional as F

from catdog import models
from catdog.data import build_transform, load_rgb
from catdog.devices import autocast
from catdog.predict import list_labelled
from catdog.report import report
from catdog.robustness import CLEAN, corrupt, corruption_parameters, decode_transform
from catdog.run import RunDir
from conftest import REPO, run_script
from test_predict import run_predict

CORRUPTIONS = ["gaussian_noise", "gaussian_blur", "jpeg", "brightness", "contrast"]


def run_robustness(args: list, monkeypatch, capsys) -> tuple[int, str, str]:
    """``jobs/robustness.py ARGS`` in this process: (exit code, stdout, stderr)."""
    return run_script("jobs/robustness.py", args, monkeypatch, capsys)


def write_probe(run: RunDir, seed: int = 0) -> None:
    """A linear probe file as training writes it: the classifier's state dict on the pretrained backbone (here a
    seeded random head, so the test does not depend on the probe's fit)."""
    config, classes = run.config(), run.summary()["classes"]
    torch.manual_seed(seed)
    network = models.create(config.model.name, len(classes), pretrained=config.model.pretrained)
    save_file({key: value.contiguous() for key, value in network.head.state_dict().items()}, run.linear_probe_path)


@pytest.fixture(scope="module")
def probe_run(tiny_run, tmp_path_factory) -> Path:
    """A copy of the tiny run with a linear probe of its own and no robustness results."""
    run = tmp_path_factory.mktemp("robustness") / "lite0"
    shutil.copytree(tiny_run, run)
    shutil.rmtree(run / "robustness", ignore_errors=True)
    write_probe(RunDir(run))
    return run


@pytest.fixture(scope="module")
def scored(probe_run, synthetic_root) -> tuple[Path, dict, str]:
    """The job run once on the val split: (run, summary.json, stdout)."""
    mp, out = pytest.MonkeyPatch(), io.StringIO()
    try:
        mp.chdir(REPO)
        mp.setattr(sys, "argv", ["jobs/robustness.py", "--run", str(probe_run), "--data", str(synthetic_root)])
        with contextlib.redirect_stdout(out):
            runpy.run_path("jobs/robustness.py", run_name="__main__")  # a SystemExit would fail the tests
    finally:
        mp.undo()
    return probe_run, json.loads(RunDir(probe_run).robustness_summary.read_text()), out.getvalue()


def test_summary_has_every_corruption_and_both_models(scored, synthetic_root):
    run, summary, out = scored
    assert list(summary["results"]) == [CLEAN, *CORRUPTIONS] == [CLEAN, *summary["corruptions"]]
    assert summary["models"] == ["fine_tuned", "linear_probe"] and summary["linear_probe"] is True
    assert summary["split"] == "val" and summary["data"] == str(synthetic_root) and summary["images"] == 10
    assert summary["classes"] == ["cat", "dog"] and summary["skipped"] == []
    for name, result in summary["results"].items():
        for model in ("fine_tuned", "linear_probe"):
            assert 0 <= result[model] <= 1, (name, model)
            assert result[model] == result[f"{model}_correct"] / 10
        assert result["difference"] == pytest.approx(result["fine_tuned"] - result["linear_probe"])
    assert summary["below_linear_probe"] == [name for name, r in summary["results"].items() if r["difference"] < 0]
    mean = summary["mean_corrupted"]
    assert mean["fine_tuned"] == pytest.approx(np.mean([summary["results"][c]["fine_tuned"] for c in CORRUPTIONS]))
    # the parameters, as used, are recorded: severity 3, the seed, the blur scaled to the run's 64 px
    assert summary["severity"] == 3 and summary["seed"] == 0 and summary["image_size"] == 64
    assert summary["corruptions"] == corruption_parameters(64)
    assert summary["corruptions"]["gaussian_noise"]["sigma"] == 0.18
    assert summary["corruptions"]["jpeg"]["quality"] == 15
    assert summary["corruptions"]["gaussian_blur"]["kernel_size"] == 7
    assert (run / "robustness" / "config.yaml").is_file()
    assert not [p.name for p in (run / "robustness").iterdir() if p.name.startswith(".")]  # no temporary left
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("corruption"))
    assert [line.split()[0] for line in lines[header + 1:header + 7]] == [CLEAN, *CORRUPTIONS]
    assert f"wrote {RunDir(run).robustness_summary}" in out


def test_clean_accuracy_equals_predict(scored, synthetic_root, tmp_path, monkeypatch, capsys):
    run, summary, _ = scored
    code, _, err = run_predict(["--run", run, "--out", tmp_path / "predict", "--labelled", synthetic_root / "val"],
                               monkeypatch, capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "predict" / "metrics.json").read_text())
    clean = summary["results"][CLEAN]
    assert clean["fine_tuned"] == metrics["accuracy"] and clean["fine_tuned_correct"] == metrics["correct"]
    assert summary["precision"] == metrics["precision"] and summary["images"] == metrics["images"]
    config = RunDir(run).config()
    if not config.data.cache and not config.train.tta_hflip:  # then training evaluated val exactly as predict does
        assert clean["fine_tuned"] == json.loads((run / "summary.json").read_text())["val_accuracy"]


def test_clean_probe_accuracy_equals_its_own_evaluation(scored, synthetic_root):
    """The probe's clean accuracy is the probe network's on the run's eval transform, image by image."""
    from catdog.probe import load_probe_network

    run, summary, _ = scored
    run = RunDir(run)
    config, classes = run.config(), run.summary()["classes"]
    network = load_probe_network(run)
    transform = build_transform(config.data, train=False)
    items = list_labelled(synthetic_root / "val", classes)
    batch = torch.stack([transform(load_rgb(item.path, config.data.image_size)) for item in items])
    with torch.inference_mode(), autocast("cpu", summary["precision"]):
        predicted = network(batch.contiguous(memory_format=torch.channels_last)).float().argmax(dim=1).numpy()
    correct = int((predicted == np.array([item.label for item in items])).sum())
    assert summary["results"][CLEAN]["linear_probe_correct"] == correct


def decoded_val(synthetic_root: Path, config) -> tuple[torch.Tensor, list[int]]:
    items = list_labelled(synthetic_root / "val", ["cat", "dog"])
    transform = decode_transform(config.data)
    return torch.stack([transform(load_rgb(item.path, config.data.image_size)) for item in items]), list(range(10))


def test_corruptions_change_the_inputs(probe_run, synthetic_root):
    config = RunDir(probe_run).config()
    images, indices = decoded_val(synthetic_root, config)
    assert images.dtype == torch.uint8 and images.shape == (10, 3, 64, 64)
    parameters = corruption_parameters(64)
    clean = corrupt(CLEAN, images, indices, parameters)
    # the clean batch, normalised, is what the eval transform makes of each image
    transform = build_transform(config.data, train=False)
    items = list_labelled(synthetic_root / "val", ["cat", "dog"])
    expected = torch.stack([transform(load_rgb(item.path, 64)) for item in items])
    assert torch.equal(F.normalize(clean, config.data.mean, config.data.std), expected)
    for name in CORRUPTIONS:
        corrupted = corrupt(name, images, indices, parameters)
        assert corrupted.dtype == torch.float32 and corrupted.shape == clean.shape, name
        assert 0 <= corrupted.min() and corrupted.max() <= 1, name
        changed = (corrupted - clean).abs().flatten(1).mean(dim=1)
        assert (changed > 0.005).all(), (name, changed)  # every image changes, visibly
        assert torch.equal(corrupt(name, images, indices, parameters), corrupted), name  # deterministic
    # noise is seeded per image: image 3 alone gets the noise it gets in the batch; another seed, other noise
    noisy = corrupt("gaussian_noise", images, indices, parameters)
    assert torch.equal(corrupt("gaussian_noise", images[3:4], [3], parameters)[0], noisy[3])
    assert not torch.equal(corrupt("gaussian_noise", images[3:4], [4], parameters)[0], noisy[3])
    # brightness brightens, contrast pulls towards the grey mean, blur smooths
    assert corrupt("brightness", images, indices, parameters).mean() > clean.mean()
    assert corrupt("contrast", images, indices, parameters).std() < clean.std()
    blurred = corrupt("gaussian_blur", images, indices, parameters)
    assert blurred.diff(dim=-1).abs().mean() < clean.diff(dim=-1).abs().mean()


def test_parameters_follow_imagenet_c_at_224():
    parameters = corruption_parameters(224)
    assert parameters["gaussian_blur"]["sigma"] == 3.0 and parameters["gaussian_blur"]["kernel_size"] == 19
    assert parameters["contrast"]["contrast_factor"] == 0.2
    assert parameters["brightness"]["brightness_factor"] == 1.6
    assert corruption_parameters(448)["gaussian_blur"]["sigma"] == 6.0


def test_another_collection_without_probe(probe_run, synthetic_root, tmp_path, monkeypatch, capsys):
    """A run without linear_probe.safetensors is scored alone (one line says so); --split names any folder."""
    run = tmp_path / "run"
    shutil.copytree(probe_run, run, ignore=shutil.ignore_patterns("robustness", "linear_probe.safetensors"))
    other = tmp_path / "other"
    for name in ("cat", "dog"):
        (other / "photos" / name).mkdir(parents=True)
        for i in range(3):
            shutil.copy(synthetic_root / "test" / name / f"{name}.{i}.jpg", other / "photos" / name)
    (other / "photos" / "dog" / "broken.jpg").write_bytes(b"")  # undecodable: skipped, not fatal
    code, out, err = run_robustness(["--run", run, "--data", other, "--split", "photos"], monkeypatch, capsys)
    assert code == 0, err
    notes = [line for line in out.splitlines() if "linear_probe.safetensors" in line]
    assert len(notes) == 1 and "fine-tuned model alone" in notes[0]
    summary = json.loads(RunDir(run).robustness_summary.read_text())
    assert summary["split"] == "photos" and summary["images"] == 6 and summary["linear_probe"] is False
    assert [s["path"] for s in summary["skipped"]] == [str(other / "photos" / "dog" / "broken.jpg")]
    assert summary["models"] == ["fine_tuned"] and summary["below_linear_probe"] == []
    for result in summary["results"].values():
        assert 0 <= result["fine_tuned"] <= 1 and result["linear_probe"] is None and result["difference"] is None


def _bad_root(tmp_path: Path, synthetic_root: Path) -> Path:
    """val/ with a class the run does not know."""
    root = tmp_path / "three"
    for name in ("cat", "dog"):
        shutil.copytree(synthetic_root / "val" / name, root / "val" / name)
    shutil.copytree(synthetic_root / "val" / "dog", root / "val" / "fox")
    return root


@pytest.mark.parametrize("case", ["missing run", "classes mismatch", "unknown split", "missing data",
                                  "bad override"])
def test_bad_input_is_one_line_and_writes_nothing(case, probe_run, synthetic_root, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    shutil.copytree(probe_run, run, ignore=shutil.ignore_patterns("robustness"))
    args = {"missing run": ["--run", tmp_path / "absent", "--data", synthetic_root],
            "classes mismatch": ["--run", run, "--data", _bad_root(tmp_path, synthetic_root)],
            "unknown split": ["--run", run, "--data", synthetic_root, "--split", "nope"],
            "missing data": ["--run", run, "--data", tmp_path / "no-data"],
            "bad override": ["--run", run, "--data", synthetic_root, "data.eval_batch_size=0"]}[case]
    expected = {"missing run": str(tmp_path / "absent"), "classes mismatch": "['cat', 'dog', 'fox']",
                "unknown split": "--split nope", "missing data": str(tmp_path / "no-data"),
                "bad override": "data.eval_batch_size"}[case]
    code, _, err = run_robustness(args, monkeypatch, capsys)
    assert code == 2
    [line] = err.strip().splitlines()
    assert line.startswith("error: ") and expected in line, line
    assert not (run / "robustness").exists() and not (tmp_path / "absent").exists()


def test_report_shows_the_real_summary(scored, tmp_path):
    run, summary, _ = scored
    collected = report([run], tmp_path / "report")
    assert collected["runs"][0]["robustness"]["summary"] == summary
    page = (tmp_path / "report" / "index.html").read_text()
    assert "Robustness: fine-tuned against the linear probe" in page
    for name in CORRUPTIONS:
        assert f"<td>{name}</td>" in page
    assert page.count('<tr class="below">') == len(summary["below_linear_probe"]) + (
        summary["mean_corrupted"]["difference"] < 0)
