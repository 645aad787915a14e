"""Audit the data from the runs' feature stores: labels that look wrong, pictures of no class (outliers), exact and
near duplicates within and across splits, and what the leaked test and val images do to each run's accuracy.

    python jobs/audit.py --run RUN_DIR --data DATA_ROOT
    python jobs/audit.py --run RUN_A RUN_B --data DATA_ROOT          # several runs: their probabilities averaged
    python jobs/audit.py audit.near_duplicate_cosine=0.98 --run ...  # overrides before --run

Needs each run's feature store (jobs/extract.py), extracted from DATA_ROOT. Writes the first run's audit/:
label_issues.csv, outliers.csv, duplicates.csv (most suspicious first; path relative to DATA_ROOT, split,
given_label, suggested_label, score), suspects.png, config.yaml and summary.json. Each CSV can be a data.exclude
file, or moved out of the data with `python jobs/prepare.py --out DATA_ROOT --quarantine RUN_DIR/audit/duplicates.csv`.
"""
from catdog.audit import audit
from catdog.cli import config_from, parser, refuse_overrides_in, run_job, writable_dir
from catdog.run import RunDir


def _percent(value) -> str:
    return "-" if value is None else f"{value:.2%}"


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--run", nargs="+", required=True, help="run directories with feature stores of the same data")
    p.add_argument("--data", required=True, help="the data root the features were extracted from")
    args = p.parse_args()
    refuse_overrides_in(args.run, "--run")
    first = RunDir(writable_dir(args.run[0], "--run"))
    config = config_from(args, fallback=str(first.config_path))
    with first.writer("audit"):
        summary = audit(args.run, args.data, config)
    counts = summary["counts"]
    print(f"{summary['images']} images: {counts['label_issues']} label issues, {counts['outliers']} outliers listed, "
          f"{counts['exact_duplicates']} exact and {counts['near_duplicates']} near duplicate pairs "
          f"({counts['cross_split_duplicates']} across splits; leaked into test/val from train: {counts['leaked']})")
    for row in summary["leak_effect"]:
        print(f"  {row['run']} {row['split']}: {_percent(row['accuracy'])} on {row['images']} images, "
              f"{_percent(row['accuracy_without_leaked'])} without its {row['leaked']} leaked")
    print(f"-> {first.audit_dir}/{{label_issues,outliers,duplicates}}.csv, summary.json "
          f"({sum(summary['seconds'].values()):.0f} s)")


if __name__ == "__main__":
    run_job(main)
