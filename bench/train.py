"""Does the input pipeline starve the training step? In one run, on the same shared photos and the same model:

    python bench/train.py [--images 320] [--config configs/efficientnet_lite0.yaml] [--set data.num_workers=1 ...]
                          [--rounds 1] [--timm-train PATH/timm/train.py [--timm-images 640] [--timm-cache]
                          [--timm-precision no|bf16]]

(a) step alone: ``catdog.train.train_one_epoch`` (forward, loss, ``accelerator.backward``, optimizer, scheduler and
    weight-EMA step, logging) over batches decoded, augmented and put on the device beforehand, held in memory:
    the ceiling for (c).
(b) pipeline alone: the train DataLoader built exactly as ``catdog.train`` builds it (shuffled, the configured
    workers, persistent, prepared by Accelerate) iterated without a model, each batch finished by the dataset's
    ``batch_transform`` on the device: JPEG (decode, resize, flip, rotate, collate in the workers, then normalise
    on the device) and data.cache (memory-mapped uint8 read in the workers or in the main process, then flip,
    rotate and normalise on the device).
    Per core = images per CPU-second that the main process and its DataLoader workers spent (user + system, from
    /proc via psutil): the rate one fully busy core sustains, whatever the number of workers.
(c) training loop: ``catdog.train.train_one_epoch`` over the same loader, with the time the loop waited for its
    next batch (data wait) measured around the loader.
Then (c)/(a) per path: the share of the step's speed the real loop keeps (goal >= 0.95).

Settings come from the config (default: the shipped Lite0 one, bundled ImageNet weights, its frozen stages and
BatchNorm statistics, its weight EMA, its precision resolved as catdog resolves it; the network, optimizer and EMA
built by ``catdog.train``'s own functions) and ``--set section.key=value``. The photos are ``--images`` train
images spread over ../shared/data/cats_vs_dogs, linked into a temporary data root (never copied); the data.cache
file is built there once (its build rate is printed). Each pass is seeded as catdog seeds an epoch, so (b) and
(c) draw the same batches. The first pass over each loader (starting its persistent workers) is not timed.

``--timm-train`` also runs timm's own train.py (one epoch, in a subprocess) against catdog's loop (JPEG path; also
data.cache with ``--timm-cache``) in the same settings: random init, full fine-tune, BatchNorm on batch statistics,
no weight EMA, batch 32, fp32 (or both bf16 autocast: ``--timm-precision bf16``), channels-last, 2 workers, CPU,
Adam at 1e-4 (timm's default optimizer is SGD; the step costs about the same), each with its own default
augmentation (timm: RandomResizedCrop, flip, colour jitter; catdog: resize, flip, rotation), over
``--timm-images`` photos (``--skip-measure`` runs only this). timm's rate is parsed from its own per-step log lines
(``Time: <s>``, log interval 1); catdog's comes from the same per-step times, taken around its loader; both over
the epoch without its first step (worker start-up and the first batch's decoding), and with it in brackets.
catdog's jobs set glibc's allocator up on the CPU (``catdog.devices.keep_freed_memory``); timm's train.py runs as a
user would run it, and once more with the same settings given through glibc's environment variables, so the table
shows how much of a lead is the allocator's and how much the loop's.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

from catdog import models
from catdog import train as catdog_train
from catdog.cli import run_job
from catdog.config import load_config
from catdog.data import find_classes, loader_options
from catdog.splits import open_split
from catdog.devices import FREED_MEMORY_KEPT, accelerator_for
from catdog.errors import CatdogError
from extract import chosen_images, link_images  # bench/extract.py, beside this script (sys.path[0])

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cats_vs_dogs"
REPO = Path(__file__).resolve().parents[1]


def cpu_seconds() -> dict[int, float]:
    """CPU seconds (user + system) of this process and of each of its children (DataLoader workers), by pid."""
    me = psutil.Process()
    seconds = {}
    for process in [me, *me.children(recursive=True)]:
        try:
            times = process.cpu_times()
            seconds[process.pid] = times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return seconds


def cpu_split(before: dict[int, float], after: dict[int, float]) -> tuple[float, float]:
    """CPU seconds spent between two ``cpu_seconds`` readings by this process and by its children."""
    me = os.getpid()
    return after[me] - before[me], sum(after[pid] - before.get(pid, 0.0) for pid in after if pid != me)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TimedLoader:
    """A loader that records when the loop asks for each batch and when it gets it."""

    def __init__(self, loader):
        self.loader = loader
        self.asked: list[float] = []
        self.got: list[float] = []

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __iter__(self):
        batches = iter(self.loader)
        while True:
            self.asked.append(time.perf_counter())
            try:
                batch = next(batches)
            except StopIteration:
                return
            self.got.append(time.perf_counter())
            yield batch

    @property
    def wait(self) -> float:
        return sum(got - asked for asked, got in zip(self.asked, self.got))


class Bench:
    """The network, optimizer, scheduler and weight EMA as ``catdog.train`` builds them (prepared once), and the
    three measurements."""

    def __init__(self, config, classes: list[str], steps: int):
        self.config = config
        self.accelerator, self.precision = accelerator_for(config.train.mixed_precision, config.train.cpu,
                                                           config.train.cpu_threads)
        self.device = self.accelerator.device
        set_seed(config.train.seed)
        network = catdog_train.build_network(config, len(classes))
        optimizer = catdog_train.build_optimizer(config.optim, network)
        scheduler = catdog_train.build_scheduler(config.optim, optimizer, steps)
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(network, optimizer, scheduler)
        self.ema = catdog_train.build_ema(config, network)
        self.loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=config.optim.label_smoothing)
        self.trainable = sum(p.numel() for p in network.parameters() if p.requires_grad)
        self.total = sum(p.numel() for p in network.parameters())

    def loader(self, dataset, num_workers: int):
        """The train loader as ``catdog.train.build_loaders`` builds it."""
        loader = DataLoader(dataset, self.config.data.batch_size, shuffle=True,
                            **loader_options(num_workers, self.device))
        return self.accelerator.prepare(loader)

    def train_one_epoch(self, batches, batch_transform) -> dict:
        return catdog_train.train_one_epoch(self.model, batches, self.optimizer, self.scheduler, self.loss_fn,
                                            self.accelerator, 1, len(batches), self.config.train.channels_last,
                                            batch_transform, self.ema)

    def step_alone(self, batches: list) -> float:
        """(a): seconds for ``catdog.train.train_one_epoch`` over batches already on the device and augmented."""
        synchronize(self.device)
        seconds = self.train_one_epoch(batches, lambda images: images)["train_seconds"]
        synchronize(self.device)
        return seconds

    def pipeline_alone(self, loader, batch_transform) -> tuple[float, float, float, int]:
        """(b): seconds, CPU seconds of this process and of its workers, and images, for one seeded pass."""
        set_seed(self.config.train.seed + 1, device_specific=True)
        before, images_seen = cpu_seconds(), 0
        synchronize(self.device)
        start = time.perf_counter()
        for images, labels, _ in loader:
            images = batch_transform(images)
            images_seen += len(labels)
        synchronize(self.device)
        wall = time.perf_counter() - start
        return (wall, *cpu_split(before, cpu_seconds()), images_seen)

    def loop(self, loader, batch_transform) -> tuple[dict, TimedLoader]:
        """(c): ``catdog.train.train_one_epoch`` over the loader, seeded as epoch 1 of a run."""
        set_seed(self.config.train.seed + 1, device_specific=True)
        timed = TimedLoader(loader)
        return self.train_one_epoch(timed, batch_transform), timed


def ready_batches(dataset, batch_size: int, batch_transform, seed: int, device: torch.device) -> list:
    """Every batch of one seeded, shuffled pass, decoded, augmented and on the device now (for (a))."""
    set_seed(seed)
    loader = DataLoader(dataset, batch_size, shuffle=True, num_workers=min(2, os.cpu_count() or 1))
    return [(batch_transform(images.to(device)), labels.to(device), index) for images, labels, index in loader]


def steady_rate(timed: TimedLoader, batch_size_of: list[int]) -> float:
    """Images per second from the end of the first step (the loop asking for batch 2) to the end of the last one
    (the loop asking for one more)."""
    return sum(batch_size_of[1:]) / (timed.asked[-1] - timed.asked[1])


def measure(args, config, data_root: Path, cache_dir: Path) -> None:
    classes = find_classes(data_root, ("train",))
    cfg = config.data
    jpeg_set = open_split(data_root, "train", cfg, train=True, classes=classes)
    start = time.perf_counter()
    cache_set = open_split(data_root, "train", cfg.model_copy(update={"cache": True}), train=True, classes=classes,
                           cache_dir=cache_dir)
    build_seconds = time.perf_counter() - start
    steps = -(-len(jpeg_set) // cfg.batch_size)
    bench = Bench(config, classes, steps)
    print(f"{config.model.name} ({bench.trainable / 1e6:.2f}M of {bench.total / 1e6:.2f}M parameters trained, "
          f"freeze_stages {config.model.freeze_stages}, pretrained {config.model.pretrained}, BatchNorm statistics "
          f"{config.model.batchnorm_statistics}, weight EMA {config.train.ema_decay}), "
          f"{bench.device}, mixed precision {bench.precision}, channels_last {config.train.channels_last}, "
          f"batch {cfg.batch_size}, {cfg.image_size} px {cfg.interpolation}, hflip {cfg.hflip}, rotation "
          f"{cfg.rotation}; {len(jpeg_set)} photos, {steps} steps per pass; {torch.get_num_threads()} torch threads, "
          f"{os.cpu_count()} cores; data.num_workers {cfg.num_workers}; load average {os.getloadavg()[0]:.1f}")
    print(f"data.cache built in {build_seconds:.1f} s ({len(cache_set) / build_seconds:.0f} images/s with "
          f"{cfg.num_workers} worker(s), {(cache_dir / 'train.npy').stat().st_size / 2**20:.0f} MiB)")

    paths = {"jpeg": (jpeg_set, cfg.num_workers), "cache": (cache_set, cfg.num_workers)}
    if cfg.num_workers:
        paths["cache, 0 workers"] = (cache_set, 0)
    loaders = {name: bench.loader(dataset, workers) for name, (dataset, workers) in paths.items()}
    batches = ready_batches(jpeg_set, cfg.batch_size, jpeg_set.batch_transform, config.train.seed + 1, bench.device)
    bench.step_alone(batches[:2])  # warm-up (and Adam's state)
    for name, loader in loaders.items():
        bench.pipeline_alone(loader, paths[name][0].batch_transform)  # starts the workers, warms the page cache

    # rounds in alternating order, so that other load on the machine slows every measurement alike
    step: list[tuple[float, float]] = []
    pipeline: dict[str, list] = {name: [] for name in paths}
    loop: dict[str, list] = {name: [] for name in paths}
    order = ["step", *paths]
    for round_ in range(args.rounds):
        for name in order if round_ % 2 == 0 else order[::-1]:
            if name == "step":
                before = cpu_seconds()
                step.append((bench.step_alone(batches), cpu_split(before, cpu_seconds())[0]))
                continue
            transform = paths[name][0].batch_transform
            pipeline[name].append(bench.pipeline_alone(loaders[name], transform))
            before = cpu_seconds()
            record, timed = bench.loop(loaders[name], transform)
            loop[name].append((record, timed, cpu_split(before, cpu_seconds())))

    images = len(jpeg_set)
    step_seconds, step_cpu = min(step)
    step_rate = images / step_seconds
    print(f"\nbest of {args.rounds} round(s), over one pass of {images} photos; load average now "
          f"{os.getloadavg()[0]:.1f}")
    print(f"(a) step alone (ready tensors)     : {step_rate:6.1f} images/s ({step_seconds / steps * 1000:.0f} ms per "
          f"step; {step_cpu / images * 1000:.0f} CPU-ms per image); per round: "
          + ", ".join(f"{images / seconds:.1f}" for seconds, _ in step))
    for name, (dataset, workers) in paths.items():
        wall, main_cpu, worker_cpu, seen = min(pipeline[name])
        cpu = main_cpu + worker_cpu
        record, timed, (loop_main, loop_workers) = max(loop[name], key=lambda entry: entry[0]["images_per_second"])
        loop_rate, loop_seconds = record["images_per_second"], record["train_seconds"]
        print(f"[{name}: {workers} DataLoader worker(s)]")
        print(f"(b) pipeline alone                 : {seen / wall:6.1f} images/s, {seen / cpu:6.1f} images per "
              f"CPU-second (one busy core; main process + workers used {cpu / wall:.2f} cores; "
              f"{main_cpu / seen * 1000:.1f} CPU-ms per image in the main process, {worker_cpu / seen * 1000:.1f} "
              "in workers)")
        print(f"(c) training loop (train_one_epoch): {loop_rate:6.1f} images/s; "
              f"{(loop_main + loop_workers) / seen * 1000:.0f} CPU-ms per image ({loop_main / seen * 1000:.0f} main, "
              f"{loop_workers / seen * 1000:.0f} workers); waited "
              f"{timed.wait:.2f} s for batches ({timed.wait / loop_seconds:.0%} of {loop_seconds:.1f} s); per round: "
              + ", ".join(f"{entry[0]['images_per_second']:.1f}" for entry in loop[name]))
        print(f"(c)/(a)                            : {loop_rate / step_rate:6.2f}  (goal >= 0.95); by CPU time "
              f"(CPU-ms per image of (a) / of (c), less sensitive to other load on the machine): "
              f"{step_cpu * seen / images / (loop_main + loop_workers):.2f}")


def catdog_epoch(config, dataset, classes: list[str]) -> tuple[float, float, str]:
    """One epoch of catdog's loop from a fresh network: images/s without the first step, with it, and the
    precision it ran in."""
    steps = -(-len(dataset) // config.data.batch_size)
    bench = Bench(config, classes, steps)
    record, timed = bench.loop(bench.loader(dataset, config.data.num_workers), dataset.batch_transform)
    sizes = [min(config.data.batch_size, len(dataset) - start) for start in range(0, len(dataset),
                                                                                   config.data.batch_size)]
    return steady_rate(timed, sizes), record["images_per_second"], {"no": "fp32"}.get(bench.precision, bench.precision)


def timm_epoch(args, config, data_root: Path, classes: list[str], tmp: Path,
               freed_memory_kept: bool = False) -> tuple[float, float, str]:
    """One epoch of timm's train.py in a subprocess: images/s without the first step, and with it, from its log;
    with ``freed_memory_kept``, under glibc's environment variables for what ``keep_freed_memory`` sets."""
    command = [sys.executable, str(args.timm_train), "--data-dir", str(data_root), "--train-split", "train",
               "--val-split", "", "--model", models.timm_name(config.model.name), "--num-classes", str(len(classes)),
               "-b", "32", "-j", "2", "--epochs", "1", "--channels-last", "--device", "cpu", "--opt", "adam",
               "--lr", "1e-4", "--weight-decay", "0", "--seed", str(config.train.seed), "--log-interval", "1",
               "--output", str(tmp / "timm-out")]
    if args.timm_precision == "bf16":
        command += ["--amp", "--amp-dtype", "bfloat16"]
    print("$ " + shlex.join(command))
    env = {**os.environ, **({name: str(value) for name, value in FREED_MEMORY_KEPT.items()} if freed_memory_kept
                            else {})}
    finished = subprocess.run(command, cwd=tmp, capture_output=True, text=True, env=env)
    log = finished.stdout + finished.stderr
    if finished.returncode:
        print(log[-3000:])
        raise CatdogError(f"timm's train.py failed (exit code {finished.returncode}); its log's end is above")
    # "Train: 0 [  19/20 (100%)]  Loss: ...  Time: 1.234s,   25.93/s  (1.500s,   21.33/s)  ..."
    seconds = [float(value) for value in re.findall(r"Train: \d+ \[\s*\d+/\d+ .*?Time: ([\d.]+)s,", log)]
    if len(seconds) < 2:
        print(log[-3000:])
        raise CatdogError("could not find timm's per-step 'Time: <s>' log lines")
    images = len(list((data_root / "train").rglob("*.jpg")))
    return (images - 32) / sum(seconds[1:]), images / sum(seconds), "bf16" if "--amp" in command else "fp32"


