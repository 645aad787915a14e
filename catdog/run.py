"""The run directory: the one owner of every path a stage reads or writes (see docs/pipeline.md).

    python -m catdog.run RUN STAGE     # exit 0 when STAGE of RUN is complete (what ./launch.sh checks)

This module imports nothing heavy at the top (no torch), so Ray workers and ``launch.sh`` stay light.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from catdog.config import Config, load_config
from catdog.errors import CatdogError
from catdog.io import read_json


class RunDir:
    """Paths of one run, loading of its trained model and its training state, and which stages are complete."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def lock_path(self) -> Path:
        """Exists while a job writes the run (``writer``): who holds it."""
        return self.path / "writer.lock"

    @contextlib.contextmanager
    def writer(self, job: str) -> Iterator[None]:
        """Hold the run's one writer lock for the block: a second job that would write the same run is a one-line
        error naming the process that holds it. The lock is the kernel's (``flock``), so a killed holder's lock is
        free at once and the next job takes it over; its file is removed when the block ends.

        A run directory that does not exist is not made here (the job then fails on its own inputs), except by
        ``jobs/train.py``, which creates the run (and removes it again if it ends before writing anything). In a job of several processes the first one (``RANK`` 0) holds it
        for all."""
        if int(os.environ.get("RANK", "0")) != 0:
            yield
            return
        created = not self.path.is_dir()
        if created:
            if job != "train":
                yield
                return
            self.path.mkdir(parents=True)
        while True:
            handle = open(self.lock_path, "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                handle.close()
                raise CatdogError(f"run {self.path} is being written by {holder}; wait for that job to end (or stop "
                                  "it), or write another run directory") from None
            try:  # the file may have been removed (and made anew) by the holder we waited behind: lock the current one
                if os.stat(self.lock_path).st_ino == os.fstat(handle.fileno()).st_ino:
                    break
            except FileNotFoundError:
                pass
            handle.close()
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"{job} (process {os.getpid()} on {socket.gethostname()}, since "
                         f"{time.strftime('%Y-%m-%d %H:%M:%S')})\n")
            handle.flush()
            yield
        finally:
            self.lock_path.unlink(missing_ok=True)
            handle.close()
            if created and not any(self.path.iterdir()):  # a job that failed before writing leaves nothing behind
                self.path.rmdir()

    # training (jobs/train.py)
    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def state_path(self) -> Path:
        """Resumable training state (model, optimizer, scheduler, epoch, history)."""
        return self.path / "last.pt"

    @property
    def best_checkpoint(self) -> Path:
        return self.path / "best.safetensors"

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    @property
    def val_predictions_path(self) -> Path:
        """The best weights' prediction for every val image (``path, label, predicted, probability, p_<class>...``)."""
        return self.path / "val_predictions.csv"

    @property
    def linear_probe_path(self) -> Path:
        """The linear probe's head on the frozen pretrained backbone (the classifier's state dict)."""
        return self.path / "linear_probe.safetensors"

    @property
    def trackers_dir(self) -> Path:
        """Accelerate trackers' logs (``tensorboard --logdir RUN/trackers``)."""
        return self.path / "trackers"

    @property
    def cache_dir(self) -> Path:
        """Decoded images (``data.cache``), one uint8 array file per split."""
        return self.path / "cache"

    # feature store (jobs/extract.py); the files inside belong to catdog.store
    @property
    def features_dir(self) -> Path:
        return self.path / "features"

    # forest (jobs/forest.py)
    @property
    def forest_dir(self) -> Path:
        return self.path / "forest"

    @property
    def forest_summary(self) -> Path:
        return self.forest_dir / "summary.json"

    @property
    def importances_path(self) -> Path:
        return self.forest_dir / "importances.npy"

    @property
    def ranking_path(self) -> Path:
        """Every feature by global importance: ``rank,feature,importance``."""
        return self.forest_dir / "ranking.csv"

    @property
    def ranking_per_class_path(self) -> Path:
        return self.forest_dir / "ranking_per_class.csv"

    # sweep (jobs/sweep.py)
    @property
    def sweep_dir(self) -> Path:
        return self.path / "sweep"

    @property
    def sweep_results(self) -> Path:
        return self.sweep_dir / "results.csv"

    @property
    def sweep_plot(self) -> Path:
        return self.sweep_dir / "accuracy_vs_k.png"

    @property
    def sweep_tune_dir(self) -> Path:
        """Ray Tune's experiment folder (``Tuner.restore`` resumes from it)."""
        return self.sweep_dir / "tune"

    # top activations (jobs/topact.py)
    @property
    def topact_dir(self) -> Path:
        return self.path / "topact"

    @property
    def topact_index(self) -> Path:
        return self.topact_dir / "index.json"

    # concepts (jobs/concepts.py)
    @property
    def concepts_dir(self) -> Path:
        return self.path / "concepts"

    @property
    def concepts_index(self) -> Path:
        return self.concepts_dir / "index.json"

    # robustness (jobs/robustness.py)
    @property
    def robustness_dir(self) -> Path:
        return self.path / "robustness"

    @property
    def robustness_summary(self) -> Path:
        return self.robustness_dir / "summary.json"

    # data audit (jobs/audit.py; the audit of several runs is written to the first one's)
    @property
    def audit_dir(self) -> Path:
        return self.path / "audit"

    @property
    def audit_summary(self) -> Path:
        return self.audit_dir / "summary.json"

    def audit_list(self, kind: str) -> Path:
        """A suspect list, ``label_issues``, ``outliers`` or ``duplicates`` (``catdog.audit.KINDS``): a CSV with a
        ``path`` column, usable as a ``data.exclude`` file."""
        return self.audit_dir / f"{kind}.csv"

    @property
    def audit_suspects_plot(self) -> Path:
        """The top suspects with every audited run's Grad-CAM."""
        return self.audit_dir / "suspects.png"

    def stage_marker(self, stage: str) -> Path:
        """The file a stage writes last: the stage is complete when it exists (``resume``: training can resume)."""
        markers = {"resume": self.state_path, "train": self.summary_path, "extract": self.features_dir / "manifest.json",
                   "forest": self.forest_summary, "sweep": self.sweep_plot, "topact": self.topact_index,
                   "concepts": self.concepts_index, "robustness": self.robustness_summary,
                   "audit": self.audit_summary}
        if stage not in markers:
            raise CatdogError(f"stage {stage!r}: unknown; one of {', '.join(markers)}")
        return markers[stage]

    def config(self) -> Config:
        if not self.config_path.is_file():
            raise CatdogError(f"run {self.path}: no config.yaml (is this a directory written by jobs/train.py?)")
        return load_config(self.config_path)

    def summary(self) -> dict:
        if not self.summary_path.is_file():
            raise CatdogError(f"run {self.path}: no summary.json; train it first (accelerate launch jobs/train.py "
                              f"--out {self.path} --data DATA_ROOT, with --resume if it has a last.pt)")
        try:
            return read_json(self.summary_path)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CatdogError(f"run {self.path}: summary.json is damaged ({exc}); delete it and resume training "
                              f"(accelerate launch jobs/train.py --out {self.path} --data DATA_ROOT --resume)") from None

    def metrics(self) -> list[dict]:
        """The per-epoch records of metrics.jsonl (none when training has not finished an epoch)."""
        if not self.metrics_path.is_file():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def load_weights(self, map_location: str = "cpu") -> dict:
        """The best checkpoint's tensors; a damaged file is a one-line error that says what to do."""
        from safetensors.torch import load_file

        if not self.best_checkpoint.is_file():
            raise CatdogError(f"run {self.path}: best.safetensors is missing; train the run again "
                              f"(accelerate launch jobs/train.py --out {self.path} --data DATA_ROOT)")
        try:
            return load_file(self.best_checkpoint, device=str(map_location))
        except Exception as exc:  # safetensors raises its own error types for truncated or altered files
            raise CatdogError(f"run {self.path}: best.safetensors is damaged ({type(exc).__name__}: "
                              f"{str(exc)[:120]}); delete it and train the run again") from None

    def load_state(self) -> dict:
        """The resumable training state (``last.pt``); a damaged file is a one-line error."""
        import torch

        try:
            state = torch.load(self.state_path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for truncated or foreign files
            raise CatdogError(f"run {self.path}: last.pt is damaged ({type(exc).__name__}: {str(exc)[:120]}); "
                              f"delete it and train again into a new --out") from None
        missing = {"epoch", "model", "optimizer", "scheduler", "history", "best"} - set(state or {})
        if missing:
            raise CatdogError(f"run {self.path}: last.pt is not a catdog training state (missing {sorted(missing)}); "
                              "delete it and train again into a new --out")
        return state

    def load_model(self, map_location: str = "cpu"):
        """The best checkpoint as a ``catdog.models.Network`` in eval mode, and the class names.

        torch is imported here, not at module level, so Ray workers that only need paths stay light.
        """
        from catdog import models

        summary, config = self.summary(), self.config()
        classes = summary["classes"]
        network = models.create(config.model.name, len(classes), pretrained="none", drop_rate=config.model.drop_rate,
                                cam_layer=config.model.cam_layer)
        models.load_weights(network, self.load_weights(map_location), f"run {self.path}: best.safetensors")
        return network.eval(), classes


def run_label(run_name: str, model: str) -> str:
    """How figures and tables name a run: its folder's name, plus its model's where they differ (a launch names
    each run after its model)."""
    return run_name if run_name == model else f"{run_name} ({model})"


def main(argv: list[str]) -> int:
    """``python -m catdog.run RUN STAGE``: exit 0 if complete, 1 if not; print the marker file."""
    if len(argv) != 2:
        print("usage: python -m catdog.run RUN STAGE", file=sys.stderr)
        return 2
    try:
        marker = RunDir(argv[0]).stage_marker(argv[1])
    except CatdogError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(marker)
    return 0 if marker.is_file() else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
