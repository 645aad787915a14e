"""Sweep speed: the seed's serial loop against catdog's Ray Tune sweep, on the same cells, in one run; and the
sweep's peak memory at two numbers of images.

    python bench/sweep.py --run RUN_DIR [--address HEAD:6379] [sweep.ks=[10,100,all]]
    python bench/sweep.py --memory 4000 32000 [--dim 1280] [--catdog OTHER_CHECKOUT] [sweep.max_train_rows=4000]

Both sides fit the same estimators, with the same parameters and seeds (the run's ``sweep`` config), on the
same features in the same forest-ranking order, so their accuracies must be identical. The serial loop runs
in this process, cell after cell; a random forest uses scikit-learn's default ``n_jobs=None`` (one core) on
both sides, unless the config sets ``n_jobs``. Ray runs one cell per CPU, and its workers have
OMP_NUM_THREADS=1, while the serial loop's BLAS (logistic regression) may use every core. Ray's start-up and
a warm-up (a task per CPU, so every worker has imported scikit-learn, as on a long-lived cluster) are
timed apart and left out of the ratio; putting the features into the object store is included, and so is
Tune's own overhead (a trial actor per cell, experiment bookkeeping). Tune's experiment goes to a temporary
folder: writes nothing into the run directory. Both sides use the sweep's rows (``sweep.max_train_rows``,
``sweep.max_eval_rows``: all of them when they fit).

``--memory N1 N2``: a synthetic store per N (``tests/synthetic_store.py``: N train, N/8 test and N/8 val images of
``--dim`` features, the first feature informative) with a ranking, in a temporary folder; jobs/sweep.py's
``run_sweep`` on each, in a fresh process with its own local Ray (``RAY_TMPDIR`` private: never another
engineer's cluster), ``--catdog DIR`` puts DIR first on its ``PYTHONPATH`` (another checkout: the code before a
change). Meanwhile the memory of that process and all its descendants (Ray's GCS, raylet, workers) is sampled
every 50 ms: the peak of the sum of their resident sets (shared memory, Ray's object store included, counted once
per process that maps it) and of their proportional sets (PSS: shared pages split between the processes that map
them), the driver's peak and the seconds. Prints each, and both peaks extrapolated linearly to 1M images.
"""
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import ray
from sklearn.base import clone
from sklearn.metrics import accuracy_score

from process_tree import sample_tree

from catdog.cli import config_from, parser, run_job
from catdog.cluster import ray_session
from catdog.ranking import read_ranking
from catdog.run import RunDir
from catdog.store import FeatureStore
from catdog.sweep import build_estimator, load_split_data, run_tune, sample_rows, sweep_cells

REPO = Path(__file__).resolve().parents[1]
MEMORY_SWEEP = ["sweep.ks=[10, 100, all]",
                "sweep.classifiers={rf: {estimator: RandomForestClassifier, params: {n_estimators: 10, max_depth: 6, "
                "random_state: 0}}, lr: {estimator: LogisticRegression, params: {max_iter: 50}}}"]
"""The memory runs' cells (small fits: the data, not the fitting, is what is measured); overrides come after."""
CHILD = ("import sys, time, catdog; from catdog.config import load_config; from catdog.sweep import run_sweep; "
         "start = time.perf_counter(); run_sweep(sys.argv[1], load_config(None, sys.argv[2:])); "
         "print(time.perf_counter() - start, catdog.__file__)")
"""The measured process: run_sweep with a config from overrides alone (code from before a change may not know
every key of today's config.yaml)."""


@ray.remote(num_cpus=1)
def warm_up() -> None:
    """Import what a cell needs; the pause keeps this worker busy so that each warm-up lands on its own worker."""
    import catdog.sweep  # noqa: F401  (the import is the warm-up)

    time.sleep(2)


def seed_loop(data, ks, estimators) -> dict:
    """The seed's way: for each k, for each classifier, fit and score, one after the other (``data``'s columns
    are in ranking order)."""
    (x_train, y_train), (x_test, y_test), (x_val, y_val) = data["train"], data["test"], data["val"]
    results = {}
    for k in ks:
        columns = slice(None) if k == "all" else slice(0, k)
        for name, estimator in estimators.items():
            model = clone(estimator).fit(x_train[:, columns], y_train)
            results[(str(k), name)] = (accuracy_score(y_test, model.predict(x_test[:, columns])),
                                       accuracy_score(y_val, model.predict(x_val[:, columns])))
    return results


BUILD = """
import sys
from pathlib import Path

import numpy as np
from synthetic_store import write_rankings, write_store

folder, rows, dim = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
splits = {}
for split, n in {"train": rows, "test": rows // 8, "val": rows // 8}.items():
    labels = np.arange(n) % 2
    features = rng.random((n, dim), dtype=np.float32)
    features[:, 0] += labels
    splits[split] = {"features": features, "labels": labels,
                     "paths": np.array([f"{split}/{i}.jpg" for i in range(n)], dtype=object)}
write_store(folder / "features", splits, ["cat", "dog"], shard_size=1000)
write_rankings(folder / "forest", list(range(dim)), {"cat": list(range(dim)), "dog": list(range(dim))[::-1]})
"""
"""A run directory with a synthetic store (N train, N/8 test and val rows, the first feature informative) and a
ranking, written by the measured checkout's own ``tests/synthetic_store.py`` (its store format)."""


