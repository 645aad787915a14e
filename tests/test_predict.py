"""jobs/predict.py on the tiny run: predictions per image, skipped files, labelled evaluation, Grad-CAM overlays."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from catdog.predict import InputImage, cam_file_names, classification_metrics, confusion_table, list_inputs
from conftest import run_script


def run_predict(args: list, monkeypatch, capsys) -> tuple[int, str, str]:
    """``jobs/predict.py ARGS`` in this process: (exit code, stdout, stderr)."""
    return run_script("jobs/predict.py", args, monkeypatch, capsys)


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return reader.fieldnames, list(reader)


def photo_folder(synthetic_root: Path, tmp_path: Path) -> Path:
    """``photos/{a,b}/`` with val images, two of them both named cat.0.jpg, and one nested deeper."""
    val = synthetic_root / "val"
    photos = tmp_path / "photos"
    for sub, files in {"a": ["cat/cat.0.jpg", "dog/dog.1.jpg"], "b": ["cat/cat.0.jpg"],
                       "b/deep": ["dog/dog.2.jpg"]}.items():
        (photos / sub).mkdir(parents=True, exist_ok=True)
        for name in files:
            shutil.copy(val / name, photos / sub / Path(name).name)
    (photos / "a" / "readme.md").write_text("not an image suffix: not listed")
    return photos


def test_predictions_csv(tiny_run, synthetic_root, tmp_path, monkeypatch, capsys):
    photos = photo_folder(synthetic_root, tmp_path)
    single = synthetic_root / "val" / "dog" / "dog.4.jpg"
    code, out, err = run_predict(["--run", tiny_run, "--out", tmp_path / "out", single, photos],
                                 monkeypatch, capsys)
    assert code == 0, err
    columns, rows = read_csv(tmp_path / "out" / "predictions.csv")
    assert columns == ["path", "predicted", "probability", "p_cat", "p_dog"]
    assert [row["path"] for row in rows] == [str(single)] + [str(photos / p) for p in
                                                             ("a/cat.0.jpg", "a/dog.1.jpg", "b/cat.0.jpg",
                                                              "b/deep/dog.2.jpg")]
    for row in rows:
        probs = np.array([float(row["p_cat"]), float(row["p_dog"])])
        assert abs(probs.sum() - 1) < 1e-5
        assert row["predicted"] == ("cat", "dog")[int(probs.argmax())]
        assert float(row["probability"]) == probs.max()
    assert read_csv(tmp_path / "out" / "skipped.csv") == (["path", "reason"], [])
    assert "5 image(s) predicted" in out
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_unreadable_files_are_skipped_and_listed(tiny_run, synthetic_root, tmp_path, monkeypatch, capsys, caplog):
    photos = photo_folder(synthetic_root, tmp_path)
    (photos / "a" / "empty.jpg").write_bytes(b"")
    (photos / "a" / "fake.jpg").write_text("a text file with an image suffix\n")
    good = (synthetic_root / "val" / "cat" / "cat.1.jpg").read_bytes()
    (photos / "b" / "truncated.jpg").write_bytes(good[:300])  # the header identifies it; decoding fails
    notes = tmp_path / "notes.txt"
    notes.write_text("named explicitly, so it is tried and skipped\n")
    # Decoded in 2 worker processes: a bad file must come back as a skip, not kill the loader.
    code, out, err = run_predict(["--run", tiny_run, "--out", tmp_path / "out", "--workers", 2, "--batch-size", 3,
                                  photos, notes], monkeypatch, capsys)
    assert code == 0, err
    _, skipped = read_csv(tmp_path / "out" / "skipped.csv")
    reasons = {Path(row["path"]).name: row["reason"] for row in skipped}
    assert set(reasons) == {"empty.jpg", "fake.jpg", "truncated.jpg", "notes.txt"}
    assert reasons["empty.jpg"] == "empty file (0 bytes)"
    assert reasons["fake.jpg"].startswith("not an image")
    assert reasons["notes.txt"].startswith("not an image")
    assert reasons["truncated.jpg"].startswith("cannot decode")
    warning = [r.getMessage() for r in caplog.records if "PIL cannot use" in r.getMessage()]  # catdog.data.warn_skipped
    assert len(warning) == 1 and "skipped 4 image file(s)" in warning[0]
    assert all(f"{row['path']} ({row['reason']})" in warning[0] for row in skipped[:3])
    _, rows = read_csv(tmp_path / "out" / "predictions.csv")
    assert [Path(row["path"]).relative_to(photos).as_posix() for row in rows] == [
        "a/cat.0.jpg", "a/dog.1.jpg", "b/cat.0.jpg", "b/deep/dog.2.jpg"]


def test_missing_path_is_one_line_error(tiny_run, synthetic_root, tmp_path, monkeypatch, capsys):
    missing = tmp_path / "no-such-photo.jpg"
    code, _, err = run_predict(["--run", tiny_run, "--out", tmp_path / "out", synthetic_root / "val", missing],
                               monkeypatch, capsys)
    assert code == 2
    assert err.strip().splitlines() == [f"error: {missing}: no such file or folder"]
    assert not (tmp_path / "out").exists()


def test_labelled_val_reproduces_summary(tiny_run, synthetic_root, tmp_path, monkeypatch, capsys):
    summary = json.loads((tiny_run / "summary.json").read_text())
    code, out, err = run_predict(["--run", tiny_run, "--out", tmp_path / "out", "--labelled", synthetic_root / "val"],
                                 monkeypatch, capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["precision"] == summary["mixed_precision"]
    assert metrics["accuracy"] == summary["val_accuracy"]
    assert metrics["images"] == summary["val_images"] == 10
    matrix = np.array(metrics["confusion_matrix"]["matrix"])
    assert metrics["confusion_matrix"]["classes"] == summary["classes"] == ["cat", "dog"]
    assert matrix.shape == (2, 2) and matrix.sum() == metrics["images"]
    assert matrix.trace() == metrics["correct"]
    assert set(metrics["per_class_accuracy"]) == {"cat", "dog"}
    assert f"accuracy {summary['val_accuracy']:.2%}" in out
    assert "true \\ predicted" in out
    columns, rows = read_csv(tmp_path / "out" / "predictions.csv")
    assert columns == ["path", "label", "predicted", "probability", "p_cat", "p_dog"]
    assert len(rows) == 10 and [row["label"] for row in rows] == ["cat"] * 5 + ["dog"] * 5
    assert sum(row["label"] == row["predicted"] for row in rows) == metrics["correct"]
    # training's own val evaluation wrote the same predictions (what jobs/compare.py reads)
    trained_columns, trained = read_csv(tiny_run / "val_predictions.csv")
    assert trained_columns == columns
    assert [Path(row["path"]).parts[-2:] for row in trained] == [Path(row["path"]).parts[-2:] for row in rows]
    assert [row["predicted"] for row in trained] == [row["predicted"] for row in rows]
    np.testing.assert_allclose([[float(row[c]) for c in columns[3:]] for row in trained],
                               [[float(row[c]) for c in columns[3:]] for row in rows], rtol=1e-5, atol=1e-6)


def test_probabilities_equal_accelerate_evaluation(tiny_run, synthetic_root, tmp_path, monkeypatch, capsys):
    """Bit for bit what training's evaluation computes: Accelerate's autocast at the run's precision, channels_last,
    the mirror-image average when the run evaluated with it, the same batches; and --precision no gives other numbers where the run used bf16, so the default matters."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from torch.utils.data import DataLoader

    from catdog.splits import open_split
    from catdog.run import RunDir

    code, _, err = run_predict(["--run", tiny_run, "--out", tmp_path / "out", "--labelled", synthetic_root / "val"],
                               monkeypatch, capsys)
    assert code == 0, err
    _, rows = read_csv(tmp_path / "out" / "predictions.csv")
    predicted = np.array([[float(row["p_cat"]), float(row["p_dog"])] for row in rows], dtype=np.float32)

    run = RunDir(tiny_run)
    summary, config = run.summary(), run.config()
    network, classes = run.load_model()
    if config.train.channels_last:
        network = network.to(memory_format=torch.channels_last)
    loader = DataLoader(open_split(synthetic_root, "val", config.data, classes=classes), config.data.eval_batch_size)
    AcceleratorState._reset_state(reset_partial_state=False)  # as catdog.extract does: another precision may be set
    try:
        accelerator = Accelerator(cpu=True, mixed_precision=summary["mixed_precision"])
        model, loader = accelerator.prepare(network, loader)
        def probabilities(images):
            images = images.contiguous(memory_format=torch.channels_last) if config.train.channels_last else images
            if not config.train.tta_hflip:
                return model(images).float().softmax(dim=1)
            return (model(images).float().softmax(dim=1) + model(images.flip(-1)).float().softmax(dim=1)) / 2

        with torch.no_grad():
            expected = torch.cat([probabilities(images) for images, _, _ in loader]).numpy()
    finally:
        AcceleratorState._reset_state(reset_partial_state=False)
    np.testing.assert_array_equal(predicted, expected)

    if summary["mixed_precision"] != "no":
        code, _, err = run_predict(["--run", tiny_run, "--out", tmp_path / "fp32", "--labelled",
                                    synthetic_root / "val", "--precision", "no"], monkeypatch, capsys)
        assert code == 0, err
        _, rows = read_csv(tmp_path / "fp32" / "predictions.csv")
        assert not np.array_equal(predicted, [[float(row["p_cat"]), float(row["p_dog"])] for row in rows])


