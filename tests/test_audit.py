"""The data audit: seeded label flips ranked first, exact/resized/re-encoded copies across splits found, a noise
image at the top of the outliers; the neighbour search (exact, and the HNSW graph's recall and near-duplicates)
against a brute-force one; quarantine."""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from catdog.audit import FeatureFile, Rows, duplicate_pairs, nearest_neighbours, out_of_fold_probabilities
from catdog.config import AuditConfig
from catdog.errors import CatdogError
from catdog.io import read_json
from catdog.prepare import quarantine_listed
from tests.conftest import run_script


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _read(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_seeded_label_flips_rank_above_clean_images():
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    rng = np.random.default_rng(0)
    n, dim, flips = 400, 16, 8
    labels = np.arange(n) % 2
    centres = rng.normal(size=(2, dim)) * 1.5
    features = _unit(centres[labels] + rng.normal(size=(n, dim)))
    flipped = rng.choice(n, flips, replace=False)
    given = labels.copy()
    given[flipped] = 1 - given[flipped]
    rows = Rows(["train"], np.zeros(n, dtype=np.int8), given, [f"train/x/{i}.jpg" for i in range(n)], ["a", "b"])
    probabilities = out_of_fold_probabilities(features, [slice(0, dim)], rows, AuditConfig(fit_rows=300))
    assert np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    worst = np.argsort(get_label_quality_scores(given, probabilities))[:2 * flips]
    assert set(flipped) <= set(worst)
    flagged = find_label_issues(given, probabilities, return_indices_ranked_by="self_confidence", n_jobs=1)
    assert set(flagged[:flips]) == set(flipped)


def test_exact_neighbours_match_brute_force():
    rng = np.random.default_rng(1)
    features = _unit(rng.normal(size=(53, 8)))
    similarity, index = nearest_neighbours(features, k=4, block_rows=7, exact_rows=len(features))
    full = features @ features.T
    np.fill_diagonal(full, -np.inf)
    expected = np.argsort(-full, axis=1)[:, :4]
    assert (index == expected).all()
    assert np.allclose(similarity, np.take_along_axis(full, expected, axis=1), atol=1e-5)


def _clustered(rng: np.random.Generator, n: int, dim: int, clusters: int) -> np.ndarray:
    """Unit vectors around ``clusters`` random centres, each row near a low-dimensional subspace of its cluster."""
    centres = rng.normal(size=(clusters, dim))
    basis = rng.normal(size=(clusters, 8, dim))
    member = rng.integers(0, clusters, n)
    spread = np.einsum("nj,njd->nd", rng.normal(size=(n, 8)), basis[member])
    return _unit(centres[member] + 0.5 * spread + 0.3 * rng.normal(size=(n, dim)))


def test_graph_neighbours_recall_brute_force():
    rng = np.random.default_rng(2)
    features = _clustered(rng, 3000, 64, 12)
    k = 10
    similarity, index = nearest_neighbours(features, k=k, block_rows=500, exact_rows=0)
    full = features @ features.T
    np.fill_diagonal(full, -np.inf)
    expected = np.argsort(-full, axis=1)[:, :k]
    recall = np.mean([len(set(found) & set(true)) / k for found, true in zip(index, expected)])
    assert recall >= 0.95, recall
    assert (index != np.arange(len(features))[:, None]).all()  # never the row itself
    assert np.allclose(similarity, np.take_along_axis(full, index, axis=1), atol=1e-5)  # exact dot products
    assert (np.diff(similarity, axis=1) <= 1e-6).all()  # most similar first


def test_graph_neighbours_find_every_near_duplicate():
    rng = np.random.default_rng(3)
    originals = _clustered(rng, 2500, 64, 12)
    copies = _unit(originals[:60] + 0.1 * rng.normal(size=(60, 64)) / 8)  # cosine about 0.99 to its original
    features = np.concatenate([originals, copies])
    similarity, index = nearest_neighbours(features, k=5, block_rows=512, exact_rows=0)
    full = features @ features.T
    np.fill_diagonal(full, -np.inf)
    near = {tuple(sorted(pair)) for pair in zip(*np.nonzero(full >= 0.97))}
    assert {(i, 2500 + i) for i in range(60)} <= near
    found = {tuple(sorted((int(i), int(index[i, j])))) for i, j in zip(*np.nonzero(similarity >= 0.97))}
    assert found == near


def test_duplicate_pairs_list_the_test_copy_of_a_train_image():
    rows = Rows(["train", "test"], np.array([0, 0, 1], dtype=np.int8), np.array([0, 1, 0]),
                ["train/a/1.jpg", "train/b/2.jpg", "test/a/3.jpg"], ["a", "b"])
    similarity = np.array([[0.2], [0.99], [0.99]], dtype=np.float32)
    neighbours = np.array([[1], [2], [1]])
    pairs = duplicate_pairs(rows, ["h0", "h1", "h0"], similarity, neighbours, threshold=0.98)
    assert [(p["kind"], p["kept"], p["listed"]) for p in pairs] == [("exact", 0, 2), ("near", 1, 2)]


def _copy_run(run: Path, to: Path) -> Path:
    """The trained run's files, without its later stages (its feature store is of other data)."""
    to.mkdir(parents=True)
    for name in ("config.yaml", "summary.json", "best.safetensors", "val_predictions.csv"):
        shutil.copy(run / name, to / name)
    return to


def _smooth_pictures(root: Path, counts: dict[str, int], rng: np.random.Generator) -> None:
    """``root/<split>/<class>/<i>.jpg``: distinct pictures of large colour patches (re-encoding keeps them)."""
    for split, n in counts.items():
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                coarse = rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)
                Image.fromarray(coarse).resize((48, 40), Image.BICUBIC).save(root / split / cls / f"{i}.jpg",
                                                                              quality=95)


