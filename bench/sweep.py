"""Sweep speed: the seed's serial loop against catdog's Ray Tune sweep, on the same cells, in one run.

    python bench/sweep.py --run RUN_DIR [--address HEAD:6379] [sweep.ks=[10,100,all]]

Both sides fit the same estimators, with the same parameters and seeds (the run's ``sweep`` config), on the
same features in the same forest-ranking order, so their accuracies must be identical. The serial loop runs
in this process, cell after cell; a random forest uses scikit-learn's default ``n_jobs=None`` (one core) on
both sides, unless the config sets ``n_jobs``. Ray runs one cell per CPU, and its workers have
OMP_NUM_THREADS=1, while the serial loop's BLAS (logistic regression) may use every core. Ray's start-up and
a warm-up (a task per CPU, so every worker has imported scikit-learn, as on a long-lived cluster) are
timed apart and left out of the ratio; putting the features into the object store is included, and so is
Tune's own overhead (a trial actor per cell, experiment bookkeeping). Tune's experiment goes to a temporary
folder: writes nothing into the run directory.
"""
import tempfile
import time

import ray
from sklearn.base import clone
from sklearn.metrics import accuracy_score

from catdog.cli import config_from, parser, run_job
from catdog.cluster import ray_session
from catdog.ranking import read_ranking
from catdog.run import RunDir
from catdog.store import FeatureStore
from catdog.sweep import build_estimator, load_split_data, run_tune, sweep_cells


@ray.remote(num_cpus=1)
def warm_up() -> None:
    """Import what a cell needs; the pause keeps this worker busy so that each warm-up lands on its own worker."""
    import catdog.sweep  # noqa: F401  (the import is the warm-up)

    time.sleep(2)


def seed_loop(data, order, ks, estimators) -> dict:
    """The seed's way: for each k, for each classifier, fit and score, one after the other."""
    (x_train, y_train), (x_test, y_test), (x_val, y_val) = data["train"], data["test"], data["val"]
    results = {}
    for k in ks:
        columns = order if k == "all" else order[:k]
        for name, estimator in estimators.items():
            model = clone(estimator).fit(x_train[:, columns], y_train)
            results[(str(k), name)] = (accuracy_score(y_test, model.predict(x_test[:, columns])),
                                       accuracy_score(y_val, model.predict(x_val[:, columns])))
    return results


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--run", required=True, help="run directory with features/ and forest/")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else start a local Ray)")
    args = p.parse_args()
    run = RunDir(args.run)
    config = config_from(args, fallback=str(run.config_path))
    store = FeatureStore(run.features_dir)
    data = load_split_data(store)
    order = read_ranking(run, config.sweep.ranking, store.feature_dim)
    estimators = {cell.classifier: build_estimator(cell.spec) for cell in sweep_cells(config.sweep, store.feature_dim)}
    cells = sweep_cells(config.sweep, store.feature_dim)
    print(f"{len(cells)} cells: k in {config.sweep.ks} x {list(estimators)}; train/test/val "
          f"{len(data['train'][1])}/{len(data['test'][1])}/{len(data['val'][1])} rows, {store.feature_dim} features")
    for name, estimator in estimators.items():
        print(f"  {name}: {estimator!r} (n_jobs={getattr(estimator, 'n_jobs', 'n/a')})")

    start = time.perf_counter()
    serial = seed_loop(data, order, config.sweep.ks, estimators)
    serial_seconds = time.perf_counter() - start

    start = time.perf_counter()
    with ray_session(args.address):
        startup_seconds = time.perf_counter() - start
        cpus = int(ray.cluster_resources().get("CPU", 0))
        start = time.perf_counter()
        ray.get([warm_up.remote() for _ in range(cpus)])
        warm_up_seconds = time.perf_counter() - start
        start = time.perf_counter()
        finished: dict = {}
        with tempfile.TemporaryDirectory() as scratch:
            run_tune(RunDir(scratch), data, order, cells, cells, config.sweep.max_retries, finished, lambda: None)
        parallel = {(row["k"], row["classifier"]): (float(row["test_accuracy"]), float(row["val_accuracy"]))
                    for row in finished.values()}
        ray_seconds = time.perf_counter() - start

    print(f"\n{'k':>6} {'classifier':>10} {'serial test':>12} {'ray test':>9} {'serial val':>11} {'ray val':>8}")
    for key, (test, val) in serial.items():
        print(f"{key[0]:>6} {key[1]:>10} {100 * test:>11.2f}% {100 * parallel[key][0]:>8.2f}% "
              f"{100 * val:>10.2f}% {100 * parallel[key][1]:>7.2f}%")
    identical = serial == parallel
    print(f"\nidentical accuracies: {'yes' if identical else 'NO'}")
    print(f"serial loop: {serial_seconds:.1f} s   Ray sweep: {ray_seconds:.1f} s on {cpus} CPU(s) "
          f"(+ {startup_seconds:.1f} s Ray start-up and {warm_up_seconds:.1f} s warm-up, not counted)")
    print(f"speed-up serial / Ray: {serial_seconds / ray_seconds:.2f}x")
    if not identical:
        raise SystemExit("accuracies differ between the serial loop and the Ray sweep")


if __name__ == "__main__":
    run_job(main)
