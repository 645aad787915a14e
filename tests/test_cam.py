import runpy
import shutil
import sys
from typing import get_args

import numpy as np
import pytest
import torch
from PIL import Image

from pytorch_grad_cam.metrics.road import ROADCombined
from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget
from torch import nn

from catdog import models
from catdog.cam import (METHODS, cascade_units, faithfulness, gradcam, grid_sample, random_saliency, randomise,
                        ranked, remove_pixels, road_scores, road_summary, sample_indices, sample_per_class,
                        sanity_flags, spearman, top_fraction_mask)
from catdog.config import GradcamConfig
from catdog.errors import CatdogError
from catdog.io import read_json
from conftest import REPO, make_image_folder, tiny_config


def test_config_names_exactly_the_methods_cam_knows():
    (method_names,) = get_args(GradcamConfig.model_fields["methods"].annotation)
    assert set(get_args(method_names)) == set(METHODS)


def test_sample_per_class_is_seeded_and_balanced():
    labels = [0] * 10 + [1] * 4 + [2] * 2
    sample = sample_per_class(labels, 3, seed=5)
    assert [labels[i] for i in sample] == [0, 0, 0, 1, 1, 1, 2, 2]  # a class with fewer gives all it has
    assert len(set(sample)) == len(sample)
    assert sample_per_class(labels, 3, seed=5) == sample
    assert {tuple(sample_per_class(labels, 3, seed=s)) for s in range(10)} != {tuple(sample)}


def test_grid_sample_keeps_each_shown_class_images_in_the_shown_order():
    labels = [0] * 10 + [1] * 4 + [2] * 2 + [3] * 5
    every = sample_per_class(labels, 3, seed=5)
    grid = grid_sample(labels, [2, 0], 3, seed=5)
    assert [labels[i] for i in grid] == [2, 2, 0, 0, 0]
    assert set(grid) == {i for i in every if labels[i] in (0, 2)}  # the same images as when every class is shown
    assert grid_sample(labels, [], 3, seed=5) == []


def test_sample_indices():
    assert sample_indices(5, 200, seed=0) == [0, 1, 2, 3, 4]
    picked = sample_indices(1000, 200, seed=1)
    assert len(set(picked)) == 200 and picked == sorted(picked) and max(picked) < 1000
    assert picked == sample_indices(1000, 200, seed=1) != sample_indices(1000, 200, seed=2)


def test_top_fraction_mask_takes_the_highest_pixels():
    rng = np.random.default_rng(0)
    saliency = rng.permutation(100).reshape(1, 10, 10).astype(float)
    mask = top_fraction_mask(saliency, 0.2, rng)
    assert mask.sum() == 20
    assert saliency[mask].min() > saliency[~mask].max()


def test_top_fraction_mask_breaks_ties_at_random():
    rng = np.random.default_rng(0)
    mask = top_fraction_mask(np.zeros((2, 20, 20)), 0.25, rng)
    assert mask.sum(axis=(1, 2)).tolist() == [100, 100]
    assert not np.array_equal(mask[0], mask[1])
    assert mask[:, :5].mean() < 0.5  # not simply the first rows


def test_random_removal_covers_blobs_not_scattered_pixels():
    rng = np.random.default_rng(0)
    mask = top_fraction_mask(random_saliency(4, (7, 7), 224, rng), 0.2, rng)
    assert mask.shape == (4, 224, 224) and mask.sum() == 4 * round(0.2 * 224 * 224)
    neighbour_also_removed = (mask[:, :, :-1] & mask[:, :, 1:]).sum() / mask[:, :, :-1].sum()
    assert neighbour_also_removed > 0.9  # scattered pixels would give about 0.2


def test_remove_pixels_sets_masked_pixels_to_the_mean_in_every_channel():
    images = torch.randn(2, 3, 4, 4) + 5
    mask = np.zeros((2, 4, 4), dtype=bool)
    mask[0, 1, 2] = mask[1, 3, 0] = True
    removed = remove_pixels(images, mask)
    assert torch.all(removed[0, :, 1, 2] == 0) and torch.all(removed[1, :, 3, 0] == 0)
    keep = torch.from_numpy(~mask)[:, None].expand_as(images)
    assert torch.equal(removed[keep], images[keep])


