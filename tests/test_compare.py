"""The comparison stage: its measures on synthetic maps and features with known answers, and two tiny runs of
different families through training, extraction, Grad-CAM and ``jobs/compare.py``."""
from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from catdog.cam import MAP_SIZE, gradcam, spearman
from catdog import compare as compare_module
from catdog.compare import (CrossMoments, agreement_counts, aligned_blocks, area_above_half_max, cam_style,
                            completed_summary, disagreement, feature_comparison, linear_cka, mcnemar_p,
                            normalised_entropy, object_masks, peak, pointing_hits, run_names, shuffled_cka_spread,
                            stats, top_iou, top_region)
from catdog.config import CompareConfig
from catdog.errors import CatdogError
from catdog.extract import extract
from catdog.io import read_json, write_json
from catdog.run import RunDir
from catdog.sampling import stratified_rows
from catdog.store import FeatureStore
from catdog.train import train
from conftest import make_image_folder, run_script, tiny_config
from synthetic_store import write_store

STATS_KEYS = {"n", "mean", "std", "median", "q25", "q75"}


# ---------------------------------------------------------------------------------------------------- maps

def single_pixel(size: int = 8, at=(2, 5)) -> np.ndarray:
    heat = np.zeros((1, size, size))
    heat[(0, *at)] = 1.0
    return heat


def test_stats_summarise_the_spread():
    assert stats([1, 2, 3, 4, 5]) == {"n": 5, "mean": 3.0, "std": pytest.approx(math.sqrt(2)), "median": 3.0,
                                      "q25": 2.0, "q75": 4.0}
    assert stats([])["n"] == 0 and stats([])["mean"] is None


def test_a_single_pixel_map_is_small_and_has_no_entropy():
    assert area_above_half_max(single_pixel()) == pytest.approx([1 / 64])
    assert normalised_entropy(single_pixel()) == pytest.approx([0.0], abs=1e-12)


def test_a_uniform_map_covers_everything_with_full_entropy():
    uniform = np.full((2, 8, 8), 0.3)
    uniform[1] = 0.0  # grad-cam's map when it finds nothing: favours no pixel either
    assert area_above_half_max(uniform) == pytest.approx([1.0, 1.0])
    assert normalised_entropy(uniform) == pytest.approx([1.0, 1.0])


def test_area_and_entropy_in_between():
    heat = np.zeros((1, 4, 4))
    heat[0, 0, :2] = 1.0   # two pixels at the maximum
    heat[0, 1, 0] = 0.5    # one at exactly half: counts
    heat[0, 2, 0] = 0.49   # just below: does not
    assert area_above_half_max(heat) == pytest.approx([3 / 16])
    two = np.zeros((1, 4, 4))
    two[0, 0, :2] = 1.0
    assert normalised_entropy(two) == pytest.approx([math.log(2) / math.log(16)])  # two equal pixels: log 2


def test_identical_maps_agree_fully_and_disjoint_ones_not_at_all():
    rng = np.random.default_rng(0)
    maps = rng.random((3, 10, 10))
    maps[2, :5] = 1.0  # a plateau: ties broken the same way in both
    assert spearman(maps, maps.copy()) == pytest.approx([1.0, 1.0, 1.0])
    assert top_iou(maps, maps.copy(), 0.2) == pytest.approx([1.0, 1.0, 1.0])

    left, right = np.zeros((1, 10, 10)), np.zeros((1, 10, 10))
    left[0, :, :3] = 1.0
    right[0, :, 7:] = 1.0
    assert top_iou(left, right, 0.2) == pytest.approx([0.0])
    assert spearman(left, right)[0] < 0


def test_top_region_takes_the_highest_share_and_breaks_ties_by_position():
    maps = np.arange(100, dtype=float).reshape(1, 10, 10)
    region = top_region(maps, 0.2)
    assert region.sum() == 20 and region[0, 8:].all()  # the last two rows hold the 20 highest values
    flat = np.zeros((1, 10, 10))
    assert top_region(flat, 0.25)[0].ravel().nonzero()[0].tolist() == list(range(25))  # ties: first positions
    assert top_region(single_pixel(), 0.001).sum() == 1  # at least one pixel


