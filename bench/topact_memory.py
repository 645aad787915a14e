"""Peak memory of the top-activation search on a store of N images against one of 2N, in one run.

    python bench/topact_memory.py --rows 20000 [--dim 1280] [--shard-size 1000]

Builds two synthetic feature stores (random pooled features, N and 2N train rows, no spatial maps) with
``ShardWriter`` in a temporary folder, then searches each (10 features, top 100 images, as jobs/topact.py
does) in a fresh process that starts its own local Ray, run under ``/usr/bin/time -v`` when present.
Meanwhile the resident memory of that process and all its descendants (Ray's GCS, raylet, workers) is
sampled every 50 ms. Prints per store: the driver's peak RSS, the largest single process's peak and the
peak of the whole process tree (shared memory counted once per process that maps it). For contrast, the
same search done the brute-force way (all features in memory, one argsort) is measured too.
"""
import argparse
import hashlib
import json
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from process_tree import sample_tree

from catdog.cluster import ray_session
from catdog.store import FeatureStore, ShardInfo, ShardWriter, shard_name, write_manifest
from catdog.topact import search_top_activations

FEATURES, TOP = 10, 100


def build_store(folder: Path, rows: int, dim: int, shard_size: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    shards = []
    for index, first in enumerate(range(0, rows, shard_size)):
        count = min(shard_size, rows - first)
        path = folder / shard_name("train", index)
        with ShardWriter(path, count, dim, None, {"split": "train"}) as writer:
            writer.write(rng.random((count, dim), dtype=np.float32), rng.integers(0, 2, count),
                         np.arange(first, first + count), [f"train/x/{i}.jpg" for i in range(first, first + count)])
        shards.append(ShardInfo.of_file(path, "train", first, count))
    write_manifest(folder, {"classes": ["cat", "dog"], "feature_dim": dim, "spatial_shape": None,
                            "shard_size": shard_size, "image_size": 224}, shards)
    return folder


def measure(store_path: Path, method: str) -> None:
    """The search alone, in this process (the child side): ``ray`` (catdog's) or ``brute`` (argsort of everything)."""
    store = FeatureStore(store_path)
    feature_idx = np.linspace(0, store.feature_dim - 1, FEATURES).astype(np.int64)
    if method == "ray":
        with ray_session():  # its start-up is not timed
            start = time.perf_counter()
            rows = search_top_activations(store, "train", feature_idx, TOP)[0].rows
            seconds = time.perf_counter() - start
    else:
        start = time.perf_counter()
        rows = np.argsort(-store.features("train")[:, feature_idx], axis=0, kind="stable")[:TOP].T
        seconds = time.perf_counter() - start
    print(json.dumps({"rows": store.num_rows("train"), "shards": len(store.shards("train")),
                      "seconds": seconds,
                      "top_rows_sha256": hashlib.sha256(np.ascontiguousarray(rows, dtype=np.int64)).hexdigest(),
                      "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def run_measurement(store_path: Path, method: str) -> dict:
    command = [sys.executable, __file__, "--measure", str(store_path), "--method", method]
    if Path("/usr/bin/time").exists():
        command = ["/usr/bin/time", "-v", *command]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stop, peaks = threading.Event(), {}
    sampler = threading.Thread(target=sample_tree, args=(child.pid, stop, peaks))
    sampler.start()
    out, err = child.communicate()
    stop.set()
    sampler.join()
    if child.returncode != 0:
        raise SystemExit(f"measurement failed:\n{err}")
    result = json.loads(out.strip().splitlines()[-1])
    time_v = re.search(r"Maximum resident set size \(kbytes\): (\d+)", err)
    if time_v:
        result["time_v_max_rss_mb"] = int(time_v.group(1)) / 1024
    return {**result, **peaks}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=20000, help="N: the smaller store's train rows")
    p.add_argument("--dim", type=int, default=1280)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--measure", help=argparse.SUPPRESS)
    p.add_argument("--method", choices=["ray", "brute"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        measure(Path(args.measure), args.method)
        return
    with tempfile.TemporaryDirectory(prefix="topact-mem-") as tmp:
        results = []
        for rows in (args.rows, 2 * args.rows):
            store = build_store(Path(tmp) / f"store-{rows}", rows, args.dim, args.shard_size)
            size_mb = sum(f.stat().st_size for f in store.iterdir()) / 2**20
            results += [(method, rows, size_mb, run_measurement(store, method)) for method in ("ray", "brute")]
    print(f"{'search':>7} {'images':>8} {'store MB':>9} {'shards':>7} {'seconds':>8} {'driver peak MB':>15} "
          f"{'time -v max MB':>15} {'largest proc MB':>16} {'tree peak MB':>13}")
    for method, rows, size_mb, r in results:
        print(f"{method:>7} {rows:>8} {size_mb:>9.0f} {r['shards']:>7} {r['seconds']:>8.1f} "
              f"{r['driver_peak_rss_mb']:>15.0f} {r.get('time_v_max_rss_mb', float('nan')):>15.0f} "
              f"{r['largest']:>16.0f} {r['rss']:>13.0f}")
    same = all(ray_run["top_rows_sha256"] == brute_run["top_rows_sha256"]
               for (*_, ray_run), (*_, brute_run) in zip(results[::2], results[1::2]))
    print(f"Ray search and brute force find the same top-{TOP} rows of all {FEATURES} features: "
          f"{'yes' if same else 'NO'}")
    for method in ("ray", "brute"):
        small, large = (r for m, _, _, r in results if m == method)
        print(f"{method}: 2N / N peak memory: driver {large['driver_peak_rss_mb'] / small['driver_peak_rss_mb']:.2f}x, "
              f"largest process {large['largest'] / small['largest']:.2f}x, "
              f"process tree {large['rss'] / small['rss']:.2f}x (store size 2.00x)")


if __name__ == "__main__":
    main()
