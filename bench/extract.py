"""Extraction speed, in one run on the same images and model: catdog's extraction (jobs/extract.py's code,
writing shards with spatial maps) against the seed's loop and against the network's forward pass alone.

    python bench/extract.py --run RUN_DIR --data DATA_ROOT [--limit N] [--repeat R] [section.key=value ...]

Seed loop: torchvision ImageFolder with the same eval transform, batch 32, num_workers=0, fp32, no
channels_last, features appended to a Python list. Forward only: ``net.spatial`` + ``net.pool`` on tensors
decoded beforehand, with catdog's batch size, memory format, BatchNorm folding and precision. Each is
measured ``--repeat`` times in alternating order and the best kept, which damps other load on the machine; each
time in a new process, as a job runs, with catdog's allocator settings (``keep_freed_memory``) for all three.
Goals on a 2-core CPU: catdog / seed >= 2, catdog / forward only >= 0.8 (decoding is not the bottleneck).

It also prints the CPU seconds of the forward pass alone and of catdog's extraction (its main process and its decode
workers): where the forward pass alone keeps every core busy, their quotient bounds catdog / forward only, however
the work is scheduled.
"""
from __future__ import annotations

import multiprocessing
import os
import resource
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from catdog.cli import config_from, parser, run_job
from catdog.data import build_transform, find_classes, list_samples, load_rgb
from catdog.devices import AUTOCAST_DTYPES, keep_freed_memory, resolve_mixed_precision
from catdog.extract import decode_workers, extract
from catdog.models import fold_batchnorm
from catdog.run import RunDir
from catdog.store import FeatureStore


def chosen_images(data_root: Path, limit: int) -> list[Path]:
    """``limit`` train images spread evenly over the split (so every class is in)."""
    samples = list_samples(data_root, "train", find_classes(data_root, ("train",)))
    picks = np.unique(np.linspace(0, len(samples) - 1, min(limit, len(samples))).astype(int))
    return [samples[i].path for i in picks]


def decoded_smaller(path: Path, size: int) -> bool:
    """Whether ``load_rgb`` decodes this JPEG at a reduced scale (PIL draft mode)."""
    with Image.open(path) as image:
        return load_rgb(path, size).size != image.size


def link_images(images: list[Path], data_root: Path, out: Path) -> Path:
    """A data root of links to the chosen images, laid out as ``out/train/<class>/<file>``."""
    for image in images:
        link = out / image.relative_to(data_root)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(image.resolve())
    return out


def link_run(run: RunDir, out: Path) -> Path:
    out.mkdir(parents=True)
    for path in (run.config_path, run.summary_path, run.best_checkpoint):
        (out / path.name).symlink_to(path.resolve())
    return out


def warm_network(run_path: Path, image_size: int):
    """The run's network after one small forward pass (the seed's loop and the forward pass alone start from this)."""
    network = RunDir(run_path).load_model()[0]
    with torch.no_grad():
        network.pool(network.spatial(torch.zeros(2, 3, image_size, image_size)))
    return network


def seed_loop(run_path: Path, data_root: Path, config) -> tuple[np.ndarray, float]:
    """The seed's extraction: ImageFolder, batch 32, no workers, fp32, a Python list of feature batches."""
    network = warm_network(run_path, config.data.image_size)
    dataset = ImageFolder(str(data_root / "train"), transform=build_transform(config.data, train=False))
    loader = DataLoader(dataset, batch_size=32, shuffle=False, num_workers=0)
    start = time.perf_counter()
    features = []
    with torch.no_grad():
        for images, _ in loader:
            features.append(network.pool(network.spatial(images)).numpy())
    return np.concatenate(features), time.perf_counter() - start


def forward_only(run_path: Path, images: list[Path], config, precision: str) -> tuple[float, float]:
    """Wall and CPU seconds for ``spatial`` + ``pool`` over tensors decoded beforehand, with catdog's settings."""
    cfg, image_size = config.extract, config.data.image_size
    network, transform = warm_network(run_path, image_size), build_transform(config.data, train=False)
    tensors = torch.stack([transform(load_rgb(path, image_size)) for path in images])
    if cfg.fold_batchnorm:
        network, _ = fold_batchnorm(network, tensors[:2])
    if cfg.channels_last:
        network = network.to(memory_format=torch.channels_last)
        tensors = tensors.contiguous(memory_format=torch.channels_last)
    batches = list(torch.split(tensors, cfg.batch_size))
    autocast = torch.autocast("cpu", dtype=AUTOCAST_DTYPES.get(precision), enabled=precision in AUTOCAST_DTYPES)
    start, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode(), autocast:
        for batch in batches:
            network.pool(network.spatial(batch))
    return time.perf_counter() - start, time.process_time() - cpu


def cpu_seconds() -> tuple[float, float]:
    """CPU seconds used so far by this process and by its children that have ended (DataLoader workers)."""
    mine, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return mine.ru_utime + mine.ru_stime, children.ru_utime + children.ru_stime


def catdog_extract(config, run_dir: Path, data_root: Path) -> dict:
    """jobs/extract.py's extraction: its wall seconds end to end and of the batch loop, the CPU seconds of this
    process and of its decode workers, and the features it stored."""
    start, (main, workers) = time.perf_counter(), cpu_seconds()
    result = extract(config, run_dir, data_root)  # its workers have ended when it returns
    end, (main_end, workers_end) = time.perf_counter(), cpu_seconds()
    features = FeatureStore(Path(run_dir) / "features").features("train")
    return {"seconds": end - start, "loop": result["seconds"], "main cpu": main_end - main,
            "workers cpu": workers_end - workers, "features": features}


