"""Compare runs trained on the same data, pair by pair: accuracy and cost, where their val predictions disagree
(McNemar), how their Grad-CAM maps differ (area, entropy, pointing game; Spearman and top-region IoU between them)
and how alike their features are (linear CKA against a shuffled baseline; a logistic regression on both).

    python jobs/compare.py --runs RUN_A RUN_B [RUN ...] --data DATA_ROOT --out OUT_DIR
    python jobs/compare.py compare.top_fraction=0.1 --runs ...        # overrides before --runs

Needs each run's feature store (jobs/extract.py) and OUT_DIR/gradcam from
`python jobs/gradcam.py --runs RUN_A RUN_B ... --data DATA_ROOT --out OUT_DIR`. Writes OUT_DIR/compare/summary.json,
config.yaml, cam_style.png and a disagreement montage per pair; a rerun reuses what is finished (compare/parts/).
The compare section comes from --config (default: the first run's config.yaml) plus overrides.
"""
from pathlib import Path

from catdog.cli import parse_runs_into_out, parser, run_job
from catdog.compare import compare, stage_dir


def _percent(value) -> str:
    return "-" if value is None else f"{value:.2%}"


def print_summary(summary: dict, stage: Path) -> None:
    """The accuracy and cost table, then per pair its sentence, predictions, CKA and logistic regressions."""
    header = ["run", "model", "test", "val", "probe test", "probe val", "train s", "img/s", "parameters",
              "trainable", "size"]
    rows = [[run["name"], run["model"], _percent(run["test_accuracy"]), _percent(run["val_accuracy"]),
             _percent(run["linear_probe_test_accuracy"]), _percent(run["linear_probe_val_accuracy"]),
             f"{run['train_seconds']:.0f}", f"{run['images_per_second']:.1f}", f"{run['parameters']:,}",
             f"{run['trainable_parameters']:,}", str(run["image_size"])] for run in summary["runs"]]
    widths = [max(len(row[c]) for row in [header] + rows) for c in range(len(header))]
    for row in [header] + rows:
        print("  ".join(cell.ljust(w) if c < 2 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths))))
    print(f"\n{summary['method']} maps of the same {summary['runs'][0]['cam_style']['images']} val images "
          "(medians over the images):")
    for run in summary["runs"]:
        style = run["cam_style"]
        pointing = style["pointing_game"]
        print(f"  {run['name']}: {style['area_above_half_max']['median']:.0%} of the map >= half its maximum, "
              f"entropy {style['entropy']['median']:.2f}; pointing game "
              + (f"{pointing['accuracy']:.0%} ({pointing['hits']}/{pointing['images']})" if pointing else "-")
              + (f" ({style['pointing_game_note']})" if style["pointing_game_note"] else ""))
    for pair in summary["pairs"]:
        counts, features = pair["disagreement"], pair["features"]
        regression, shuffled = features["logistic_regression"], features["cka_shuffled"]
        print(f"\n{pair['a']} vs {pair['b']} (training time ratio {pair['train_time_ratio']:.2f}):")
        print(f"  {pair['sentence']}")
        print(f"  val predictions ({counts['images']} images): both right {counts['both_right']}, only {pair['a']} "
              f"right {counts['a_only_right']}, only {pair['b']} right {counts['b_only_right']}, both wrong "
              f"{counts['both_wrong']}; McNemar p = {counts['mcnemar_p']:.3g}"
              + (f" -> {stage / counts['montage']}" if counts["montage"] else ""))
        print(f"  features: linear CKA {features['cka']:.3f} vs {shuffled['mean']:.3f} +- {shuffled['std']:.3f} with "
              f"one model's rows shuffled ({shuffled['shuffles']} shuffles); logistic regression (val) "
              f"{pair['a']} {regression['a']:.2%}, {pair['b']} {regression['b']:.2%}, both "
              f"{regression['concatenated']:.2%}")
    print(f"\n-> {stage / 'summary.json'}, {stage / summary['cam_style_plot']}")


def main() -> None:
    args, config = parse_runs_into_out(
        parser(__doc__), runs="two or more run directories written by jobs/train.py",
        data="the data root the runs were trained on",
        out="folder holding gradcam/ (jobs/gradcam.py); compare/ is written there")
    summary = compare(args.runs, args.data, args.out, config)
    print_summary(summary, stage_dir(args.out))


if __name__ == "__main__":
    run_job(main)
