"""Fit a random forest on the run's train features and rank the features, globally and per class.

    python jobs/forest.py --run RUN_DIR                          # forest.backend=auto|sklearn|cuml
    python jobs/forest.py --run RUN_DIR forest.n_estimators=300

Reads RUN_DIR/features/ (jobs/extract.py); writes RUN_DIR/forest/{summary.json, importances.npy,
ranking.csv, ranking_per_class.csv, config.yaml}.
"""
from catdog.cli import config_from, parser, run_job
from catdog.forest import run_forest
from catdog.run import RunDir


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--run", required=True, help="run directory with an extracted feature store")
    args = p.parse_args()
    run_forest(config_from(args, fallback=str(RunDir(args.run).config_path)), args.run)


if __name__ == "__main__":
    run_job(main)