def test_faithfulness_averages_the_drops():
    before = np.array([0.9, 0.8, 0.6, 1.0])
    score = faithfulness(before, np.array([0.1, 0.8, 0.2, 0.5]), np.array([0.8, 0.7, 0.6, 0.9]))
    assert score["salient_drop"] == pytest.approx((0.8 + 0.0 + 0.4 + 0.5) / 4)
    assert score["random_drop"] == pytest.approx((0.1 + 0.1 + 0.0 + 0.1) / 4)
    assert score["salient_wins"] == pytest.approx(3 / 4)
    assert score["mean_confidence"] == pytest.approx(0.825) and score["n_images"] == 4


def test_gradcam_on_two_runs_writes_grid_and_summary(tiny_run, synthetic_root, tmp_path):
    second = tmp_path / "second"
    shutil.copytree(tiny_run, second)
    settings = ["gradcam.images_per_class=1", "gradcam.faithfulness_images=3", "gradcam.batch_size=4"]
    summary = gradcam([tiny_run, second], synthetic_root, tmp_path / "out", tiny_config(*settings))

    stage = tmp_path / "out" / "gradcam"
    assert read_json(stage / "summary.json") == summary
    assert len(summary["faithfulness_images"]) == 3
    assert [path.split("/")[1] for path in summary["grid_images"]] == ["cat", "dog"]
    for model in summary["models"]:
        assert model["model"] == "efficientnet_lite0" and model["cam_layer"] == "bn2"
        assert len(model["predictions"]) == 3
        assert [p["image"] for p in model["grid_predictions"]] == summary["grid_images"]
        assert all(0.5 <= p["probability"] <= 1 for p in model["grid_predictions"])
        score = model["methods"]["gradcam"]
        assert score["n_images"] == 3 and -1 <= score["random_drop"] <= 1 and -1 <= score["salient_drop"] <= 1
    # same weights, same images: the two runs' numbers agree (all but the time taken)
    def numbers(model):  # the maps' file names carry the run's place in --runs
        timing = ("seconds", "cpu_seconds", "faithfulness_maps")
        return {method: {k: v for k, v in score.items() if k not in timing}
                for method, score in model["methods"].items()}

    assert numbers(summary["models"][0]) == numbers(summary["models"][1])
    width, height = Image.open(stage / "grid.png").size
    assert 2.5 < width / 230 < 3.5 and 2 * 200 < height < 3 * 250  # 1 + 2 columns, 2 rows

    first_part = stage / "parts" / "00-lite0-gradcam.json"
    stamp = first_part.stat().st_mtime_ns
    more = gradcam([tiny_run], synthetic_root, tmp_path / "out",
                   tiny_config(*settings, "gradcam.methods=[gradcam, layercam]"))
    assert first_part.stat().st_mtime_ns == stamp  # a finished part is reused; only layercam is computed
    assert set(more["models"][0]["methods"]) == {"gradcam", "layercam"}
    assert more["models"][0]["methods"]["gradcam"] == summary["models"][0]["methods"]["gradcam"]  # its time too
    assert len(list((stage / "parts").glob("*.json"))) == 3


def test_gradcam_rejects_data_with_other_classes(tiny_run, tmp_path):
    other = make_image_folder(tmp_path / "other", {"train": 1, "test": 1, "val": 1}, classes=("bird", "fish"))
    with pytest.raises(CatdogError, match="trained on classes"):
        gradcam([tiny_run], other, tmp_path / "out", tiny_config())
    with pytest.raises(CatdogError, match="removal_fraction"):
        gradcam([tiny_run], other, tmp_path / "out", tiny_config("gradcam.removal_fraction=1.5"))


def test_gradcam_job_reports_misplaced_overrides(tiny_run, synthetic_root, tmp_path, monkeypatch):
    job = runpy.run_path(str(REPO / "jobs" / "gradcam.py"))
    monkeypatch.setattr(sys, "argv", ["gradcam.py", "--data", str(synthetic_root), "--out", str(tmp_path),
                                      "--runs", str(tiny_run), "gradcam.methods=[layercam]"])
    with pytest.raises(CatdogError, match="put overrides before --runs"):
        job["main"]()


