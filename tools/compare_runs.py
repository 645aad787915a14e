"""A markdown table comparing trained runs: what each changed from a reference config, its accuracies, its time.

    python tools/compare_runs.py --reference configs/seed_recipe/efficientnet_lite0.yaml RUN...

"Changes" lists the config keys (``section.key=value``) where a run's resolved config.yaml differs from the
reference (the keys training resolves from the model, such as ``data.mean``, are left out).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from catdog.config import load_config  # noqa: E402
from catdog.run import RunDir  # noqa: E402

RESOLVED_AT_TRAINING = {"data.image_size", "data.interpolation", "data.mean", "data.std"}


def changes(config: dict, reference: dict) -> list[str]:
    found = []
    for section, values in config.items():
        if section not in ("model", "data", "optim", "train"):
            continue
        for key, value in values.items():
            name = f"{section}.{key}"
            if name not in RESOLVED_AT_TRAINING and reference[section].get(key) != value:
                found.append(f"{name}={value}")
    return found


def row(path: Path, reference: dict) -> str:
    run = RunDir(path)
    summary, records = run.summary(), run.metrics()
    best = next(r for r in records if r["epoch"] == summary["best_epoch"])
    tta = summary.get("tta_hflip", False)
    test_plain = best.get("test_accuracy_no_tta", best["test_accuracy"])
    val_plain = summary.get("val_accuracy_no_tta", summary["val_accuracy"])
    cells = [path.name, " ".join(changes(run.config().model_dump(mode="json"), reference)) or "(reference)",
             f"{test_plain:.2%}", f"{val_plain:.2%}",
             f"{summary['best_test_accuracy']:.2%}" if tta else "-", f"{summary['val_accuracy']:.2%}" if tta else "-",
             str(summary["best_epoch"]), f"{summary['train_seconds'] / 60:.1f}", f"{summary['images_per_second']:.1f}",
             f"{summary['linear_probe_test_accuracy']:.2%} / {summary['linear_probe_val_accuracy']:.2%}"
             if "linear_probe_val_accuracy" in summary else "-"]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", required=True, help="the config the changes are measured from")
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    reference = load_config(args.reference).model_dump(mode="json")
    print("| run | changes from the reference | test | val | test, hflip TTA | val, hflip TTA | best epoch | "
          "training min | train images/s | linear probe test / val |")
    print("|" + " --- |" * 10)
    for path in args.runs:
        if RunDir(path).summary_path.is_file():
            print(row(path, reference))


if __name__ == "__main__":
    main()