def start_as_a_job(start_method: str) -> None:
    """A measuring process's state as a job's: the platform's way of starting processes (a spawned process would
    otherwise spawn its decode workers, each importing torch) and catdog's allocator settings."""
    multiprocessing.set_start_method(start_method, force=True)
    keep_freed_memory()


def in_fresh_process(function, *args):
    """``function(*args)`` in a new interpreter, as each job runs: a measurement after another in one process would
    inherit its heap, and extraction's forked decode workers then make the main process copy every page of it that
    it writes (about 1 CPU-s more for 2,000 images)."""
    spawn, default = multiprocessing.get_context("spawn"), multiprocessing.get_start_method()
    with ProcessPoolExecutor(1, mp_context=spawn, initializer=start_as_a_job, initargs=(default,)) as pool:
        return pool.submit(function, *args).result()


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--run", required=True, help="trained run directory")
    p.add_argument("--data", required=True, help="data root (its train split is sampled)")
    p.add_argument("--limit", type=int, default=512, help="number of train images to use")
    p.add_argument("--repeat", type=int, default=2, help="measure each this many times, keep the best")
    args = p.parse_args()
    run = RunDir(args.run)
    config = config_from(args, fallback=str(run.config_path))
    config.extract.splits = ["train"]
    config.extract.cpu = True
    data_root = Path(args.data)
    images = chosen_images(data_root, args.limit)
    precision = resolve_mixed_precision(config.extract.mixed_precision, on_cpu=True)
    reduced = [decoded_smaller(image, config.data.image_size) for image in images]
    cfg = config.extract
    print(f"{len(images)} train images, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores; catdog: "
          f"batch {cfg.batch_size}, {decode_workers(cfg.num_workers)} workers, precision {precision}, channels_last "
          f"{cfg.channels_last}, fold_batchnorm {cfg.fold_batchnorm}, spatial maps {cfg.spatial}; each measured in "
          "a process of its own")

    seconds: dict[str, list[float]] = {"seed loop": [], "catdog extract": [], "catdog batch loop": [],
                                       "forward only": []}
    cpu: dict[str, list[float]] = {"forward only": [], "catdog main": [], "catdog workers": []}
    with tempfile.TemporaryDirectory() as tmp:
        linked = link_images(images, data_root, Path(tmp) / "data")

        def measure_seed():
            features, taken = in_fresh_process(seed_loop, run.path, linked, config)
            seconds["seed loop"].append(taken)
            return features

        def measure_catdog(repeat: int):
            measured = in_fresh_process(catdog_extract, config, link_run(run, Path(tmp) / f"run{repeat}"), linked)
            seconds["catdog extract"].append(measured["seconds"])
            seconds["catdog batch loop"].append(measured["loop"])
            cpu["catdog main"].append(measured["main cpu"])
            cpu["catdog workers"].append(measured["workers cpu"])
            return measured["features"]

        def measure_forward():
            taken, used = in_fresh_process(forward_only, run.path, images, config, precision)
            seconds["forward only"].append(taken)
            cpu["forward only"].append(used)

        for repeat in range(args.repeat):
            if repeat % 2 == 0:
                seed_features, catdog_features = measure_seed(), measure_catdog(repeat)
                measure_forward()
            else:
                measure_forward()
                catdog_features, seed_features = measure_catdog(repeat), measure_seed()
    difference = np.abs(catdog_features - seed_features).max(axis=1)

    best = {name: min(taken) for name, taken in seconds.items()}
    print(f"\nbest of {args.repeat} run(s), in alternating order:")
    notes = {"catdog extract": " (end to end: model loading, listing, shards and manifest included)",
             "catdog batch loop": " (decode, forward, write: the part forward only is compared with)"}
    for name, taken in best.items():
        print(f"{name:17s}: {len(images) / taken:6.1f} images/s ({taken:.1f} s){notes.get(name, '')}")
    full = ~np.array(reduced)
    print(f"max |catdog - seed| feature difference: {difference[full].max():.1e} on the {full.sum()} images decoded "
          f"at full size, {difference[~full].max(initial=0):.2f} on the {(~full).sum()} that catdog.data.load_rgb "
          "decodes at reduced JPEG scale (draft mode, as in training)")
    print(f"catdog / seed loop    : {best['seed loop'] / best['catdog extract']:.2f}x end to end, "
          f"{best['seed loop'] / best['catdog batch loop']:.2f}x batch loop (goal >= 2)")
    print(f"catdog / forward only : {best['forward only'] / best['catdog extract']:.2f} end to end, "
          f"{best['forward only'] / best['catdog batch loop']:.2f} batch loop (goal >= 0.8)")
    least = {name: min(used) for name, used in cpu.items()}
    total, cores = least["catdog main"] + least["catdog workers"], len(os.sched_getaffinity(0))
    busy = least["forward only"] / best["forward only"]
    print(f"CPU seconds (least of {args.repeat}): forward only {least['forward only']:.1f} ({busy:.2f} cores busy); "
          f"catdog extract {least['catdog main']:.1f} main process + {least['catdog workers']:.1f} decode workers = "
          f"{total:.1f}. On {cores} cores catdog takes at least {total / cores:.1f} s, so catdog / forward only <= "
          f"{best['forward only'] * cores / total:.2f} end to end")


if __name__ == "__main__":
    run_job(main)
