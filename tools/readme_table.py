"""The README's result table, from the runs' own files, so that it can be regenerated and checked.

    python tools/readme_table.py runs/ref/efficientnet_lite2 runs/ref/mobilenetv2_100                 # print it
    python tools/readme_table.py --check README.md runs/efficientnet_lite0 runs/ref/efficientnet_lite2 runs/ref/mobilenetv2_100

A row per run, from its summary.json: the model; best-epoch test and val accuracy (with hflip TTA where the run
evaluated with it); the linear probe's test / val; the training steps' minutes and images/s (``train_seconds``,
``images_per_second``: the steps alone, without the probe and evaluation); and the size of the report beside the
run, ``RUN/../report/index.html``, which ``./launch.sh --out OUT`` writes for every model of OUT ("-" when absent).

``--check FILE`` finds each run's row in FILE by its first cell (the model; backticks and HTML comments ignored) and
exits 1 naming every row that is missing or whose cells differ from the run's.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from catdog.cli import run_job  # noqa: E402
from catdog.errors import CatdogError  # noqa: E402
from catdog.run import RunDir  # noqa: E402

HEADER = ("| model | test | val | linear probe test / val | training min | train images/s | report |\n"
          "| --- | --- | --- | --- | --- | --- | --- |")
COMMENT = re.compile(r"<!--.*?-->")


def report_size(run: RunDir) -> str:
    """The size of the launch's report that shows this run, in MB (10^6 bytes)."""
    page = run.path.resolve().parent / "report" / "index.html"
    return f"{page.stat().st_size / 1e6:.1f} MB" if page.is_file() else "-"


def row(run: RunDir) -> str:
    summary = run.summary()
    probe = (f"{summary['linear_probe_test_accuracy']:.2%} / {summary['linear_probe_val_accuracy']:.2%}"
             if summary.get("linear_probe_val_accuracy") is not None else "-")
    cells = [f"`{summary['model']}`", f"{summary['best_test_accuracy']:.2%}", f"{summary['val_accuracy']:.2%}", probe,
             f"{summary['train_seconds'] / 60:.1f}", f"{summary['images_per_second']:.1f}", report_size(run)]
    return "| " + " | ".join(cells) + " |"


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def key(line: str) -> str:
    """A table row's first cell without backticks and comments: the model it is about."""
    return COMMENT.sub("", cells(line)[0]).replace("`", "").strip()


def check(path: Path, rows: list[str]) -> list[str]:
    """One line per row of ``rows`` that ``path`` lacks or holds with other cells."""
    found = {key(line): line for line in path.read_text().splitlines() if line.lstrip().startswith("|")}
    problems = []
    for wanted in rows:
        model = key(wanted)
        if model not in found:
            problems.append(f"{path}: no row for {model}; add\n  {wanted}")
        elif cells(found[model]) != cells(wanted):
            problems.append(f"{path}: the row for {model} differs from its run:\n  file: {found[model].strip()}\n"
                            f"  run:  {wanted}")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories written by jobs/train.py")
    parser.add_argument("--check", type=Path, metavar="FILE", help="exit 1 unless FILE holds these rows")
    args = parser.parse_args()
    rows = [row(RunDir(path)) for path in args.runs]
    models = [key(line) for line in rows]
    repeated = sorted({model for model in models if models.count(model) > 1})
    if repeated:
        raise CatdogError(f"{repeated[0]}: more than one of the runs given is this model; the table has a row per "
                          "model")
    if args.check is None:
        print(HEADER)
        print("\n".join(rows))
        return
    if not args.check.is_file():
        raise CatdogError(f"--check {args.check}: no such file")
    problems = check(args.check, rows)
    for problem in problems:
        print(problem)
    if problems:
        sys.exit(1)
    print(f"{args.check}: the rows of {', '.join(models)} match their runs")


if __name__ == "__main__":
    run_job(main)