def test_labelled_subset_and_unknown_class(tiny_run, synthetic_root, tmp_path, monkeypatch, capsys):
    root = tmp_path / "labelled"
    shutil.copytree(synthetic_root / "val" / "dog", root / "dog")
    code, _, err = run_predict(["--run", tiny_run, "--out", tmp_path / "out", "--labelled", root],
                               monkeypatch, capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["images"] == 5 and metrics["per_class_accuracy"]["cat"] is None
    assert np.array(metrics["confusion_matrix"]["matrix"])[0].sum() == 0

    (root / "bird").mkdir()
    code, _, err = run_predict(["--run", tiny_run, "--out", tmp_path / "out2", "--labelled", root],
                               monkeypatch, capsys)
    assert code == 2
    [line] = err.strip().splitlines()
    assert line.startswith("error: ") and str(root / "bird") in line and "['cat', 'dog']" in line
    assert not (tmp_path / "out2").exists()


def test_cam_writes_one_png_per_image(tiny_run, synthetic_root, tmp_path, monkeypatch, capsys):
    photos = photo_folder(synthetic_root, tmp_path)
    code, out, err = run_predict(["--run", tiny_run, "--out", tmp_path / "out", "--cam", photos],
                                 monkeypatch, capsys)
    assert code == 0, err
    columns, rows = read_csv(tmp_path / "out" / "predictions.csv")
    assert columns[-1] == "cam"
    pngs = sorted(p.name for p in (tmp_path / "out" / "cam").iterdir())
    assert len(pngs) == len(rows) == 4
    assert sorted(Path(row["cam"]).name for row in rows) == pngs
    assert "photos__a__cat.0.jpg.png" in pngs and "photos__b__cat.0.jpg.png" in pngs
    for png in pngs:
        assert (tmp_path / "out" / "cam" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_classification_metrics():
    metrics = classification_metrics([0, 0, 0, 1, 1], [0, 1, 0, 1, 1], ["cat", "dog", "fox"])
    assert metrics["accuracy"] == 4 / 5 and metrics["images"] == 5
    assert metrics["per_class_accuracy"] == {"cat": 2 / 3, "dog": 1.0, "fox": None}
    assert metrics["confusion_matrix"]["matrix"] == [[2, 1, 0], [0, 2, 0], [0, 0, 0]]
    table = confusion_table(metrics).splitlines()
    assert table[0].split()[-3:] == ["cat", "dog", "fox"] and table[1].split() == ["cat", "2", "1", "0"]


def test_cam_file_names_do_not_collide():
    items = [InputImage(Path(p), n) for p, n in [("x/a/cat.jpg", "x/a/cat.jpg"), ("x/b/cat.jpg", "x/b/cat.jpg"),
                                                 ("cat.jpg", "cat.jpg"), ("y/cat.jpg", "cat.jpg"),
                                                 ("z/.h ü.jpg", "z/.h ü.jpg")]]
    assert cam_file_names(items) == ["x__a__cat.jpg.png", "x__b__cat.jpg.png", "cat.jpg.png", "cat.jpg-2.png",
                                     "z__.h_.jpg.png"]


def test_list_inputs_dedupes_and_checks(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b.png").write_bytes(b"")
    (tmp_path / "d" / "a.JPG").write_bytes(b"")
    listed = list_inputs([tmp_path / "d" / "b.png", tmp_path / "d"])
    assert [item.path.name for item in listed] == ["b.png", "a.JPG"]
    assert listed[1].name == "d/a.JPG"


def test_a_photo_turned_by_its_exif_tag_is_seen_upright(tiny_run, synthetic_root, tmp_path, monkeypatch, capsys):
    """A phone's portrait photo: stored on its side with EXIF orientation 6. Every decoder (prediction, the feature
    store's images for montages) sees the pixels of the same photo stored upright, and predicts the same."""
    from catdog.store import load_store_image

    with Image.open(synthetic_root / "val" / "cat" / "cat.0.jpg") as image:
        upright = image.convert("RGB")
    photos = tmp_path / "photos"
    photos.mkdir()
    upright.save(photos / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to view
    upright.transpose(Image.Transpose.ROTATE_90).save(photos / "turned.png", exif=exif.tobytes())
    assert np.array_equal(np.asarray(load_store_image(photos, "turned.png", 64)),
                          np.asarray(load_store_image(photos, "upright.png", 64)))
    code, _, err = run_predict(["--run", tiny_run, "--out", tmp_path / "out", "--precision", "no", photos],
                               monkeypatch, capsys)
    assert code == 0, err
    rows = {Path(row["path"]).name: row for row in read_csv(tmp_path / "out" / "predictions.csv")[1]}
    assert rows["turned.png"]["predicted"] == rows["upright.png"]["predicted"]
    assert abs(float(rows["turned.png"]["p_cat"]) - float(rows["upright.png"]["p_cat"])) < 1e-5  # the same pixels
