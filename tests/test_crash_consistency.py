"""Crash consistency (issue 8): extract, forest and sweep killed at random points, then run again, end with
exactly what an uninterrupted run writes.

Each job runs as its own process session (``start_new_session``), as ``python jobs/<job>.py --run RUN ...``.
For every seed, in a fresh copy of the tiny run, each stage in turn is SIGKILLed (its whole process group) after a
random delay within that job's uninterrupted duration, counted from its start or from its first write (most of a
short job is start-up, so kills counted from the start alone would rarely land while it writes); then it is run
again to completion and its outputs are compared with the reference run: byte for byte, except timing
fields and where a sweep cell ran (``fit_seconds``, ``node``, ``trial_id``). No temporary file
(``.<name>.tmp-<pid>``) may remain after the rerun, and no process of the killed session may survive it (the
sweep's local Ray included; leftovers are killed by PID, never by name).

    .venv/bin/python -m pytest -s -q tests/test_crash_consistency.py     # -s shows a line per seed and job
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2)
JOBS = ("extract", "forest", "sweep")
JOB_TIMEOUT = 300
POLL = 0.05
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
SESSION_GRACE = 30.0
"""Seconds a killed session's processes get to exit by themselves: Ray's workers sit in process groups of
their own, so the group kill does not reach them; they exit once their raylet is gone (1-3 s on a quiet machine,
over 10 s on a loaded one)."""

# Small settings so that each job takes seconds (small extraction batches: a longer writing phase to land kills in).
# 'no' is quoted so that the override, parsed as YAML, is the string and not false.
JOB_ARGS = {
    "extract": ["extract.shard_size=10", "extract.batch_size=2", "extract.num_workers=0",
                "extract.mixed_precision='no'"],
    "forest": ["forest.backend=sklearn", "forest.n_estimators=50"],
    "sweep": ["sweep.ks=[2,8,all]",
              "sweep.classifiers={rf: {estimator: RandomForestClassifier, params: {n_estimators: 10, random_state: 0}},"
              " lr: {estimator: LogisticRegression, params: {max_iter: 200, random_state: 0}}}"],
}
FOREST_FILES = ("importances.npy", "ranking.csv", "ranking_per_class.csv", "config.yaml", "summary.json")
TIMING_FIELDS = {"fit_seconds", "node", "node_id", "trial_id"}
"""Fields that differ between runs by nature: timings, and where (which node, which Tune trial) a cell ran."""
ANCHORS = ("start", "first write")

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads sessions from /proc")]


# processes

def job_command(job: str, run: Path, data: Path) -> list[str]:
    extra = ["--data", str(data)] if job == "extract" else []
    return [sys.executable, f"jobs/{job}.py", "--run", str(run), *extra, *JOB_ARGS[job]]


def uptime() -> float:
    """Seconds since boot, the clock of a process's start time in /proc."""
    return float(Path("/proc/uptime").read_text().split()[0])


def session_processes(sid: int, born_by: float) -> list[tuple[int, str]]:
    """Live processes of session ``sid`` started by ``born_by`` (seconds since boot), its reaped leader aside:
    a process started later holds a recycled PID. Zombies are left out: they are dead, waiting for init."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == sid:
            continue
        pid = int(entry)
        try:
            if os.getsid(pid) != sid:
                continue
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        name, fields = stat[stat.find("(") + 1:stat.rfind(")")], stat[stat.rfind(")") + 2:].split()
        if fields[0] not in ("Z", "X") and int(fields[19]) / CLOCK_TICKS <= born_by:
            found.append((pid, name))
    return found


def reap_session(sid: int) -> list[str]:
    """Called once the session's leader ``sid`` is reaped: wait up to ``SESSION_GRACE`` s for the session to have
    no live process; SIGKILL (by PID) and return those still alive then."""
    born_by = uptime()
    deadline = time.monotonic() + SESSION_GRACE
    while (alive := session_processes(sid, born_by)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid, _ in alive:
        with contextlib.suppress(OSError):
            if os.getsid(pid) == sid:
                os.kill(pid, signal.SIGKILL)
    return [f"{name} (pid {pid})" for pid, name in alive]


def log_tail(log: Path, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:]


def stage_folder(run: Path, job: str) -> Path:
    return run / ("features" if job == "extract" else job)


@dataclass
class Outcome:
    seconds: float
    first_write: float | None
    """Seconds from the start until something appeared in the stage's folder (a temporary file counts)."""
    killed: bool


