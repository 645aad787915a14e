"""How the cost of every stage after training grows with N images: wall time, seconds per image, peak memory of the
stage's whole process tree and disk, at several N, with each stage's growth exponents, the extrapolation to 1M and
100M images and a PASS/FAIL line per stage.

    python bench/scale.py                                   # this checkout at 4,000, 16,000 and 32,000 images
    python bench/scale.py --code /work/before               # another checkout (its jobs, PYTHONPATH=DIR first)
    python bench/scale.py --sizes 200 400                   # a quick end-to-end check
    python bench/scale.py --sizes 4000 16000 32000 64000    # larger: any sizes
    python bench/scale.py --set gradcam.faithfulness_images=50   # an override passed to every stage's job

The N-image folder is made from the shared photos (``--source``, default ../shared/data/cats_vs_dogs): image i of a
split and class is a seeded variant of the split's i-th photo of that class (modulo their number): a crop of 70-100%
of each side, a horizontal flip half the time, rescaled by 0.6-1.0 and saved at JPEG quality 60-95; 80% train, 10%
test, 10% val, every class as many. Folders are built once per (N, seed) under ``--work`` (never in the repository).

Two runs are trained once into ``--work/trained`` (training is not measured), by the checkout measured first:
EfficientNet-Lite0 (bundled ImageNet weights) and MobileNetV2 (``--mnv2-weights``), each one epoch of
``--train-batches`` batches on a slice of the shared photos (``--train-per-class``). Every N gets its own copy of the
two run directories, holding the trained run's files but none of a later stage's outputs, and not
``val_predictions.csv`` (it lists the slice's val images, not this folder's: the stages that use it then predict this
folder's val images themselves).
``config.yaml`` is rewritten by the measured checkout's own ``catdog.config.Config``, keeping only the keys it knows
(an older checkout refuses keys it does not know; the dropped keys are printed).

Each stage's job runs as launch.sh runs it (``launch.sh`` and docs/pipeline.md give the command lines) in a session of
its own with a private Ray temp folder and no ``RAY_ADDRESS``, so the local Ray it starts is its own: its GCS, raylet
and workers are in the job's session (Ray starts them without ``setsid``). The stage's peak memory is the peak of
the proportional set size (PSS: shared pages split between the processes that map them, so Ray's object store and
torch's libraries count once) summed over every process in the session, sampled whenever the summed RSS (read every
0.2 s) reaches a new high, and otherwise as often as costs a tenth of a core (``SessionSampler``); the peak of the
summed RSS is kept in the JSON too. Disk is the growth of this N's run directories and outputs over the stage; CPU
seconds are the user + system time of the session's processes as last sampled, which the other work on a shared
machine disturbs less than wall time. Processes of the session still alive after its job ends are
ended by their ids.

The exponents are log-log slopes of wall time and peak memory between successive sizes. 1M and 100M images: time from
seconds per image at the largest N (times N), memory linear in N through the two largest sizes (flat where it fell
between them). Targets, per stage:
seconds per image at the largest N within 1.25x of the smallest N's (the CPU seconds' ratio printed beside it, which
other work on the machine disturbs less), and peak memory extrapolated to 1M images <= 16 GB. Stages a checkout lacks
(jobs/audit.py) are skipped with a note.

Results: ``--work/results/<label>/n<N>.json`` per size (label: the checkout folder's name unless ``--label``), so a
size already measured with the same settings is not run again unless ``--force``; the plot
``--work/results/<label>/scale.png`` (or ``--plot``). A size's run directories are deleted after it is measured
(its feature stores take GBs) unless ``--keep``; each stage's log stays in ``--work/logs/<label>/n<N>/``.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SPLIT_FRACTIONS = {"train": 0.8, "test": 0.1, "val": 0.1}
SAMPLE_SECONDS = 0.2
PSS_CPU_SHARE = 0.1
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
TIME_RATIO_TARGET = 1.25
MEMORY_TARGET_GB = 16.0
EXTRAPOLATE_TO = (1_000_000, 100_000_000)
RUNS = {"a": "efficientnet_lite0", "b": "mobilenetv2_100"}
STAGES = ["gradcam", "robustness", "extract", "extract_b", "forest", "sweep", "topact", "concepts", "audit",
          "compare", "report"]
SKIPPED_FILES = {"last.pt", "val_predictions.csv", "writer.lock"}
NEEDS = {"forest": ("extract",), "sweep": ("forest",), "topact": ("forest",), "concepts": ("extract",),
         "audit": ("extract", "extract_b"), "compare": ("gradcam", "extract", "extract_b")}
"""The stages whose outputs a stage reads: ``--stages`` must hold them too (each N starts from fresh run folders)."""

TRIM_CONFIG = r"""
import sys, yaml
from pydantic import BaseModel
from catdog.config import Config

