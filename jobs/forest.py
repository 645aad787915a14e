"""Fit a random forest on the run's train features and rank the features, globally and per class.

    python jobs/forest.py --run RUN_DIR                          # forest.backend=auto|sklearn|cuml
    python jobs/forest.py --run RUN_DIR forest.n_estimators=300
    python jobs/forest.py --run RUN_DIR --verify                 # check every shard's checksum first

Reads RUN_DIR/features/ (jobs/extract.py); writes RUN_DIR/forest/{summary.json, importances.npy,
ranking.csv, ranking_per_class.csv, config.yaml}.
"""
from catdog.cli import config_from, parser, run_job, writable_dir
from catdog.forest import run_forest
from catdog.run import RunDir


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--run", required=True, help="run directory with an extracted feature store")
    p.add_argument("--verify", action="store_true", help="check each shard's sha256, not only its size and header")
    args = p.parse_args()
    run = RunDir(writable_dir(args.run, "--run"))
    config = config_from(args, fallback=str(run.config_path))
    with run.writer("forest"):
        run_forest(config, run.path, verify=args.verify)


if __name__ == "__main__":
    run_job(main)