def test_the_peak_of_a_border_plateau_is_its_inner_corner():
    heat = np.zeros((8, 8))
    heat[5:8, 0:3] = 1.0  # an upsampled CAM's flat maximum, from its top cell's centre (5, 2) out to the corner
    assert peak(heat) == (5, 2)
    heat[0, 7] = 0.5  # lower elsewhere: no effect
    assert peak(heat) == (5, 2)
    assert peak(single_pixel(8, at=(2, 5))[0]) == (2, 5)


def test_pointing_game_scales_the_peak_to_the_mask():
    heat = single_pixel(8, at=(2, 5))  # centre at (2.5, 5.5) / 8 of the height and width
    mask = np.zeros((40, 80), dtype=bool)
    mask[10:15, 50:60] = True  # (2.5 / 8 * 40, 5.5 / 8 * 80) = (12.5, 55): inside
    assert pointing_hits(heat, [mask]).tolist() == [True]
    assert pointing_hits(heat, [~mask]).tolist() == [False]


def test_pointing_game_scores_the_images_that_have_a_mask(tmp_path):
    (tmp_path / "masks" / "val" / "cat").mkdir(parents=True)
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[:4, :4] = 255
    Image.fromarray(mask).save(tmp_path / "masks" / "val" / "cat" / "cat.1.png")
    masks, note = object_masks(tmp_path, ["val/cat/cat.1.jpg", "val/cat/cat.2.jpg"])
    assert note is None and masks[1] is None and masks[0].sum() == 16
    maps = np.concatenate([single_pixel(8, at=(0, 1)), single_pixel(8, at=(7, 7))])
    style = cam_style(maps, masks, note)
    assert style["pointing_game"] == {"hits": 1, "images": 1, "accuracy": 1.0}
    assert style["pointing_game_note"].startswith("1 of the 2 images have no mask")


def test_pointing_game_is_null_with_a_note_without_masks(tmp_path):
    masks, note = object_masks(tmp_path, ["val/cat/cat.1.jpg"])
    assert masks == [None] and note.startswith("not available") and "masks/" in note
    style = cam_style(single_pixel(), masks, note)
    assert style["pointing_game"] is None and style["pointing_game_note"] == note
    assert style["images"] == 1 and set(style["entropy"]) == STATS_KEYS


# ---------------------------------------------------------------------------------------------------- features

def related_features(n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, 12)) * np.linspace(3, 0.5, 12)
    b = np.tanh(a @ rng.normal(size=(12, 20))) + 0.1 * rng.normal(size=(n, 20))
    return a, b


def test_cka_is_one_for_identical_features_and_ignores_rotation_and_scale():
    a, b = related_features()
    assert linear_cka(a, a) == pytest.approx(1.0)
    rotation, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(20, 20)))
    value = linear_cka(a, b)
    assert 0.3 < value < 0.99
    assert linear_cka(a, 7.5 * b @ rotation) == pytest.approx(value, rel=1e-9)
    assert linear_cka(0.01 * a + 3.0, b) == pytest.approx(value, rel=1e-9)  # isotropic scale and a shift


def gram_cka(a: np.ndarray, b: np.ndarray) -> float:
    """The (n, n) Gram form the streamed CKA replaces: tr(K L) / (||K||_F ||L||_F) on centred features."""
    k, el = ((x - x.mean(axis=0)) @ (x - x.mean(axis=0)).T for x in (a, b))
    return float((k * el).sum() / np.sqrt((k * k).sum() * (el * el).sum()))


def moments_in_blocks(a: np.ndarray, b: np.ndarray, sizes: list[int]) -> CrossMoments:
    moments, start = CrossMoments(), 0
    for size in sizes:
        moments.update(a[start:start + size], b[start:start + size])
        start += size
    assert start == len(a)
    return moments