def synthetic_run(folder: Path, rows: int, dim: int, env: dict, checkout: Path) -> Path:
    subprocess.run([sys.executable, "-c", BUILD, str(folder), str(rows), str(dim)], check=True, cwd=folder,
                   env={**env, "PYTHONPATH": os.pathsep.join([str(checkout / "tests"), env["PYTHONPATH"]])})
    return folder


def measure_memory(rows: int, dim: int, catdog: str | None, overrides: list[str]) -> dict:
    """run_sweep on a synthetic run of ``rows`` train images in a fresh process (its own local Ray), its process
    tree sampled."""
    checkout = Path(catdog or REPO)
    with tempfile.TemporaryDirectory(prefix="rt", dir="/tmp") as ray_tmp, \
            tempfile.TemporaryDirectory(prefix="sweep-mem-") as tmp:  # ray_tmp short: Ray's socket paths live under it
        env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(checkout), os.environ.get("PYTHONPATH")]))}
        run = synthetic_run(Path(tmp), rows, dim, env, checkout)
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(run), *MEMORY_SWEEP, *overrides], env=env,
                                 cwd=run, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)  # cwd: python -c puts it first on sys.path
        stop, peaks = threading.Event(), {}
        sampler = threading.Thread(target=sample_tree, args=(child.pid, stop, peaks))
        sampler.start()
        out, err = child.communicate()
        stop.set()
        sampler.join()
    if child.returncode != 0:
        raise SystemExit(f"the sweep failed:\n{err[-3000:]}")
    seconds, module = out.strip().splitlines()[-1].split(" ", 1)
    return {**peaks, "seconds": float(seconds), "catdog": module}


def memory(sizes: list[int], dim: int, catdog: str | None, overrides: list[str]) -> None:
    results = []
    for rows in sizes:
        results.append((rows, measure_memory(rows, dim, catdog, overrides)))
    print(f"catdog: {results[0][1]['catdog']}; cells: {MEMORY_SWEEP + overrides}")
    print(f"{'train images':>12} {'all images':>10} {'seconds':>8} {'ms/image':>8} {'driver peak MB':>14} "
          f"{'tree RSS peak MB':>16} {'tree PSS peak MB':>16}")
    for rows, r in results:
        images = rows + 2 * (rows // 8)
        print(f"{rows:>12} {images:>10} {r['seconds']:>8.1f} {1000 * r['seconds'] / images:>8.2f} "
              f"{r['driver']:>14.0f} {r['rss']:>16.0f} {r['pss']:>16.0f}")
    (n1, r1), (n2, r2) = results[0], results[-1]
    for key, name in (("rss", "RSS"), ("pss", "PSS")):
        at_1m = r2[key] + max(0.0, (r2[key] - r1[key]) / (n2 - n1)) * (1_000_000 - n2)  # a falling peak: flat
        print(f"tree {name} peak extrapolated linearly to 1,000,000 train images: {at_1m / 1024:.1f} GB")


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--run", help="run directory with features/ and forest/")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else start a local Ray)")
    p.add_argument("--memory", type=int, nargs=2, metavar="N", help="measure peak memory at N1 and N2 train images")
    p.add_argument("--dim", type=int, default=1280, help="--memory: features per image")
    p.add_argument("--catdog", help="--memory: a checkout whose catdog package the sweep runs (the code before)")
    args = p.parse_args()
    if args.memory:
        memory(args.memory, args.dim, args.catdog and str(Path(args.catdog).resolve()), args.overrides)
        return
    if not args.run:
        p.error("give --run RUN_DIR (the speed comparison) or --memory N1 N2")
    run = RunDir(args.run)
    config = config_from(args, fallback=str(run.config_path))
    store = FeatureStore(run.features_dir)
    order = read_ranking(run, config.sweep.ranking, store.feature_dim)
    cells = sweep_cells(config.sweep, store.feature_dim)
    data = load_split_data(store, sample_rows(store, config.sweep), order[:max(cell.n_features for cell in cells)])
    estimators = {cell.classifier: build_estimator(cell.spec) for cell in cells}
    print(f"{len(cells)} cells: k in {config.sweep.ks} x {list(estimators)}; train/test/val "
          f"{len(data['train'][1])}/{len(data['test'][1])}/{len(data['val'][1])} rows, {store.feature_dim} features")
    for name, estimator in estimators.items():
        print(f"  {name}: {estimator!r} (n_jobs={getattr(estimator, 'n_jobs', 'n/a')})")

    start = time.perf_counter()
    serial = seed_loop(data, config.sweep.ks, estimators)
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
            run_tune(RunDir(scratch), data, cells, cells, config.sweep.max_retries, finished, lambda: None)
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
