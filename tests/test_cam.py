import runpy
import shutil
import sys
from typing import get_args

import numpy as np
import pytest
import torch
from PIL import Image

from catdog.cam import (METHODS, faithfulness, gradcam, random_saliency, remove_pixels, sample_indices,
                        sample_per_class, top_fraction_mask)
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
    # same weights, same images: the two runs' numbers agree
    assert summary["models"][0]["methods"] == summary["models"][1]["methods"]
    width, height = Image.open(stage / "grid.png").size
    assert 2.5 < width / 230 < 3.5 and 2 * 200 < height < 3 * 250  # 1 + 2 columns, 2 rows

    first_part = stage / "parts" / "00-lite0-gradcam.json"
    stamp = first_part.stat().st_mtime_ns
    more = gradcam([tiny_run], synthetic_root, tmp_path / "out",
                   tiny_config(*settings, "gradcam.methods=[gradcam, layercam]"))
    assert first_part.stat().st_mtime_ns == stamp  # a finished part is reused; only layercam is computed
    assert set(more["models"][0]["methods"]) == {"gradcam", "layercam"}
    assert more["models"][0]["methods"]["gradcam"] == summary["models"][0]["methods"]["gradcam"]
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
