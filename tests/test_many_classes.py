"""Many classes: which classes get pictures (catdog.classes), and per-class pictures and the report stay bounded."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from catdog.cam import gradcam
from catdog.classes import classes_shown
from catdog.config import FiguresConfig, save_config
from catdog.errors import CatdogError
from catdog.io import read_json, write_json
from catdog.predict import InputImage, csv_columns, csv_text, prediction_rows
from catdog.report import report
from catdog.run import RunDir
from catdog.train import train
from conftest import make_image_folder, tiny_config

CLASSES = [f"c{i}" for i in range(6)]


def write_val_predictions(run: Path, pairs: list[tuple[int, int]]) -> None:
    """val_predictions.csv as training writes it, one row per (label, predicted) pair."""
    items = [InputImage(Path(f"val/{CLASSES[label]}/{i}.jpg"), f"val/{CLASSES[label]}/{i}.jpg", label)
             for i, (label, _) in enumerate(pairs)]
    predicted = [p for _, p in pairs]
    probabilities = np.eye(len(CLASSES))[predicted]
    rows = prediction_rows(items, probabilities, predicted, CLASSES, labelled=True)
    run.mkdir(parents=True, exist_ok=True)
    RunDir(run).val_predictions_path.write_text(csv_text(rows, csv_columns(CLASSES, labelled=True)))


def test_classes_shown_most_confused_first(tmp_path):
    # mistakes: 4 -> 2 twice, 5 -> 2 once, 1 -> 3 once; per class: c2 3, c4 2, c1 1, c3 1, c5 1, c0 0
    write_val_predictions(tmp_path, [(0, 0), (1, 1), (4, 2), (4, 2), (5, 2), (1, 3), (3, 3), (2, 2)])
    assert classes_shown(tmp_path, CLASSES, 3) == [2, 4, 1]          # c1, c3, c5 tie at 1: by class index
    assert classes_shown(tmp_path, CLASSES, 5) == [2, 4, 1, 3, 5]
    assert classes_shown(tmp_path, CLASSES, None) == list(range(6))
    assert classes_shown(tmp_path, CLASSES, 6) == list(range(6))
    assert classes_shown(tmp_path, CLASSES, 60) == list(range(6))


def test_classes_shown_without_predictions_takes_the_first(tmp_path):
    assert classes_shown(tmp_path, CLASSES, 2) == [0, 1]
    assert classes_shown(tmp_path, CLASSES, None) == list(range(6))


def test_classes_shown_rejects_predictions_of_other_classes(tmp_path):
    write_val_predictions(tmp_path, [(0, 1)])
    with pytest.raises(CatdogError, match="val_predictions.csv"):
        classes_shown(tmp_path, ["x", "y", "z"], 2)


FIGURE_SETTINGS = ("train.linear_probe=false", "optim.head_init=random", "gradcam.images_per_class=1",
                   "gradcam.faithfulness_images=4", "gradcam.sanity_images_per_class=1", "gradcam.road_percentiles=[50]",
                   "figures.max_classes=3")


def noisy_png(path: Path, rng: np.random.Generator, size: tuple[int, int] = (400, 300)) -> None:
    """A figure that compresses about as badly as a montage of photos."""
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def draw_every_class(run: Path, classes: list[str], rng: np.random.Generator) -> None:
    """Top-activation and concept outputs with pictures of every class, as the stages wrote them before they were
    bounded: the report must still show only ``figures.max_classes`` of them."""
    topact, concepts = {}, {}
    for folder in ("topact", "concepts"):
        (run / folder).mkdir()
    for name in classes:
        noisy_png(run / "topact" / f"{name}-f1.png", rng)
        topact[name] = [{"feature": 1, "rank": 1, "montage": f"{name}-f1.png", "class_shares": {name: 1.0}}]
        noisy_png(run / "concepts" / f"{name}-c1.png", rng)
        noisy_png(run / "concepts" / f"{name}-samples.png", rng)
        concepts[name] = {"images": 2, "positions": 8, "reconstruction_error": 0.4, "importance_images": 1,
                          "mean_logit": 1.0, "sample_figure": f"{name}-samples.png",
                          "concepts": [{"concept": 1, "importance": 1.0, "importance_std": 0.1, "random_importance": 0.1,
                                        "random_importance_std": 0.05, "beats_random": 0.9, "mean_coefficient": 0.3,
                                        "top_channels": [1, 2], "montage": f"{name}-c1.png", "images": []}]}
    write_json(run / "topact" / "index.json", {"split": "train", "selectivity_top": 5, "classes": topact})
    write_json(run / "concepts" / "index.json", {
        "split": "train", "importance_split": "val", "concepts_per_class": 1, "factorisation": "NMF",
        "importance": "logit drop", "random_baseline": "random direction", "cam_method": "gradcam", "classes": concepts})


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[int, Path]:
    """For K = 4 and 12 classes: a tiny run (one epoch) with figures.max_classes=3, its Grad-CAM, pictures of every
    class in topact and concepts, and its report; the output folder by K."""
    out = {}
    for k in (4, 12):
        root = tmp_path_factory.mktemp(f"k{k}")
        data = make_image_folder(root / "data", {"train": 2, "test": 1, "val": 2},
                                 classes=[f"class{c:02d}" for c in range(k)])
        config = tiny_config(*FIGURE_SETTINGS)
        train(config, data, root / "run")
        gradcam([root / "run"], data, root, config)
        draw_every_class(root / "run", [f"class{c:02d}" for c in range(k)], np.random.default_rng(k))
        report([root / "run"], root / "report", root / "gradcam")
        out[k] = root
    return out


def test_pictures_of_max_classes_classes(reports):
    root = reports[12]
    classes = RunDir(root / "run").summary()["classes"]
    shown = [classes[c] for c in classes_shown(root / "run", classes, 3)]
    assert len(classes) == 12 and len(shown) == 3
    cams = read_json(root / "gradcam" / "summary.json")
    assert cams["grid_classes"] == shown and cams["classes"] == classes
    assert [path.split("/")[1] for path in cams["grid_images"]] == shown  # one image per class, most confused first
    assert len(cams["sanity_images"]) == 3  # the sanity check runs on the shown classes: bounded as K grows
    with Image.open(root / "gradcam" / "grid.png") as grid:
        assert grid.height < 1200  # 3 rows of 250 px, not 12
    summary = read_json(root / "report" / "summary.json")
    (run,) = summary["runs"]
    assert run["figures"] == {"shown": shown, "classes": 12}
    assert list(run["topact"]["classes"]) == shown and list(run["concepts"]["classes"]) == shown
    page = (root / "report" / "index.html").read_text()
    assert page.count("3 of 12 classes shown, most confused first; <code>figures.max_classes=null</code> shows all") == 3
    hidden = set(classes) - set(shown)
    assert not any(f"<h4>{name}</h4>" in page for name in hidden)
    assert all(f"<h4>{name}</h4>" in page for name in shown)
    # curves, Grad-CAM grid, sanity plot; per shown class a top-activation montage, a concept montage, a sample figure
    assert page.count("<img ") == 3 + 3 * 3


def test_report_size_stays_bounded_as_classes_grow(reports):
    sizes = {k: (root / "report" / "index.html").stat().st_size for k, root in reports.items()}
    pictures = {k: sum(path.stat().st_size for path in (root / "run").glob("*/*.png")) for k, root in reports.items()}
    assert pictures[12] > 2.5 * pictures[4]  # the stages drew every class ...
    assert sizes[12] < 1.3 * sizes[4]  # ... the page shows three of them either way


def test_all_classes_with_max_classes_null(reports, tmp_path):
    root = reports[12]
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    config = RunDir(run).config()
    save_config(config.model_copy(update={"figures": FiguresConfig(max_classes=None)}), RunDir(run).config_path)
    summary = report([run], tmp_path / "report")
    assert summary["runs"][0]["figures"]["shown"] == RunDir(run).summary()["classes"]
    assert "classes shown" not in (tmp_path / "report" / "index.html").read_text()