def run_job(job: str, run: Path, data: Path, env: dict, log: Path, kill_after: float | None = None,
            anchor: str = "start") -> Outcome:
    """Run ``job`` in a session of its own. With ``kill_after``, SIGKILL its process group that many seconds
    after the ``anchor``: its ``start``, or its ``first write`` into the stage's (empty) folder, unless it has
    finished by then, in which case it must have succeeded; without, it must exit 0. Either way, no process of
    its session may outlive it."""
    folder = stage_folder(run, job)
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(job_command(job, run, data), cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    first_write, killed = None, False
    try:
        while proc.poll() is None:
            now = time.monotonic() - start
            if first_write is None and folder.is_dir() and any(folder.iterdir()):
                first_write = now
            since = now if anchor == "start" else None if first_write is None else now - first_write
            if kill_after is not None and since is not None and since >= kill_after:
                killed = True
                break
            if now > JOB_TIMEOUT:
                pytest.fail(f"{job} ran past {JOB_TIMEOUT} s:\n{log_tail(log)}")
            time.sleep(POLL)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the group outlives its leader while members remain
        proc.wait()
        seconds = time.monotonic() - start
        if first_write is None and folder.is_dir() and any(folder.iterdir()):
            first_write = seconds  # it wrote and exited between two polls
        leftovers = reap_session(proc.pid)
    assert not leftovers, (f"{job}: {len(leftovers)} process(es) of its session were alive {SESSION_GRACE:.0f} s "
                           f"after it {'was killed' if killed else 'ended'} (now killed): {', '.join(leftovers)}")
    if not killed:
        assert proc.returncode == 0, f"{job} exited with {proc.returncode}:\n{log_tail(log)}"
    assert "Connecting to existing Ray cluster" not in log.read_text(errors="replace"), f"{job} joined another Ray"
    return Outcome(seconds, first_write, killed)


# what is on disk

def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def temp_files(root: Path) -> list[str]:
    """Temporary files of atomic writes, ``.<name>.tmp-<pid>``, anywhere under ``root``."""
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*") if ".tmp-" in p.name)


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def untimed(row: dict) -> dict:
    return {key: value for key, value in row.items() if key not in TIMING_FIELDS}


def describe_after_kill(job: str, run: Path, reference: Path) -> tuple[str, dict]:
    """What the killed ``job`` left in ``run``, in words, and what a correct rerun must keep as it is."""
    folder = stage_folder(run, job)
    temps = plural(len(temp_files(run)), "temp file")
    if job == "extract":
        want = [n for n in listing(reference / "features") if n.endswith(".h5")]
        shards = [n for n in listing(folder) if n.endswith(".h5") and not n.startswith(".")]
        manifest = "manifest" if (folder / "manifest.json").exists() else "no manifest"
        # a complete shard is not rewritten by the rerun
        keep = {n: (folder / n).stat().st_mtime_ns for n in shards}
        return f"{len(shards)} of {len(want)} shards, {temps}, {manifest}", keep
    if job == "forest":
        there = [n for n in FOREST_FILES if (folder / n).exists()]
        return f"{len(there)} of {len(FOREST_FILES)} files ({', '.join(there) or '-'}), {temps}", {}
    rows = read_csv(folder / "results.csv")[1] if (folder / "results.csv").exists() else None
    total = len(read_csv(reference / "sweep" / "results.csv")[1])
    results = "no results.csv" if rows is None else f"{len(rows)} of {total} cells in results.csv"
    plot = "plot" if (folder / "accuracy_vs_k.png").exists() else "no plot"
    # finished cells are not recomputed: their rows, fit_seconds included, stay as they are
    return f"{results}, {plot}, {temps}", {"rows": rows or []}


def assert_same_outputs(job: str, run: Path, reference: Path, keep: dict) -> None:
    """``job``'s outputs in ``run`` equal the reference's (timing fields aside); nothing temporary remains."""
    assert not temp_files(run), f"{job}: temporary files remain after the rerun: {temp_files(run)}"
    got, want = stage_folder(run, job), stage_folder(reference, job)
    assert listing(got) == listing(want), f"{job}: files differ from the uninterrupted run's"
    if job == "extract":
        for file in listing(want):
            if file.endswith(".h5"):
                assert sha256(got / file) == sha256(want / file), f"extract: {file} differs"
        assert json.loads((got / "manifest.json").read_text()) == json.loads((want / "manifest.json").read_text())
        for file, mtime in keep.items():
            assert (got / file).stat().st_mtime_ns == mtime, f"extract: the rerun rewrote complete shard {file}"
    elif job == "forest":
        for file in ("importances.npy", "ranking.csv", "ranking_per_class.csv"):
            assert sha256(got / file) == sha256(want / file), f"forest: {file} differs"
        got_summary, want_summary = (json.loads((d / "summary.json").read_text()) for d in (got, want))
        assert untimed(got_summary) == untimed(want_summary), "forest: summary.json differs"
    else:
        (got_header, got_rows), (want_header, want_rows) = read_csv(got / "results.csv"), read_csv(want / "results.csv")
        assert got_header == want_header
        assert [untimed(r) for r in got_rows] == [untimed(r) for r in want_rows], "sweep: results.csv differs"
        for row in keep.get("rows", []):
            assert row in got_rows, f"sweep: the rerun recomputed the finished cell {row}"
        assert sha256(got / "accuracy_vs_k.png") == sha256(want / "accuracy_vs_k.png"), "sweep: the plot differs"
    assert (got / "config.yaml").read_text() == (want / "config.yaml").read_text(), f"{job}: config.yaml differs"


# fixtures

@pytest.fixture(scope="module")
def job_env():
    """The jobs' environment: each sweep starts a local Ray of its own (RAY_ADDRESS=local: unset, Ray would join
    a cluster that `ray start` left on this machine (/tmp/ray/ray_current_cluster); the tests' session Ray lives in pytest's process and is never
    seen), in a temp dir of its own (short: Ray's socket paths must fit in 107 bytes), removed at the end."""
    ray_tmp = tempfile.mkdtemp(prefix="catdog-ray-", dir="/tmp" if os.path.isdir("/tmp") else None)
    env = {**os.environ, "RAY_ADDRESS": "local", "RAY_TMPDIR": ray_tmp, "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONUNBUFFERED": "1"}
    yield env
    shutil.rmtree(ray_tmp, ignore_errors=True)


def copy_run(tiny_run: Path, dest: Path) -> Path:
    return Path(shutil.copytree(tiny_run, dest, ignore=shutil.ignore_patterns("features", "forest", "sweep")))


@pytest.fixture(scope="module")
def reference(tiny_run, synthetic_root, job_env, tmp_path_factory) -> tuple[Path, dict[str, Outcome]]:
    """extract -> forest -> sweep, uninterrupted, and how long each took (in all, and to its first write)."""
    work = tmp_path_factory.mktemp("crash-reference")
    run = copy_run(tiny_run, work / "run")
    timings = {job: run_job(job, run, synthetic_root, job_env, work / f"{job}.log") for job in JOBS}
    assert "Started a local Ray instance" in (work / "sweep.log").read_text(), "the sweep did not start its own Ray"
    assert not temp_files(run), temp_files(run)
    print("\nreference: " + ", ".join(f"{job} {t.seconds:.1f} s (first write at {t.first_write:.1f} s)"
                                      for job, t in timings.items()))
    return run, timings


@pytest.mark.parametrize("seed", SEEDS)
def test_killed_jobs_rerun_to_identical_outputs(seed, reference, tiny_run, synthetic_root, job_env, tmp_path):
    """Kill extract, rerun it; then the same for forest on its result, then for the sweep. Seeds alternate the
    anchor of the random delay, so that every job is killed both somewhere in its whole run (mostly start-up:
    imports, model loading, Ray's start) and somewhere after it began writing."""
    ref_run, timings = reference
    rng = random.Random(seed)
    run = copy_run(tiny_run, tmp_path / "run")
    for index, job in enumerate(JOBS):
        ref = timings[job]
        anchor = ANCHORS[(seed + index) % len(ANCHORS)]
        window = ref.seconds if anchor == "start" else ref.seconds - ref.first_write
        delay = rng.random() * window
        first = run_job(job, run, synthetic_root, job_env, tmp_path / f"{job}-killed.log", delay, anchor)
        when = (f"at {delay:.2f} s of {window:.2f} s" if anchor == "start" else
                f"{delay:.2f} s into its {window:.2f} s of writing ({first.seconds:.2f} s in)")
        keep = {}
        if first.killed:
            state, keep = describe_after_kill(job, run, ref_run)
            what = f"killed {when}; on disk: {state}"
        else:
            what = f"finished ({first.seconds:.2f} s) before the kill {when}"
        rerun = run_job(job, run, synthetic_root, job_env, tmp_path / f"{job}-rerun.log")
        assert_same_outputs(job, run, ref_run, keep)
        print(f"seed {seed} {job}: {what}; rerun {rerun.seconds:.1f} s, rerun identical")