class TinyNet(nn.Module):
    """A 2-class CNN small enough to run grad-cam's metrics in a blink."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU())
        self.classifier = nn.Linear(6, 2)

    def forward(self, x):
        return self.classifier(self.features(x).mean(dim=(2, 3)))


def smooth_cams(batch: int, size: int, seed: int) -> np.ndarray:
    return random_saliency(batch, (4, 4), size, np.random.default_rng(seed)).astype(np.float32)


def test_ranked_keeps_the_order_and_breaks_ties():
    cams = np.zeros((2, 10, 10), dtype=np.float32)
    cams[0, :5] = 1.0  # half the pixels tied at 0, half at 1
    cams[1] = np.arange(100).reshape(10, 10)
    out = ranked(cams, np.random.default_rng(0))
    assert out.min() == 0 and out.max() == 1 and len(np.unique(out[0])) == 100
    assert out[0, :5].min() > out[0, 5:].max()  # ties broken inside each level only
    assert np.array_equal(np.argsort(out[1].ravel()), np.arange(100))
    threshold = np.percentile(out[0], 70)  # what grad-cam's ROAD does: exactly 30% removed
    assert (out[0] >= threshold).sum() == 30


def test_road_scores_are_grad_cams_road_combined():
    network = TinyNet().eval()
    images = torch.randn(3, 3, 16, 16)
    targets = torch.tensor([0, 1, 1])
    cams = ranked(smooth_cams(3, 16, 1), np.random.default_rng(0))
    percentiles = [30, 60, 90]
    scores = road_scores(network, images, cams, targets, percentiles, seed=7)
    assert scores["morf"].shape == scores["lerf"].shape == (3, 3)
    torch.manual_seed(7)
    expected = ROADCombined(percentiles)(images, cams, [ClassifierOutputSoftmaxTarget(int(t)) for t in targets],
                                         network)
    np.testing.assert_allclose((scores["lerf"].mean(0) - scores["morf"].mean(0)) / 2, expected, atol=1e-6)
    summary = road_summary(scores["morf"], scores["lerf"], percentiles)
    assert summary["combined"] == pytest.approx(float(expected.mean()), abs=1e-6)
    assert summary["morf"]["30"] == pytest.approx(float(scores["morf"][0].mean()))
    # seeded: the imputation noise repeats, and the global generator is left alone
    state = torch.get_rng_state()
    again = road_scores(network, images, cams, targets, percentiles, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    np.testing.assert_array_equal(again["morf"], scores["morf"])


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "layercam", "eigencam"])
def test_cams_with_the_backward_pass_stopped_at_the_layer_are_grad_cams(method):
    """``gradients_from``: the same maps as grad-cam's full backward pass, also with an in-place op after the layer;
    every parameter keeps its requires_grad (a frozen one stays frozen)."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from catdog.cam import METHODS, gradients_from

    network = TinyNet().eval()
    network.features[1] = nn.ReLU(inplace=True)  # changes the CAM layer's output in place
    network.features[2].bias.requires_grad_(False)
    layer = network.features[0]
    images, targets = torch.randn(3, 3, 12, 12), [ClassifierOutputTarget(t) for t in (0, 1, 1)]
    with METHODS[method](model=network, target_layers=[layer]) as cam:
        expected = cam(input_tensor=images, targets=targets)
    with gradients_from(network, layer), METHODS[method](model=network, target_layers=[layer]) as cam:
        assert not any(parameter.requires_grad for parameter in network.parameters())
        found = cam(input_tensor=images, targets=targets)
    np.testing.assert_array_equal(found, expected)
    assert [parameter.requires_grad for parameter in network.parameters()] == [True, True, True, False, True, True]


@pytest.mark.parametrize("mask_kind", ["scattered", "blob at the border", "nothing removed"])
def test_linear_imputer_is_grad_cams_bit_for_bit(mask_kind):
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer

    from catdog.cam import LinearImputer

    rng = np.random.default_rng(3)
    image = torch.rand(3, 40, 36)
    mask = torch.from_numpy((rng.random((40, 36)) > 0.3).astype(np.float32))
    if mask_kind == "blob at the border":
        mask = torch.ones(40, 36)
        mask[:15, 20:] = 0
    elif mask_kind == "nothing removed":
        mask = torch.ones(40, 36)
    torch.manual_seed(5)
    expected = NoisyLinearImputer()(image, mask) if mask_kind != "nothing removed" else image
    torch.manual_seed(5)
    found = LinearImputer()(image, mask)
    assert torch.equal(found, expected)
    if mask_kind != "nothing removed":
        assert not torch.equal(found[:, mask == 0], image[:, mask == 0])  # the removed pixels were filled in
    assert torch.equal(found[:, mask == 1], image[:, mask == 1])