def trim(tree, model, where):
    kept, dropped = {}, []
    for key, value in tree.items():
        field = model.model_fields.get(key)
        if field is None:
            dropped.append(where + key)
            continue
        if isinstance(value, dict) and isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            value, more = trim(value, field.annotation, where + key + ".")
            dropped += more
        kept[key] = value
    return kept, dropped

from pydantic import ValidationError
kept, dropped = trim(yaml.safe_load(open(sys.argv[1])), Config, "")
while True:  # a value the checkout's type refuses (a newer default such as null) falls back to its own default
    try:
        Config.model_validate(kept)
        break
    except ValidationError as exc:
        for error in exc.errors():
            node = kept
            for part in error["loc"][:-1]:
                node = node[part]
            node.pop(error["loc"][-1], None)
            dropped.append(".".join(map(str, error["loc"])) + "=" + repr(error.get("input")))
with open(sys.argv[2], "w") as handle:
    yaml.safe_dump(kept, handle, sort_keys=False)
print(" ".join(dropped))
"""


# ---------------------------------------------------------------------------------------------------- the folder
def split_counts(n: int, classes: int) -> dict[str, int]:
    """Images per class in each split for N images in all (80/10/10; every class as many)."""
    return {split: max(1, round(n * fraction / classes)) for split, fraction in SPLIT_FRACTIONS.items()}


def make_variant(job: tuple[str, str, str]) -> None:
    """One seeded variant of a photo: crop, flip, rescale, JPEG quality (``job``: source, target, seed string)."""
    source, target, seed = job
    rng = random.Random(seed)
    with Image.open(source) as opened:
        image = opened.convert("RGB")
    width, height = image.size
    crop_w, crop_h = max(16, int(width * rng.uniform(0.7, 1.0))), max(16, int(height * rng.uniform(0.7, 1.0)))
    left, top = rng.randint(0, width - crop_w), rng.randint(0, height - crop_h)
    image = image.crop((left, top, left + crop_w, top + crop_h))
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    scale = rng.uniform(0.6, 1.0)
    image = image.resize((max(16, round(crop_w * scale)), max(16, round(crop_h * scale))), Image.Resampling.BILINEAR)
    partial = target + ".partial"
    image.save(partial, format="JPEG", quality=rng.randint(60, 95))
    os.replace(partial, target)


def build_folder(source: Path, work: Path, n: int, seed: int) -> Path:
    """The N-image folder for (N, seed), built once: files are written under temporary names, the folder renamed
    into place when complete, so a killed build resumes with the files it finished."""
    folder = work / "data" / f"n{n}-seed{seed}"
    if folder.is_dir():
        return folder
    partial = folder.with_name(folder.name + ".partial")
    for unfinished in partial.glob("*/*/*.partial"):  # files a killed build was writing
        unfinished.unlink()
    classes = sorted(p.name for p in (source / "train").iterdir() if p.is_dir())
    counts = split_counts(n, len(classes))
    jobs = []
    for split, count in counts.items():
        for name in classes:
            photos = sorted(f for f in (source / split / name).iterdir() if f.suffix.lower() in (".jpg", ".jpeg"))
            (partial / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                target = partial / split / name / f"{photos[i % len(photos)].stem}-v{i}.jpg"
                if not target.exists():
                    jobs.append((str(photos[i % len(photos)]), str(target), f"{seed}/{split}/{name}/{i}"))
    start = time.perf_counter()
    with multiprocessing.Pool(os.cpu_count()) as pool:
        for _ in pool.imap_unordered(make_variant, jobs, chunksize=64):
            pass
    os.replace(partial, folder)
    print(f"built {folder} ({n} images, {len(jobs)} written in {time.perf_counter() - start:.0f} s)", flush=True)
    return folder


# ------------------------------------------------------------------------------------------- processes, memory
def session_pids(sid: int) -> list[int]:
    """Every live process of session ``sid``."""
    found = []
    for pid in psutil.pids():
        try:
            if os.getsid(pid) == sid:
                found.append(pid)
        except OSError:
            pass
    return found


def rss_bytes(pid: int) -> int:
    """A process's resident set size, from /proc/PID/statm (cheap; 0 when it has gone)."""
    try:
        with open(f"/proc/{pid}/statm") as handle:
            return int(handle.read().split()[1]) * PAGE_BYTES
    except (OSError, IndexError, ValueError):
        return 0