def test_streamed_cka_equals_the_gram_form():
    a, b = related_features(n=300)
    a = a + 1e3  # a large mean: centring from streamed sums must not lose it
    expected = gram_cka(a, b)
    assert 0.3 < expected < 0.99
    assert linear_cka(a, b) == pytest.approx(expected, rel=1e-9)
    assert moments_in_blocks(a, b, [1, 7, 100, 192]).cka() == pytest.approx(expected, rel=1e-9)
    assert moments_in_blocks(a, a, [150, 150]).cka() == pytest.approx(1.0, rel=1e-9)


def test_the_shuffled_mean_in_closed_form_is_the_mean_over_every_permutation():
    a, b = related_features(n=6)
    every = [gram_cka(a, b[list(order)]) for order in itertools.permutations(range(6))]
    assert len(every) == 720 and np.std(every) > 0.01
    assert moments_in_blocks(a, b, [2, 4]).shuffled_cka_mean() == pytest.approx(np.mean(every), rel=1e-9)


def test_the_shuffled_mean_in_closed_form_agrees_with_monte_carlo_and_is_a_low_baseline():
    a, b = related_features(n=200)
    closed = CrossMoments()
    closed.update(a, b)
    spread = shuffled_cka_spread(a, b, shuffles=2000, seed=0)
    assert spread["rows"] == 200 and spread["shuffles"] == 2000 and 0 < spread["std"] < 0.1
    standard_error = spread["std"] / math.sqrt(spread["shuffles"])
    assert abs(spread["mean"] - closed.shuffled_cka_mean()) < 5 * standard_error
    assert closed.shuffled_cka_mean() < 0.2 < closed.cka()
    assert shuffled_cka_spread(a, b, shuffles=10, seed=0) == shuffled_cka_spread(a, b, shuffles=10, seed=0)


def test_stratified_rows_keep_each_class_share_within_the_limit():
    labels = np.repeat([0, 1, 2], [900, 90, 10])
    rows = stratified_rows(labels, 100, seed=0)
    assert len(rows) == 100 and np.all(np.diff(rows) > 0)
    assert np.bincount(labels[rows]).tolist() == [90, 9, 1]
    assert stratified_rows(labels[:50], 100, seed=0).tolist() == list(range(50))


def two_stores(top: Path, shard_sizes: tuple[int, int], n: dict[str, int], seed: int = 0):
    """Two synthetic stores of the same images (a: 6 features, b: 9, related), sharded differently."""
    rng = np.random.default_rng(seed)
    splits_a, splits_b = {}, {}
    for split, rows in n.items():
        labels = np.arange(rows) % 2
        a = rng.normal(size=(rows, 6)) + 2.0 * labels[:, None]
        b = np.tanh(a @ rng.normal(size=(6, 9))) + 0.3 * rng.normal(size=(rows, 9))
        paths = np.array([f"{split}/{'cat' if y == 0 else 'dog'}/{i}.jpg" for i, y in enumerate(labels)])
        splits_a[split] = {"features": a.astype(np.float32), "labels": labels, "paths": paths}
        splits_b[split] = {"features": b.astype(np.float32), "labels": labels, "paths": paths}
    return (FeatureStore(write_store(top / "a", splits_a, ["cat", "dog"], shard_sizes[0])),
            FeatureStore(write_store(top / "b", splits_b, ["cat", "dog"], shard_sizes[1])), splits_a, splits_b)


def test_rows_are_matched_across_stores_with_different_shard_sizes(tmp_path, monkeypatch):
    monkeypatch.setattr(compare_module, "BLOCK_ROWS", 4)
    store_a, store_b, splits_a, splits_b = two_stores(tmp_path, (3, 5), {"val": 23})
    blocks = list(aligned_blocks(store_a, store_b, "val"))
    assert max(len(labels) for *_, labels in blocks) <= 4
    assert [first for first, *_ in blocks] == [0, 3, 4, 5, 6, 8, 9, 10, 12, 15, 16, 18, 20, 21]
    for index, key in ((1, "a"), (2, "b")):
        expected = (splits_a if key == "a" else splits_b)["val"]["features"]
        np.testing.assert_array_equal(np.concatenate([block[index] for block in blocks]), expected)
    np.testing.assert_array_equal(np.concatenate([block[3] for block in blocks]), splits_a["val"]["labels"])

    shuffled = {"val": {**splits_b["val"], "paths": splits_b["val"]["paths"][::-1]}}
    other = FeatureStore(write_store(tmp_path / "other", shuffled, ["cat", "dog"], 5))
    with pytest.raises(CatdogError, match="different val images"):
        list(aligned_blocks(store_a, other, "val", features=False))
    fewer = {"val": {key: value[:20] for key, value in splits_b["val"].items()}}
    with pytest.raises(CatdogError, match="hold 23 and 20 val images"):
        list(aligned_blocks(store_a, FeatureStore(write_store(tmp_path / "fewer", fewer, ["cat", "dog"], 5)), "val"))


