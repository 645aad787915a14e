"""tools/readme_table.py: the README's result table regenerated from runs' summary.json files, and checked."""
from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest

from conftest import REPO, run_script

TOOL = "tools/readme_table.py"


@pytest.fixture
def two_runs(tmp_path) -> list[Path]:
    """Two fake run directories (summary.json only): one beside a launch's report, one without a probe or report."""
    lite2 = tmp_path / "ref" / "efficientnet_lite2"
    mobilenet = tmp_path / "alone" / "mobilenetv2_100"
    summaries = {
        lite2: {"model": "efficientnet_lite2", "best_test_accuracy": 0.995, "val_accuracy": 0.994,
                "linear_probe_test_accuracy": 0.991, "linear_probe_val_accuracy": 0.993, "train_seconds": 750.0,
                "images_per_second": 13.3333},
        mobilenet: {"model": "mobilenetv2_100", "best_test_accuracy": 0.991, "val_accuracy": 0.9875,
                    "train_seconds": 300.0, "images_per_second": 33.34},
    }
    for run, summary in summaries.items():
        run.mkdir(parents=True)
        (run / "summary.json").write_text(json.dumps(summary))
    (tmp_path / "ref" / "report").mkdir()
    (tmp_path / "ref" / "report" / "index.html").write_bytes(b"x" * 1_234_567)
    return [lite2, mobilenet]


ROWS = ["| `efficientnet_lite2` | 99.50% | 99.40% | 99.10% / 99.30% | 12.5 | 13.3 | 1.2 MB |",
        "| `mobilenetv2_100` | 99.10% | 98.75% | - | 5.0 | 33.3 | - |"]


def test_prints_the_header_and_a_row_per_run(two_runs, monkeypatch, capsys):
    code, out, err = run_script(TOOL, two_runs, monkeypatch, capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("| model | test | val |") and lines[1].startswith("| --- |")
    assert lines[2:] == ROWS


def test_check_passes_on_the_same_rows_and_names_each_row_that_differs(two_runs, tmp_path, monkeypatch, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n| model | test |\n| --- | --- |\n" + "\n".join(f"{r}  " for r in ROWS) + "\n")
    code, out, err = run_script(TOOL, ["--check", readme, *two_runs], monkeypatch, capsys)
    assert code == 0, out + err

    readme.write_text(readme.read_text().replace("| 13.3 |", "| 13.4 |"))
    code, out, err = run_script(TOOL, ["--check", readme, *two_runs], monkeypatch, capsys)
    assert code == 1
    assert "the row for efficientnet_lite2 differs" in out and "mobilenetv2_100" not in out

    readme.write_text("| `efficientnet_lite2` <!-- REF:efficientnet_lite2 --> | to be measured | | | | | |\n")
    code, out, err = run_script(TOOL, ["--check", readme, *two_runs], monkeypatch, capsys)
    assert code == 1
    assert "the row for efficientnet_lite2 differs" in out and "no row for mobilenetv2_100" in out


def test_the_readme_table_has_the_tools_header():
    header = runpy.run_path(str(REPO / TOOL))["HEADER"]
    assert header in (REPO / "README.md").read_text()