def cpu_seconds(pid: int) -> float | None:
    """A process's user + system CPU seconds so far, from /proc/PID/stat (None when it has gone)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    except (OSError, IndexError, ValueError):
        return None


def pss_bytes(pid: int) -> int:
    """A process's proportional set size, from /proc/PID/smaps_rollup (0 when it has gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return 0


class SessionSampler(threading.Thread):
    """Peak memory of every process in one session: the summed RSS every ``SAMPLE_SECONDS``; the summed PSS whenever
    the summed RSS reaches a new high (by 5%), else as often as costs at most ``PSS_CPU_SHARE`` of a core
    (smaps_rollup walks the page tables: ~10 ms for a process holding torch, so a Ray stage's dozen processes every
    0.2 s would take a third of a core of a 2-core machine)."""

    def __init__(self, sid: int):
        super().__init__(daemon=True)
        self.sid, self.stop_event = sid, threading.Event()
        self.peak_pss = self.peak_rss = self.peak_processes = 0
        self.pss_samples = 0
        self.cpu_by_pid: dict[int, float] = {}

    @property
    def cpu_seconds(self) -> float:
        """CPU seconds of every process seen, as last sampled (a process's last 0.2 s before it ends is missed)."""
        return sum(self.cpu_by_pid.values())

    def run(self) -> None:
        next_pss = 0.0
        while not self.stop_event.is_set():
            pids = session_pids(self.sid)
            rss = sum(rss_bytes(pid) for pid in pids)
            for pid in pids:
                cpu = cpu_seconds(pid)
                if cpu is not None:
                    self.cpu_by_pid[pid] = cpu
            new_high = rss > 1.05 * self.peak_rss
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_processes = max(self.peak_processes, len(pids))
            if new_high or time.monotonic() >= next_pss:
                cpu = time.thread_time()
                self.peak_pss = max(self.peak_pss, sum(pss_bytes(pid) for pid in pids))
                self.pss_samples += 1
                next_pss = time.monotonic() + max(SAMPLE_SECONDS, (time.thread_time() - cpu) / PSS_CPU_SHARE)
            self.stop_event.wait(SAMPLE_SECONDS)


def end_session(sid: int) -> int:
    """End the processes of a finished stage's session that are still alive, by their ids; how many there were."""
    left = []
    for pid in session_pids(sid):
        try:
            left.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    for process in left:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(left, timeout=10)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    return len(left)


def disk_bytes(folder: Path) -> int:
    """Bytes a folder takes on disk (allocated blocks)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


def checkout_env(code: Path) -> dict[str, str]:
    """The environment a job of checkout ``code`` runs in: its catdog first on the path, no Ray address."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(code), *filter(None, [env.get("PYTHONPATH")])])
    env.pop("RAY_ADDRESS", None)
    return env