class Bar:
    def __init__(self):
        self.n = 0

    def update(self, steps):
        self.n += steps


def test_feature_comparison_streams_the_stores_and_bounds_its_samples(tmp_path, monkeypatch):
    monkeypatch.setattr(compare_module, "BLOCK_ROWS", 16)
    store_a, store_b, splits_a, splits_b = two_stores(tmp_path, (25, 40), {"train": 120, "test": 60, "val": 90})
    val_a, val_b = splits_a["val"]["features"], splits_b["val"]["features"]
    cfg = CompareConfig(cka_shuffles=5, cka_sample_rows=50, regression_sample_rows=40)
    bar = Bar()
    found = feature_comparison(SimpleNamespace(store=store_a), SimpleNamespace(store=store_b), cfg, bar)
    assert bar.n == 1 + 3 * len(compare_module.REGULARISATION)
    assert found["images"] == 90 and found["cka"] == pytest.approx(gram_cka(val_a, val_b), rel=1e-6)
    baseline = found["cka_shuffled"]
    assert baseline["mean"] == pytest.approx(compare_module.cross_moments(val_a, val_b).shuffled_cka_mean(), rel=1e-6)
    assert baseline["shuffles"] == 5 and baseline["std_rows"] == 50 and baseline["std"] > 0
    regression = found["logistic_regression"]
    assert regression["fit_rows"] == 40 and (regression["fit_split"], regression["scored_on"]) == ("train", "val")
    assert all(0.6 < regression[key] <= 1 for key in ("a", "b", "concatenated"))  # the classes are shifted apart
    assert all(c in compare_module.REGULARISATION for c in regression["C"].values())
    for key in ("a", "b", "concatenated"):  # accuracies over every val row: a multiple of 1/90
        assert regression[key] * 90 == pytest.approx(round(regression[key] * 90), abs=1e-9)


def test_mcnemar_on_known_counts():
    # exact binomial, two-sided: 2 * P(X <= 5) for X ~ Bin(12, 1/2)
    assert mcnemar_p(7, 5) == pytest.approx(2 * sum(math.comb(12, k) for k in range(6)) / 2 ** 12)
    assert mcnemar_p(10, 0) == pytest.approx(2 / 2 ** 10)
    assert mcnemar_p(0, 0) == 1.0
    labels = np.array([0, 0, 1, 1, 1, 0])
    counts = agreement_counts(labels, np.array([0, 1, 1, 0, 1, 1]), np.array([0, 0, 0, 0, 1, 1]))
    assert {k: counts[k] for k in ("images", "both_right", "a_only_right", "b_only_right", "both_wrong",
                                   "predictions_differ")} == {"images": 6, "both_right": 2, "a_only_right": 1,
                                                              "b_only_right": 1, "both_wrong": 2,
                                                              "predictions_differ": 2}
    assert counts["mcnemar_p"] == 1.0


