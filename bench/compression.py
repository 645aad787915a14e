"""The spatial maps' filters on real maps: for each ``extract.compression`` (``catdog.store.COMPRESSION``), the time
``ShardWriter`` takes to write a batch of rows, the time to read them back and the shard's size, from the maps of a
store that extraction wrote. The writer's time is the main process's, between two forward passes.

    python bench/compression.py --store RUN/features [--rows 640] [--batch 64]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from catdog.cli import run_job
from catdog.devices import keep_freed_memory
from catdog.store import COMPRESSION, FeatureStore, ShardWriter


def write_and_read(maps: np.ndarray, compression: str | None, batch: int, folder: Path) -> tuple[float, float, int]:
    """Seconds writing ``maps`` batch by batch (``close`` included), seconds reading them back, bytes on disk."""
    rows = len(maps)
    path = folder / f"{compression}.h5"
    features, labels = np.zeros((rows, 1), np.float32), np.zeros(rows, np.int64)
    names = [f"{i}.jpg" for i in range(rows)]
    writer = ShardWriter(path, rows, 1, maps.shape[1:], {}, compression)
    start = time.perf_counter()
    for first in range(0, rows, batch):
        part = slice(first, first + batch)
        writer.write(features[part], labels[part], np.arange(rows)[part], names[part], maps[part])
    _, size = writer.close()
    written = time.perf_counter() - start
    start = time.perf_counter()
    with h5py.File(path, "r") as f:
        back = f["spatial"][:]
    read = time.perf_counter() - start
    if not np.array_equal(back, maps):
        raise AssertionError(f"{compression}: the maps read back differ")
    return written, read, size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True, help="a feature store with spatial maps (RUN/features)")
    p.add_argument("--rows", type=int, default=640, help="rows of the first split's first shards")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3, help="best of this many")
    args = p.parse_args()
    keep_freed_memory()  # as extraction runs on the CPU
    store = FeatureStore(args.store)
    split = store.splits[0]
    maps = store.spatial(split, np.arange(min(args.rows, store.num_rows(split))))
    print(f"{len(maps)} maps {tuple(maps.shape[1:])} float16 of {args.store} ({split}), {np.mean(maps == 0):.0%} "
          f"zeros; batches of {args.batch}, best of {args.repeat}")
    batches = len(maps) / args.batch
    with tempfile.TemporaryDirectory() as tmp:
        for name in COMPRESSION:
            runs = [write_and_read(maps, name, args.batch, Path(tmp)) for _ in range(args.repeat)]
            written, read, size = min(r[0] for r in runs), min(r[1] for r in runs), runs[0][2]
            print(f"{str(name):5s}: write {written / batches * 1000:5.1f} ms a batch, "
                  f"read {read / batches * 1000:5.1f} ms a batch, {size / maps.nbytes:6.1%} of the raw maps")


if __name__ == "__main__":
    run_job(main)