def test_spearman():
    rng = np.random.default_rng(0)
    a = rng.random((3, 8, 8))
    b = np.stack([a[0], -a[1], np.zeros((8, 8))])
    assert spearman(a, b) == pytest.approx([1.0, -1.0, 0.0])  # a constant map keeps no order: 0


def test_sanity_flags():
    def steps(*values):
        return [{"layer": name, "spearman": v} for name, v in zip(["trained", "classifier", "bn2", "stem"], values)]

    assert sanity_flags(steps(1.0, 0.1, 0.05, 0.0), 0.5) == []
    (flag,) = sanity_flags(steps(1.0, 0.99, 0.2, 0.1), 0.5)
    assert "classifier" in flag and "0.99" in flag
    (flag,) = sanity_flags(steps(1.0, 0.3, 0.6, 0.7), 0.5)
    assert "every layer" in flag


def test_cascade_units_run_from_the_classifier_down_to_the_stem():
    network = models.create("efficientnet_lite0", 2, pretrained="none").eval()
    names = [name for name, _ in cascade_units(network, 64)]
    assert names[0] == "classifier" and names[-1] == "conv_stem"
    assert names[1:4] == ["bn2", "conv_head", "blocks.6"] and "blocks.0" in names and len(names) == 12

    unit = dict(cascade_units(network, 64))["conv_head"]
    before = unit.weight.detach().clone()
    randomise(unit, torch.Generator().manual_seed(0))
    assert not torch.allclose(unit.weight, before)
    assert float(unit.weight.detach().std()) == pytest.approx(float(before.std()), rel=0.05)
    assert abs(np.corrcoef(unit.weight.detach().ravel().numpy(), before.ravel().numpy())[0, 1]) < 0.05


def test_gradcam_adds_road_confidence_change_and_a_sanity_check(tiny_run, synthetic_root, tmp_path):
    settings = ["gradcam.images_per_class=1", "gradcam.faithfulness_images=4", "gradcam.batch_size=4",
                "gradcam.methods=[gradcam,eigencam]", "gradcam.road_percentiles=[50,80]",
                "gradcam.sanity_images_per_class=2"]
    summary = gradcam([tiny_run], synthetic_root, tmp_path / "out", tiny_config(*settings))
    stage = tmp_path / "out" / "gradcam"
    assert summary["road_percentiles"] == [50, 80] and len(summary["sanity_images"]) == 4
    assert [p.split("/")[1] for p in summary["sanity_images"]] == ["cat", "cat", "dog", "dog"]
    (model,) = summary["models"]
    assert model["sanity_layers"][:3] == ["trained", "classifier", "bn2"] and len(model["sanity_layers"]) == 13
    for method, score in model["methods"].items():
        assert set(score["road"]["morf"]) == set(score["road"]["lerf"]) == {"50", "80"}
        assert -1 <= score["road"]["combined"] <= 1 and -1 <= score["confidence_change"] <= 1
        assert score["seconds"]["total"] == pytest.approx(sum(v for k, v in score["seconds"].items() if k != "total"))
        assert set(score["seconds"]) >= {"cams", "road", "confidence_change", "sanity"}
        steps = score["sanity"]
        assert [s["layer"] for s in steps] == model["sanity_layers"] and steps[0]["spearman"] == 1.0
        assert all(-1 <= s["spearman"] <= 1 for s in steps)
    # EigenCAM never looks at the head: randomising the classifier leaves its maps exactly as they were
    assert model["methods"]["eigencam"]["sanity"][1]["spearman"] == pytest.approx(1.0)
    assert any("classifier" in flag for flag in model["methods"]["eigencam"]["sanity_flags"])
    assert model["methods"]["gradcam"]["sanity"][1]["spearman"] < 0.99
    with Image.open(stage / "sanity.png") as plot:
        assert plot.width >= 500 and plot.height >= 300