def test_disagreement_matches_images_by_path_and_shows_where_predictions_differ():
    paths = ["val/cat/1.jpg", "val/cat/2.jpg", "val/dog/3.jpg", "val/dog/4.jpg"]
    pa = {"paths": paths, "labels": np.array([0, 0, 1, 1]), "predicted": np.array([0, 1, 1, 1]),
          "probability": np.array([0.9, 0.6, 0.8, 0.7])}
    # b listed in another order, with one image a could not read
    pb = {"paths": ["val/dog/4.jpg", "val/dog/3.jpg", "val/dog/5.jpg", "val/cat/2.jpg", "val/cat/1.jpg"],
          "labels": np.array([1, 1, 1, 0, 0]), "predicted": np.array([0, 1, 1, 0, 0]),
          "probability": np.array([0.55, 0.9, 0.7, 0.8, 0.7])}
    found = disagreement(pa, pb, ["cat", "dog"], count=5, seed=0)
    assert {k: found[k] for k in ("images", "both_right", "a_only_right", "b_only_right", "both_wrong",
                                  "predictions_differ")} == {"images": 4, "both_right": 2, "a_only_right": 1,
                                                             "b_only_right": 1, "both_wrong": 0,
                                                             "predictions_differ": 2}
    assert found["examples"] == [
        {"image": "val/cat/2.jpg", "label": "cat", "a": {"predicted": "dog", "probability": 0.6},
         "b": {"predicted": "cat", "probability": 0.8}},
        {"image": "val/dog/4.jpg", "label": "dog", "a": {"predicted": "dog", "probability": 0.7},
         "b": {"predicted": "cat", "probability": 0.55}}]
    assert len(disagreement(pa, pb, ["cat", "dog"], count=1, seed=0)["examples"]) == 1


def test_run_names_are_distinct():
    assert run_names([Path("r/a/lite0"), Path("r/b/lite0"), Path("r/resnet18")]) == ["a/lite0", "b/lite0",
                                                                                       "resnet18"]


# ---------------------------------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def masked_root(tmp_path_factory) -> Path:
    """Tiny cats and dogs with object masks for val: the bright patch that makes an image its class."""
    root = make_image_folder(tmp_path_factory.mktemp("masked"), {"train": 24, "test": 7, "val": 5})
    for c, name in enumerate(("cat", "dog")):
        (root / "masks" / "val" / name).mkdir(parents=True)
        for image in (root / "val" / name).glob("*.jpg"):
            channel = np.asarray(Image.open(image))[:, :, c]
            Image.fromarray((channel > 150).astype(np.uint8) * 255).save(root / "masks" / "val" / name /
                                                                          f"{image.stem}.png")
    return root


GRADCAM = ["gradcam.images_per_class=1", "gradcam.faithfulness_images=6", "gradcam.batch_size=6",
           "gradcam.road_percentiles=[80]", "gradcam.sanity_images_per_class=1"]


@pytest.fixture(scope="module")
def two_families(masked_root, tmp_path_factory) -> tuple[list[Path], Path]:
    """Lite0 (bundled weights, one epoch) and a ResNet-18 left at its random initialisation (a learning rate of
    1e-9, no linear probe), so that the two disagree; each extracted, and the Grad-CAM stage over both in OUT."""
    top = tmp_path_factory.mktemp("compare")
    runs = [top / "lite0", top / "resnet18"]
    train(tiny_config(), masked_root, runs[0])
    train(tiny_config("model.name=resnet18", "model.pretrained=none", "model.freeze_stages=0",
                      "train.mixed_precision=no", "extract.mixed_precision=no", "optim.lr=1e-9",
                      "optim.head_init=random", "train.linear_probe=false"), masked_root, runs[1])
    for run in runs:
        extract(RunDir(run).config(), run, masked_root)
    RunDir(runs[1]).val_predictions_path.unlink()  # as trained before training wrote them: compare runs predict
    gradcam(runs, masked_root, top / "out", tiny_config(*GRADCAM))
    return runs, top / "out"


def test_gradcam_saves_each_models_sample_maps_and_recomputes_old_parts(two_families, masked_root):
    runs, out = two_families
    stage = out / "gradcam"
    summary = read_json(stage / "summary.json")
    assert summary["faithfulness_map_size"] == MAP_SIZE
    files = [stage / model["methods"]["gradcam"]["faithfulness_maps"] for model in summary["models"]]
    for file in files:
        maps = np.load(file)
        assert maps.shape == (6, MAP_SIZE, MAP_SIZE) and maps.dtype == np.float16 and maps.max() > 0
    assert not np.array_equal(*(np.load(f) for f in files))

    # a part written before the maps were saved: its identity lacks the map size, and it has no maps file
    old = stage / "parts" / "01-resnet18-gradcam.json"
    part = read_json(old)
    del part["identity"]["faithfulness_map_size"]
    write_json(old, part)
    files[1].unlink()
    kept = files[0].stat().st_mtime_ns
    again = gradcam(runs, masked_root, out, tiny_config(*GRADCAM))
    assert files[1].is_file() and files[0].stat().st_mtime_ns == kept
    assert read_json(old)["identity"]["faithfulness_map_size"] == MAP_SIZE
    assert again["models"][1]["methods"]["gradcam"]["faithfulness_maps"] == files[1].relative_to(stage).as_posix()