TIMM_KEPT = "timm train.py, freed memory kept"


def timm_compare(args, data_root: Path, tmp: Path) -> None:
    """catdog's loop (JPEG path, and data.cache with ``--timm-cache``) against timm's train.py, one epoch each, in
    ``--rounds`` rounds of alternating order; the best epoch of each is kept."""
    overrides = [*args.set, "model.pretrained=none", "model.freeze_stages=0", "model.batchnorm_statistics=batch",
                 "train.ema_decay=null", "data.batch_size=32", f"train.mixed_precision={args.timm_precision}",
                 "train.channels_last=true", "data.num_workers=2"]
    config = load_config(args.config, overrides)
    config = config.model_copy(update={"data": models.data_config(config.model.name, config.data)})
    classes = find_classes(data_root, ("train",))
    datasets = {"catdog (JPEG)": open_split(data_root, "train", config.data, train=True, classes=classes)}
    if args.timm_cache:
        datasets["catdog (data.cache)"] = open_split(data_root, "train", config.data.model_copy(update={"cache": True}),
                                                     train=True, classes=classes, cache_dir=tmp / "timm-cache")
    timm_runs = {"timm train.py": False, TIMM_KEPT: True}
    runs: dict[str, list[tuple[float, float, str]]] = {name: [] for name in [*timm_runs, *datasets]}
    for round_ in range(args.rounds):
        for name in list(runs) if round_ % 2 == 0 else list(runs)[::-1]:
            runs[name].append(timm_epoch(args, config, data_root, classes, tmp, timm_runs[name]) if name in timm_runs
                              else catdog_epoch(config, datasets[name], classes))
    best = {name: max(rates) for name, rates in runs.items()}
    mean = {name: sum(rate for rate, _, _ in rates) / len(rates) for name, rates in runs.items()}
    timm_rate, timm_all, _ = best["timm train.py"]
    print(f"\none epoch of {len(datasets['catdog (JPEG)'])} photos, random init, full fine-tune, batch 32, "
          f"channels-last, 2 workers, CPU; images/s without the first step: best of {args.rounds} round(s) (with the "
          f"first step), mean, every round; load average now {os.getloadavg()[0]:.1f}")
    for name, rates in runs.items():
        steady, whole, precision = best[name]
        label = name + (" (its own per-step log)" if name in timm_runs else " (around its loader)")
        ratio = "" if name in timm_runs else (
            f";  catdog / timm: best {steady / timm_rate:.2f} ({whole / timm_all:.2f}), "
            f"mean {mean[name] / mean['timm train.py']:.2f}; / timm with freed memory kept: best "
            f"{steady / best[TIMM_KEPT][0]:.2f}, mean {mean[name] / mean[TIMM_KEPT]:.2f}")
        print(f"{label + ', ' + precision:62s}: {steady:5.1f} ({whole:.1f}), mean {mean[name]:5.1f}, every round "
              + ", ".join(f"{rate:.1f}" for rate, _, _ in rates) + ratio)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "efficientnet_lite0.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="section.key=value", help="config override")
    p.add_argument("--images", type=int, default=320, help="shared train photos to use (spread over the classes)")
    p.add_argument("--rounds", type=int, default=1, help="measure each this many times, keep the best")
    p.add_argument("--data", type=Path, default=SHARED, help="data root whose train split is sampled")
    p.add_argument("--timm-train", type=Path, help="timm's train.py: also compare catdog's loop with timm's")
    p.add_argument("--timm-images", type=int, default=640)
    p.add_argument("--timm-cache", action="store_true", help="also time catdog's loop on data.cache against timm")
    p.add_argument("--timm-precision", choices=["no", "bf16"], default="no",
                   help="both in fp32 (no) or both with bf16 autocast (timm: --amp --amp-dtype bfloat16)")
    p.add_argument("--skip-measure", action="store_true", help="only the timm comparison")
    args = p.parse_args()
    if not (args.data / "train").is_dir():
        raise CatdogError(f"{args.data}: no train split there; bench/train.py reads the shared photos "
                          f"({SHARED}/train/<class>/*.jpg) or --data ROOT")
    if args.timm_train and not args.timm_train.is_file():
        raise CatdogError(f"--timm-train {args.timm_train}: no such file (timm's train.py from its repository)")
    config = load_config(args.config, args.set)
    config = config.model_copy(update={"data": models.data_config(config.model.name, config.data)})
    with tempfile.TemporaryDirectory(prefix="catdog-bench-train-") as tmp:
        tmp = Path(tmp)
        if not args.skip_measure:
            data_root = link_images(chosen_images(args.data, args.images), args.data, tmp / "data")
            measure(args, config, data_root, tmp / "cache")
        if args.timm_train:
            data_root = link_images(chosen_images(args.data, args.timm_images), args.data, tmp / "timm-data")
            timm_compare(args, data_root, tmp)


if __name__ == "__main__":
    run_job(main)
