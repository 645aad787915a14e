"""examples/feature_store.ipynb, executed top to bottom by a Jupyter kernel (nbclient) on a tiny run with a
feature store: every cell runs, every figure cell draws a PNG, and the neighbours and top images it lists are the
ones the store gives (nearest neighbours recomputed here with numpy; each overlaid map checked against its
feature)."""
from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

from catdog.config import load_config
from catdog.extract import extract
from catdog.forest import run_forest
from catdog.ranking import GLOBAL, read_ranking
from catdog.run import RunDir
from catdog.store import FeatureStore

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "examples" / "feature_store.ipynb"
NEIGHBOUR_LINE = re.compile(r"^\s*(\d+)\s+(\S+)\s+(\S+)\s+distance (\S+)$", re.M)
TOP_LINE = re.compile(r"^\s*(\d+)\s+(\S+)\s+(\S+)\s+activation (\S+)$", re.M)
REPORT = """
import json, sys
print(json.dumps({"python": sys.executable, "split": SPLIT, "query": int(QUERY_ROW), "neighbours": NEIGHBOURS,
                  "top_images": TOP_IMAGES, "feature": FEATURE}))
"""
"""Appended to the executed copy: the kernel's interpreter and the notebook's parameters, as the kernel saw them."""


@pytest.fixture(scope="module")
def run_with_store(tiny_run, tmp_path_factory, synthetic_root) -> Path:
    """The tiny run with a feature store (shards of 4 images, so a split spans several; float32, so that pooled
    features and spatial maps can be compared) and a forest."""
    run = Path(shutil.copytree(tiny_run, tmp_path_factory.mktemp("notebook") / "run"))
    config = load_config(RunDir(run).config_path, ["extract.shard_size=4", "extract.mixed_precision='no'",
                                                    "forest.n_estimators=20"])
    extract(config, run, synthetic_root)
    run_forest(config, run)
    return run


def execute(run: Path, data: Path, cwd: Path, monkeypatch) -> tuple[nbformat.NotebookNode, dict]:
    """The notebook executed with ``CATDOG_RUN``/``CATDOG_DATA`` set (nbclient raises on a cell's error), and what
    the appended ``REPORT`` cell printed. The kernel spec ``python3`` names ``python``, which jupyter_client
    replaces with this interpreter (``sys.executable``): the kernel runs in this test's environment."""
    monkeypatch.setenv("CATDOG_RUN", str(run))
    monkeypatch.setenv("CATDOG_DATA", str(data))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell(REPORT))
    NotebookClient(notebook, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(cwd)}}).execute()
    return notebook, json.loads(stdout(notebook.cells[-1]))


def stdout(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")


def tagged(notebook, tag: str) -> list:
    return [cell for cell in notebook.cells if tag in cell.metadata.get("tags", [])]


def cosine_distances(x: np.ndarray, query: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    q = query.astype(np.float64)
    return 1 - x @ q / (np.linalg.norm(x, axis=1) * np.linalg.norm(q))


@pytest.mark.parametrize("ranked", [True, False], ids=["forest-ranking", "no-forest"])
def test_notebook_runs_on_a_tiny_run(run_with_store, synthetic_root, tmp_path, monkeypatch, ranked):
    run = run_with_store
    if not ranked:  # the feature then is the one with the highest variance
        run = Path(shutil.copytree(run, tmp_path / "run", ignore=shutil.ignore_patterns("forest")))
    notebook, seen = execute(run, synthetic_root, tmp_path, monkeypatch)
    assert seen["python"] == sys.executable
    for cell in notebook.cells:
        assert not [o for o in cell.get("outputs", []) if o.output_type == "error"]
    figures = tagged(notebook, "figure")
    assert len(figures) == 3
    for cell in figures:
        assert [o for o in cell.outputs if "image/png" in o.get("data", {})], cell.source[:80]
    assert {p.name for p in tmp_path.iterdir()} <= {"run"}  # the notebook only reads

    store = FeatureStore(run / "features")
    split, features, paths = seen["split"], store.features(seen["split"]), store.paths(seen["split"])

    [neighbours_cell] = tagged(notebook, "neighbours")
    listed = NEIGHBOUR_LINE.findall(stdout(neighbours_cell))
    assert [int(rank) for rank, *_ in listed] == list(range(1, seen["neighbours"] + 1))
    distances = cosine_distances(features, features[seen["query"]])
    rows = [paths.index(path) for _, path, _, _ in listed]
    assert seen["query"] not in rows and len(set(rows)) == len(rows)
    printed = np.array([float(d) for *_, d in listed])
    np.testing.assert_allclose(printed, distances[rows], atol=2e-4)
    others = np.delete(distances, [seen["query"], *rows])
    assert np.all(np.diff(printed) >= -1e-4) and (others.size == 0 or others.min() >= printed.max() - 1e-4)
    assert [name for _, _, name, _ in listed] == [store.classes[store.labels(split)[r]] for r in rows]

    feature = seen["feature"]
    expected = (read_ranking(RunDir(run), GLOBAL, store.feature_dim)[0] if ranked
                else int(features.var(axis=0).argmax()))
    assert feature == expected
    [top_cell] = tagged(notebook, "top-images")
    listed = TOP_LINE.findall(stdout(top_cell))
    assert [int(rank) for rank, *_ in listed] == list(range(1, seen["top_images"] + 1))
    rows = np.argsort(-features[:, feature], kind="stable")[:len(listed)]
    assert [path for _, path, _, _ in listed] == [paths[r] for r in rows]
    printed = np.array([float(a) for *_, a in listed])
    np.testing.assert_allclose(printed, features[rows, feature], atol=1e-3)
    maps = store.spatial(split, store.row_ids(split)[rows])[:, feature].astype(np.float32)
    # the map the notebook overlays is the feature's channel: its mean is the feature (float16 maps)
    np.testing.assert_allclose(maps.mean(axis=(1, 2)), features[rows, feature], rtol=1e-3, atol=1e-3 * maps.max())


def test_committed_notebook_has_no_outputs():
    """The repository keeps the notebook without outputs (executed copies stay outside it)."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)