def check_schema(summary: dict, runs: list[Path], masked_root: Path) -> None:
    assert summary["data"] == str(masked_root.resolve()) and summary["split"] == "val"
    assert summary["method"] == "gradcam" and summary["top_fraction"] == 0.2 and summary["map_size"] == MAP_SIZE
    assert [run["run"] for run in summary["runs"]] == [str(run) for run in runs]
    lite0, resnet = summary["runs"]
    assert (lite0["name"], lite0["model"], resnet["name"], resnet["model"]) == ("lite0", "efficientnet_lite0",
                                                                                "resnet18", "resnet18")
    for run, path in zip(summary["runs"], runs):
        trained = read_json(path / "summary.json")
        assert run["test_accuracy"] == trained["best_test_accuracy"]
        assert run["val_accuracy"] == run["val_accuracy_recomputed"] == trained["val_accuracy"]
        assert run["linear_probe_val_accuracy"] == trained.get("linear_probe_val_accuracy")
        assert run["linear_probe_test_accuracy"] == trained.get("linear_probe_test_accuracy")
        assert run["train_seconds"] == trained["train_seconds"] > 0 and run["images_per_second"] > 0
        assert run["epochs"] == 1 and run["image_size"] == 64 and run["mixed_precision"] in ("no", "bf16", "fp16")
        assert run["device"] == "cpu" and run["checkpoint_sha256"]
        style = run["cam_style"]
        assert style["images"] == 6
        for key in ("area_above_half_max", "entropy"):
            assert set(style[key]) == STATS_KEYS and style[key]["n"] == 6 and 0 <= style[key]["q25"] <= 1
        assert style["pointing_game"]["images"] == 6 and style["pointing_game_note"] is None
        assert style["pointing_game"]["accuracy"] == style["pointing_game"]["hits"] / 6
    # Lite0's first four stages are frozen; ResNet-18 trains everything (11.2 M parameters with a 2-class head)
    assert lite0["trainable_parameters"] < lite0["parameters"] and 3_000_000 < lite0["parameters"] < 4_000_000
    assert resnet["trainable_parameters"] == resnet["parameters"] == 11_177_538
    assert 0 <= lite0["linear_probe_test_accuracy"] <= 1 and resnet["linear_probe_test_accuracy"] is None

    (pair,) = summary["pairs"]
    assert (pair["a"], pair["b"]) == ("lite0", "resnet18")
    assert pair["train_time_ratio"] == pytest.approx(lite0["train_seconds"] / resnet["train_seconds"])
    counts = pair["disagreement"]
    assert counts["images"] == 10 == sum(counts[k] for k in ("both_right", "a_only_right", "b_only_right",
                                                             "both_wrong"))
    assert counts["both_right"] + counts["a_only_right"] == round(lite0["val_accuracy"] * 10)
    assert counts["both_right"] + counts["b_only_right"] == round(resnet["val_accuracy"] * 10)
    assert counts["mcnemar_p"] == pytest.approx(mcnemar_p(counts["a_only_right"], counts["b_only_right"]))
    assert counts["mcnemar_test"].startswith("exact")
    assert counts["predictions_differ"] > 0, "the untrained ResNet-18 should get some val images wrong"
    assert len(counts["examples"]) == min(3, counts["predictions_differ"])
    for example in counts["examples"]:
        assert example["image"].startswith("val/") and example["label"] in ("cat", "dog")
        assert example["a"]["predicted"] != example["b"]["predicted"]
        assert all(0.5 <= example[k]["probability"] <= 1 for k in "ab")
    assert counts["montage"] == "disagreements-lite0-vs-resnet18.png"
    agreement = pair["cam_agreement"]
    assert agreement["images"] == 6 and set(agreement["spearman"]) == set(agreement["top_iou"]) == STATS_KEYS
    assert -1 <= agreement["spearman"]["mean"] <= 1 and 0 <= agreement["top_iou"]["mean"] <= 1
    features = pair["features"]
    assert 0 < features["cka"] <= 1 and features["cka_shuffled"]["shuffles"] == 4
    assert features["cka_shuffled"]["std"] >= 0 and 0 < features["cka_shuffled"]["mean"] <= 1
    regression = features["logistic_regression"]
    assert all(0 <= regression[k] <= 1 for k in ("a", "b", "concatenated"))
    assert (regression["fit_split"], regression["chosen_on"], regression["scored_on"]) == ("train", "test", "val")
    assert "lite0" in pair["sentence"] and "resnet18" in pair["sentence"] and "IoU" in pair["sentence"]