def test_audit_finds_copies_across_splits_and_a_noise_image(tiny_run, tmp_path, monkeypatch, capsys):
    from catdog.extract import extract
    from catdog.run import RunDir

    data = tmp_path / "data"
    _smooth_pictures(data, {"train": 12, "test": 4, "val": 4}, np.random.default_rng(3))
    original = {"exact": "train/cat/0.jpg", "resized": "train/dog/1.jpg", "reencoded": "train/cat/2.jpg"}
    shutil.copy(data / original["exact"], data / "test/cat/copy.exact.jpg")
    with Image.open(data / original["resized"]) as image:
        image.resize((image.width * 2, image.height * 2), Image.BICUBIC).save(data / "val/dog/copy.resized.jpg")
    with Image.open(data / original["reencoded"]) as image:
        image.save(data / "val/cat/copy.reencoded.jpg", quality=60)
    noise = np.random.default_rng(4).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(noise).save(data / "train/dog/noise.jpg", quality=95)
    run = _copy_run(tiny_run, tmp_path / "run")
    extract(RunDir(run).config(), run, data)

    code, out, err = run_script("jobs/audit.py", ["--run", run, "--data", data], monkeypatch, capsys)
    assert code == 0, err
    audit_dir = RunDir(run).audit_dir
    duplicates = _read(audit_dir / "duplicates.csv")
    assert [(d["path"], d["duplicate_of"], d["kind"], d["cross_split"]) for d in duplicates] == [
        ("test/cat/copy.exact.jpg", original["exact"], "exact", "True"),
        *sorted([("val/dog/copy.resized.jpg", original["resized"], "near", "True"),
                 ("val/cat/copy.reencoded.jpg", original["reencoded"], "near", "True")],
                key=lambda d: -next(float(r["score"]) for r in duplicates if r["path"] == d[0]))]
    assert _read(audit_dir / "outliers.csv")[0]["path"] == "train/dog/noise.jpg"
    with open(audit_dir / "label_issues.csv", newline="") as handle:
        header = next(csv.reader(handle))
    assert header[:5] == ["path", "split", "given_label", "suggested_label", "score"] and "model_p_given_run" in header
    assert (audit_dir / "suspects.png").is_file()
    result = read_json(RunDir(run).audit_summary)
    assert result["counts"]["leaked"] == {"test": 1, "val": 2}
    val = next(row for row in result["leak_effect"] if row["split"] == "val")
    assert (val["images"], val["leaked"]) == (10, 2)
    assert not list(audit_dir.glob(".*"))  # no temporary file left behind
    assert "leaked" in out


def test_quarantine_moves_listed_images_once(tmp_path):
    data = tmp_path / "data"
    (data / "train" / "cat").mkdir(parents=True)
    for name in ("a.jpg", "b.jpg"):
        (data / "train" / "cat" / name).write_bytes(b"x")
    listed = tmp_path / "list.csv"
    listed.write_text("path,score\ntrain/cat/a.jpg,0.9\n")
    assert quarantine_listed(data, listed)["moved"] == 1
    assert (data / "quarantine" / "train" / "cat" / "a.jpg").is_file()
    assert not (data / "train" / "cat" / "a.jpg").exists() and (data / "train" / "cat" / "b.jpg").is_file()
    assert quarantine_listed(data, listed) == {"moved": 0, "already": 1, "log": data / "quarantine" / "quarantined.csv"}
    assert _read(data / "quarantine" / "quarantined.csv")[0]["path"] == "train/cat/a.jpg"
    listed.write_text("path\n../outside.jpg\n")
    with pytest.raises(CatdogError, match="not an image inside"):
        quarantine_listed(data, listed)


def test_feature_file_reads_blocks_and_keeps_no_mapping(tmp_path):
    """The audit's features file: every read equals the array's, and no map of the file outlives a read (a kept map
    would hold every block read so far in the process's memory: N x D x 4 bytes)."""
    features = np.random.default_rng(0).random((50, 6), dtype=np.float32)
    path = tmp_path / "features.npy"
    np.save(path, features)
    file = FeatureFile(path)
    assert file.shape == (50, 6) and len(file) == 50
    np.testing.assert_array_equal(file[10:20], features[10:20])
    np.testing.assert_array_equal(file[np.array([3, 7, 41]), 2:5], features[np.array([3, 7, 41]), 2:5])
    assert str(path) not in Path("/proc/self/maps").read_text()
    similarity, index = nearest_neighbours(file, k=3, block_rows=7, exact_rows=50)
    reference = nearest_neighbours(features, k=3, block_rows=7, exact_rows=50)
    np.testing.assert_array_equal(index, reference[1])
    np.testing.assert_array_equal(similarity, reference[0])
