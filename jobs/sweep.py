"""Refit classifiers on the forest's top-k features: a Ray Tune experiment, one trial per (k, classifier,
hyperparameters) cell, resumable.

    python jobs/sweep.py --run RUN_DIR                        # a local Ray sized to this machine
    python jobs/sweep.py --run RUN_DIR --address HEAD:6379    # an existing cluster (or set RAY_ADDRESS)
    RAY_AUTH_MODE=token ray job submit --address http://HEAD:8265 -- python jobs/sweep.py --run RUN_DIR
    ray submit configs/ray-cluster.yaml jobs/sweep.py -- --run RUN_DIR
    python jobs/sweep.py --run RUN_DIR "sweep.classifiers={lr: {estimator: LogisticRegression,
        params: {max_iter: 1000, C: {grid_search: [0.01, 0.1, 1.0]}}}}"      # a hyperparameter axis

RUN_DIR/sweep/results.csv gets a row per cell as it finishes (with the node that ran it); Tune's experiment is
in RUN_DIR/sweep/tune/grid, and a rerun after a kill resumes it (Tuner.restore): finished trials are not run
again. Only this process reads RUN_DIR: the features reach the workers through Ray's object store.
"""
from catdog.cli import config_from, parser, run_job, writable_dir
from catdog.run import RunDir
from catdog.sweep import format_table, run_sweep


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--run", required=True, help="run directory with features/ and forest/")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else start a local Ray)")
    p.add_argument("--verify", action="store_true", help="check each shard's sha256, not only its size and header")
    args = p.parse_args()
    run = RunDir(writable_dir(args.run, "--run"))
    config = config_from(args, fallback=str(run.config_path))
    with run.writer("sweep"):
        rows = run_sweep(run.path, config, address=args.address, verify=args.verify)
    print(format_table(rows))
    print(f"wrote {run.sweep_results} and {run.sweep_plot}")


if __name__ == "__main__":
    run_job(main)