def test_compare_job_writes_the_schema_and_reuses_its_parts(two_families, masked_root, monkeypatch, capsys):
    runs, out = two_families
    args = ["compare.cka_shuffles=4", "compare.montage_images=3", "--runs", *runs, "--data", masked_root,
            "--out", out]
    code, printed, err = run_script("jobs/compare.py", args, monkeypatch, capsys)
    assert code == 0, err[-2000:]
    stage = out / "compare"
    summary = read_json(stage / "summary.json")
    check_schema(summary, runs, masked_root)
    (pair,) = summary["pairs"]
    with Image.open(stage / pair["disagreement"]["montage"]) as montage:  # the photo and 2 maps, a row per example
        assert montage.width > 600 and montage.height > 200 * len(pair["disagreement"]["examples"])
    with Image.open(stage / "cam_style.png") as plot:
        assert plot.width >= 500
    assert "compare:" in (stage / "config.yaml").read_text()
    assert completed_summary(out, runs) == stage / "summary.json" and completed_summary(out, runs[:1]) is None
    for needle in ("probe val", "lite0 vs resnet18", "McNemar p", "linear CKA", "shuffled", "maps cover"):
        assert needle in printed, needle

    predicted = sorted(path.name for path in (stage / "parts").glob("predictions-*"))
    assert len(predicted) == 1 and predicted[0].startswith("predictions-resnet18-")  # lite0's: from training
    parts = sorted((stage / "parts").rglob("*.*"))
    stamps = {path: path.stat().st_mtime_ns for path in parts}
    code, again, err = run_script("jobs/compare.py", args, monkeypatch, capsys)
    assert code == 0, err[-2000:]
    assert {path: path.stat().st_mtime_ns for path in parts} == stamps  # predictions and pairs reused
    assert json.loads((stage / "summary.json").read_text())["pairs"] == summary["pairs"]


def test_compare_job_refuses_bad_input(two_families, masked_root, tmp_path, monkeypatch, capsys):
    runs, out = two_families
    copy = Path(shutil.copytree(runs[0], tmp_path / "copy", ignore=shutil.ignore_patterns("features", "last.pt")))
    trained = read_json(copy / "summary.json")
    write_json(copy / "summary.json", {**trained, "data": str(tmp_path / "other-data")})
    cases = [(["--runs", runs[0], "--data", masked_root, "--out", out], "at least two", None),
             (["--runs", *runs, "--data", masked_root, "--out", tmp_path / "elsewhere"], "jobs/gradcam.py --runs",
              None),
             (["--runs", runs[1], copy, "--data", masked_root, "--out", out], "trained on different data", None),
             (["--runs", runs[1], copy, "--data", masked_root, "--out", out], "jobs/extract.py", trained)]
    for args, reason, summary in cases:
        if summary is not None:
            write_json(copy / "summary.json", summary)
        code, _, err = run_script("jobs/compare.py", args, monkeypatch, capsys)
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1 and reason in errors[0], err[-1000:]
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path / "copy" / "features").exists()