def run_stage(command: list[str], code: Path, log: Path, measured: Path) -> dict:
    """Run one job in a session of its own with a private Ray temp folder; its wall and CPU seconds, peak memory
    of the session, disk growth of ``measured``, and exit code."""
    env = checkout_env(code)
    ray_tmp = tempfile.mkdtemp(prefix="catdog-scale-ray-")
    env["RAY_TMPDIR"] = ray_tmp
    disk_before = disk_bytes(measured)
    load_before = os.getloadavg()[0]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as handle:
        handle.write("$ " + " ".join(command) + "\n")
        handle.flush()
        start = time.perf_counter()
        process = subprocess.Popen(command, cwd=code, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        sampler = SessionSampler(process.pid)
        sampler.start()
        try:
            exit_code = process.wait()
        except BaseException:
            end_session(process.pid)
            raise
        finally:
            wall = time.perf_counter() - start
            sampler.stop_event.set()
            sampler.join()
    leftover = end_session(process.pid)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    return {"wall_s": wall, "exit_code": exit_code,
            "cpu_s": sampler.cpu_seconds,
            "peak_mb": sampler.peak_pss / 2**20, "peak_rss_mb": sampler.peak_rss / 2**20,
            "peak_processes": sampler.peak_processes, "pss_samples": sampler.pss_samples,
            "leftover_processes": leftover,
            "disk_mb": (disk_bytes(measured) - disk_before) / 2**20,
            "load_before": load_before, "load_after": os.getloadavg()[0]}


# ---------------------------------------------------------------------------------------------- the trained runs
def training_slice(source: Path, per_class: int, into: Path) -> Path:
    """``per_class`` photos of each class in train and half as many in test and val, as symbolic links: the trained
    runs need a real model, not the cost of a full training run."""
    if into.is_dir():
        return into
    partial = into.with_name(into.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    for split in SPLIT_FRACTIONS:
        count = per_class if split == "train" else max(1, per_class // 2)
        for folder in sorted(p for p in (source / split).iterdir() if p.is_dir()):
            (partial / split / folder.name).mkdir(parents=True)
            for photo in sorted(folder.iterdir())[:count]:
                (partial / split / folder.name / photo.name).symlink_to(photo)
    os.replace(partial, into)
    return into


def train_runs(args: argparse.Namespace) -> dict[str, Path]:
    """The two trained runs, trained once into ``--work/trained`` by the checkout measured first."""
    data = training_slice(args.source, args.train_per_class, args.work / "trained" / f"data-{args.train_per_class}")
    folder = args.work / ("trained" if args.image_size is None else f"trained-{args.image_size}px")
    trained = {}
    for key, model in RUNS.items():
        run = folder / model
        trained[key] = run
        if (run / "summary.json").is_file():
            continue
        settings = ["optim.epochs=1", f"train.max_train_batches={args.train_batches}",
                    *([] if args.image_size is None else [f"data.image_size={args.image_size}"])]
        if key == "b":
            settings.append(f"model.pretrained={args.mnv2_weights.resolve()}")
        shutil.rmtree(run, ignore_errors=True)
        command = [sys.executable, "jobs/train.py", "--model", model, "--data", str(data), "--out", str(run),
                   *settings]
        print(f"training {model} once (not measured): {' '.join(command[1:])}", flush=True)
        log = args.work / "logs" / f"train-{model}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as handle:
            done = subprocess.run(command, cwd=args.code, env=checkout_env(args.code), stdout=handle,
                                  stderr=subprocess.STDOUT)
        if done.returncode:
            raise SystemExit(f"training {model} failed ({done.returncode}); see {log}")
    return trained


def copy_run(trained: Path, into: Path, code: Path) -> str:
    """A fresh run directory for one N: the trained run's files (not its state, trackers or val predictions), its
    config rewritten by the checkout's own Config. Returns the config keys dropped."""
    into.mkdir(parents=True)
    for item in trained.iterdir():
        if item.is_file() and item.name not in SKIPPED_FILES and item.name != "config.yaml":
            shutil.copy2(item, into / item.name)
    done = subprocess.run([sys.executable, "-c", TRIM_CONFIG, str(trained / "config.yaml"), str(into / "config.yaml")],
                          cwd=code, env=checkout_env(code), capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{code}: its catdog.config cannot read {trained / 'config.yaml'}:\n{done.stderr[-1500:]}")
    return done.stdout.strip()


# ------------------------------------------------------------------------------------------------ one size
def stage_commands(code: Path, data: Path, a: Path, b: Path, out: Path, sets: list[str]) -> dict[str, list[str]]:
    """Each stage's job as launch.sh runs it (overrides before the run arguments, as launch.sh passes them)."""
    py = sys.executable
    return {
        "gradcam": [py, "jobs/gradcam.py", *sets, "--runs", str(a), str(b), "--data", str(data), "--out", str(out)],
        "robustness": [py, "jobs/robustness.py", "--run", str(a), "--data", str(data), *sets],
        "extract": [py, "jobs/extract.py", "--run", str(a), "--data", str(data), *sets],
        "extract_b": [py, "jobs/extract.py", "--run", str(b), "--data", str(data), *sets],
        "forest": [py, "jobs/forest.py", "--run", str(a), *sets],
        "sweep": [py, "jobs/sweep.py", "--run", str(a), *sets],
        "topact": [py, "jobs/topact.py", "--run", str(a), "--data", str(data), *sets],
        "concepts": [py, "jobs/concepts.py", *sets, "--run", str(a), "--data", str(data)],
        "audit": [py, "jobs/audit.py", *sets, "--run", str(a), str(b), "--data", str(data)],
        "compare": [py, "jobs/compare.py", *sets, "--runs", str(a), str(b), "--data", str(data), "--out", str(out)],
        "report": [py, "jobs/report.py", "--runs", str(a), str(b), "--gradcam", str(out / "gradcam"), "--compare",
                   str(out / "compare"), "--out", str(out / "report")],
    }


def measure_size(args: argparse.Namespace, n: int, trained: dict[str, Path], settings: dict) -> dict:
    """Every stage on the N-image folder, one after another; the size's results."""
    data = build_folder(args.source, args.work, n, args.seed)
    measured = args.work / "measure" / args.label / f"n{n}"
    shutil.rmtree(measured, ignore_errors=True)
    runs = {key: measured / RUNS[key] for key in RUNS}
    dropped = {RUNS[key]: copy_run(trained[key], runs[key], args.code) for key in RUNS}
    for model, keys in dropped.items():
        if keys:
            print(f"  {model}: config keys {args.code} does not know, dropped: {keys}", flush=True)
    commands = stage_commands(args.code, data, runs["a"], runs["b"], measured, args.sets)
    result = {"n": n, "settings": settings, "dropped_config_keys": dropped, "stages": {}, "notes": []}
    for stage in args.stages:
        job = args.code / commands[stage][1]
        if not job.is_file():
            result["notes"].append(f"{stage}: skipped, {args.code} has no {commands[stage][1]}")
            print(f"  n={n} {stage}: skipped ({commands[stage][1]} not in this checkout)", flush=True)
            continue
        log = args.work / "logs" / args.label / f"n{n}" / f"{stage}.log"
        measure = run_stage(commands[stage], args.code, log, measured)
        result["stages"][stage] = measure
        status = "" if measure["exit_code"] == 0 else f"  FAILED (exit {measure['exit_code']}; see {log})"
        print(f"  n={n} {stage:10s} {measure['wall_s']:8.1f} s  {measure['peak_mb']:8.0f} MB  "
              f"{measure['disk_mb']:8.1f} MB disk  load {measure['load_before']:.1f}->{measure['load_after']:.1f}"
              f"{status}", flush=True)
    if not args.keep:
        shutil.rmtree(measured, ignore_errors=True)
    return result


# ------------------------------------------------------------------------------------------------ the summary
def slope(x1: float, y1: float, x2: float, y2: float) -> float | None:
    """The log-log slope between two points (None when a value is not positive)."""
    if min(x1, y1, x2, y2) <= 0 or x1 == x2:
        return None
    return math.log(y2 / y1) / math.log(x2 / x1)


def stage_summary(stage: str, points: list[tuple[int, dict]]) -> dict:
    """Exponents, extrapolation and the two targets of one stage from its (N, measure) points, smallest N first."""
    sizes = [n for n, _ in points]
    wall = [m["wall_s"] for _, m in points]
    peak = [m["peak_mb"] for _, m in points]
    summary = {"time_exponents": [slope(sizes[i], wall[i], sizes[i + 1], wall[i + 1]) for i in range(len(sizes) - 1)],
               "memory_exponents": [slope(sizes[i], peak[i], sizes[i + 1], peak[i + 1])
                                    for i in range(len(sizes) - 1)]}
    per_image = [w / n for w, n in zip(wall, sizes)]
    summary["time_ratio"] = per_image[-1] / per_image[0]
    cpu_per_image = [m["cpu_s"] / n for n, m in points]
    summary["cpu_time_ratio"] = cpu_per_image[-1] / cpu_per_image[0] if cpu_per_image[0] > 0 else None
    if len(sizes) >= 2:
        per_n = max(0.0, (peak[-1] - peak[-2]) / (sizes[-1] - sizes[-2]))  # a falling peak extrapolates flat
        summary["memory_mb_per_image"] = per_n
        summary["extrapolated"] = {str(n): {"seconds": per_image[-1] * n, "peak_mb": peak[-1] + per_n * (n - sizes[-1])}
                                   for n in EXTRAPOLATE_TO}
        memory_1m_gb = summary["extrapolated"][str(EXTRAPOLATE_TO[0])]["peak_mb"] / 1024
        summary["time_pass"] = summary["time_ratio"] <= TIME_RATIO_TARGET
        summary["memory_pass"] = memory_1m_gb <= MEMORY_TARGET_GB
    return summary


def human_seconds(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def print_summary(results: list[dict], plot: Path) -> dict:
    """The table, the exponents, the extrapolation and the PASS/FAIL lines; the per-stage summaries."""
    print(f"\n{'stage':11s} {'N':>8s} {'wall s':>9s} {'s/image':>10s} {'cpu s':>9s} {'peak MB':>9s} {'disk MB':>9s}")
    stages = [s for s in STAGES if any(s in r["stages"] for r in results)]
    for stage in stages:
        for result in results:
            m = result["stages"].get(stage)
            if m is None:
                continue
            failed = "" if m["exit_code"] == 0 else f"  FAILED (exit {m['exit_code']})"
            print(f"{stage:11s} {result['n']:8d} {m['wall_s']:9.1f} {m['wall_s'] / result['n']:10.5f} "
                  f"{m['cpu_s']:9.1f} {m['peak_mb']:9.0f} {m['disk_mb']:9.1f}{failed}")
    summaries = {}
    print("\ngrowth exponents (log-log slope between successive sizes), extrapolation (time: s/image at the largest "
          "N; memory: linear in N through the two largest sizes)")
    print(f"{'stage':11s} {'time exp':>14s} {'memory exp':>14s} {'1M time':>10s} {'1M peak GB':>11s} "
          f"{'100M time':>10s} {'100M peak GB':>13s}")
    for stage in stages:
        points = [(r["n"], r["stages"][stage]) for r in results
                  if stage in r["stages"] and r["stages"][stage]["exit_code"] == 0]
        if len(points) < 2:
            continue
        summary = summaries[stage] = stage_summary(stage, points)
        exps = lambda values: ", ".join("-" if v is None else f"{v:.2f}" for v in values)  # noqa: E731
        one, hundred = (summary["extrapolated"][str(n)] for n in EXTRAPOLATE_TO)
        print(f"{stage:11s} {exps(summary['time_exponents']):>14s} {exps(summary['memory_exponents']):>14s} "
              f"{human_seconds(one['seconds']):>10s} {one['peak_mb'] / 1024:11.1f} "
              f"{human_seconds(hundred['seconds']):>10s} {hundred['peak_mb'] / 1024:13.1f}")
    print(f"\ntargets: s/image at the largest N <= {TIME_RATIO_TARGET}x the smallest N's; peak memory extrapolated "
          f"to 1M images <= {MEMORY_TARGET_GB:.0f} GB")
    for stage in stages:
        summary = summaries.get(stage)
        if summary is None:
            print(f"{stage:11s} no result: it failed at some size or ran at one size only")
            continue
        memory_1m = summary["extrapolated"][str(EXTRAPOLATE_TO[0])]["peak_mb"] / 1024
        cpu = summary["cpu_time_ratio"]
        cpu = "" if cpu is None else f"; cpu s/image {cpu:.2f}x"
        print(f"{stage:11s} time {'PASS' if summary['time_pass'] else 'FAIL'} ({summary['time_ratio']:.2f}x{cpu})  "
              f"memory {'PASS' if summary['memory_pass'] else 'FAIL'} ({memory_1m:.1f} GB at 1M)")
    failed_sizes = [(r["n"], s) for r in results for s, m in r["stages"].items() if m["exit_code"] != 0]
    if failed_sizes:
        print("failed: " + ", ".join(f"{s} at N={n}" for n, s in failed_sizes))
    for result in results:
        for note in result["notes"]:
            print(f"note (N={result['n']}): {note}")
    if len(results) >= 2:
        write_plot(results, stages, plot)
        print(f"plot: {plot}")
    return summaries


def write_plot(results: list[dict], stages: list[str], path: Path) -> None:
    """Wall time and peak memory against N, log-log, a line per stage, with a slope-1 guide."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    sizes = [r["n"] for r in results]
    for index, stage in enumerate(stages):
        points = [(r["n"], r["stages"][stage]) for r in results
                  if stage in r["stages"] and r["stages"][stage]["exit_code"] == 0]
        style = dict(color=f"C{index % 10}", marker="os^"[index // 10 % 3], linestyle="-" if index < 10 else "--",
                     label=stage)  # matplotlib has 10 colours; more stages than that change marker and line
        if points:
            left.plot([n for n, _ in points], [m["wall_s"] for _, m in points], **style)
            right.plot([n for n, _ in points], [m["peak_mb"] for _, m in points], **style)
    for axis, ylabel in ((left, "wall seconds"), (right, "peak memory of the process tree (PSS, MB)")):
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("images (N)")
        axis.set_ylabel(ylabel)
        axis.grid(True, which="both", alpha=0.3)
    bottom = min(m["wall_s"] for r in results for m in r["stages"].values() if m["exit_code"] == 0)
    left.plot([sizes[0], sizes[-1]], [bottom, bottom * sizes[-1] / sizes[0]], "k:", label="linear in N")
    left.legend(fontsize=8, ncol=2)
    left.set_title("time per stage")
    right.set_title("peak memory per stage")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial.png")
    figure.savefig(partial, dpi=100)
    os.replace(partial, path)
    plt.close(figure)


def write_json(path: Path, value: dict) -> None:
    """Write JSON atomically: a temporary name, then renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value, indent=1))
    os.replace(partial, path)


def git_describe(code: Path) -> str:
    """The checkout's commit, with ``+changes`` when its working tree differs from it."""
    head = subprocess.run(["git", "-C", str(code), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(code), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True)
    if head.returncode:
        return "not a git checkout"
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--code", type=Path, default=REPO, help="the checkout whose jobs run (default: this one)")
    p.add_argument("--sizes", type=int, nargs="+", default=[4000, 16000, 32000], help="N, images in all")
    p.add_argument("--work", type=Path, default=Path("/tmp/catdog_scale"), help="folders, runs, results, logs")
    p.add_argument("--source", type=Path, default=REPO.parent / "shared" / "data" / "cats_vs_dogs")
    p.add_argument("--mnv2-weights", type=Path,
                   default=REPO.parent / "shared" / "weights" / "mobilenetv2_100.safetensors")
    p.add_argument("--seed", type=int, default=0, help="the folders' variants")
    p.add_argument("--train-batches", type=int, default=10, help="training batches of each trained run (one epoch)")
    p.add_argument("--train-per-class", type=int, default=200,
                   help="shared train photos per class the runs are trained on (half as many test and val)")
    p.add_argument("--set", action="append", default=[], dest="sets", metavar="section.key=value",
                   help="an override passed to every stage's job (repeatable)")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=STAGES, help="the stages to measure (default: all)")
    p.add_argument("--image-size", type=int, help="train the runs at this input size (default: each model's own); "
                   "every later stage reads it from the run, so the whole pipeline runs at it")
    p.add_argument("--label", help="the results' folder name (default: the checkout folder's name)")
    p.add_argument("--plot", type=Path, help="the plot (default WORK/results/LABEL/scale.png)")
    p.add_argument("--force", action="store_true", help="measure sizes that already have results")
    p.add_argument("--keep", action="store_true", help="keep each size's run directories and outputs")
    args = p.parse_args()
    if len(args.sizes) != len(set(args.sizes)) or min(args.sizes) < 20:
        p.error("--sizes: distinct sizes of at least 20 images")
    args.sizes.sort()
    args.code, args.work, args.source = args.code.resolve(), args.work.resolve(), args.source.resolve()
    if not (args.code / "jobs" / "extract.py").is_file():
        p.error(f"--code {args.code}: not a catdog checkout (no jobs/extract.py)")
    if not (args.source / "train").is_dir():
        p.error(f"--source {args.source}: no train/ folder (the shared photos: ../shared/data/cats_vs_dogs)")
    args.label = args.label or args.code.name
    results_dir = args.work / "results" / args.label
    plot = args.plot or results_dir / "scale.png"
    args.stages = [s for s in STAGES if s in args.stages]
    for stage in args.stages:
        missing = [need for need in NEEDS.get(stage, ()) if need not in args.stages]
        if missing:
            p.error(f"--stages: {stage} reads the outputs of {' and '.join(missing)}; add them")
    settings = {"seed": args.seed, "train_batches": args.train_batches, "train_per_class": args.train_per_class,
                "sets": args.sets, "stages": args.stages, "image_size": args.image_size,
                "source": str(args.source)}

    print(f"catdog scale bench: code {args.code} ({git_describe(args.code)}), label {args.label}")
    print(f"  sizes {args.sizes}; folders: seeded variants of {args.source} (seed {args.seed}; 80/10/10 "
          "train/test/val, crop 70-100%, flip, rescale 0.6-1.0, JPEG quality 60-95)")
    print(f"  runs: {RUNS['a']} (stages) and {RUNS['b']} (from {args.mnv2_weights}; extract_b, gradcam, audit, "
          f"compare, report), trained once on {args.train_per_class} shared train photos per class: optim.epochs=1 "
          f"train.max_train_batches={args.train_batches}"
          f"{'' if args.image_size is None else f' data.image_size={args.image_size}'}")
    print(f"  stages: {' '.join(args.stages)}")
    print(f"  stage settings: each run's own config.yaml (configs/<model>.yaml), overrides: "
          f"{' '.join(args.sets) or 'none'}")
    print(f"  peak memory: PSS summed over each stage's session (RSS read every {SAMPLE_SECONDS} s, PSS at each new "
          f"high and otherwise within {PSS_CPU_SHARE:.0%} of a core); work {args.work}")
    print(f"  machine: {os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB, load average "
          f"{os.getloadavg()[0]:.2f} at the start (other work on the machine slows wall time; see cpu s)", flush=True)

    results = []
    trained = None
    for n in args.sizes:
        path = results_dir / f"n{n}.json"
        if path.is_file() and not args.force:
            stored = json.loads(path.read_text())
            # results written before --stages and --image-size existed measured every stage at the models' size
            stored_settings = {"stages": STAGES, "image_size": None, **stored.get("settings", {})}
            if stored_settings == settings and stored.get("code") == str(args.code):
                print(f"N={n}: measured before ({path}); --force measures it again", flush=True)
                results.append(stored)
                continue
            print(f"N={n}: {path} was measured with other settings; measuring again", flush=True)
        trained = trained or train_runs(args)
        print(f"N={n}:", flush=True)
        result = measure_size(args, n, trained, settings)
        result.update(code=str(args.code), commit=git_describe(args.code), measured_at=time.strftime("%Y-%m-%d %H:%M"))
        write_json(path, result)
        results.append(result)
    summaries = print_summary(results, plot)
    summary_path = results_dir / "summary.json"
    write_json(summary_path, {"sizes": args.sizes, "stages": summaries})
    print(f"results: {results_dir}/n<N>.json, {summary_path}")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    main()
