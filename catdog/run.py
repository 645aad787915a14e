"""The run directory: where one trained model's stages read and write (see README, "Run directory")."""
from __future__ import annotations

import os
from pathlib import Path

from catdog.config import Config, load_config
from catdog.errors import CatdogError
from catdog.io import read_json


class RunDir:
    """Paths of one run, and loading of its trained model."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

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

    def stage(self, name: str) -> Path:
        """Folder of a later stage (``features``, ``forest``, ``sweep``, ``topact``)."""
        return self.path / name

    def config(self) -> Config:
        if not self.config_path.is_file():
            raise CatdogError(f"run {self.path}: no config.yaml (is this a directory written by jobs/train.py?)")
        return load_config(self.config_path)

    def summary(self) -> dict:
        if not self.summary_path.is_file():
            raise CatdogError(f"run {self.path}: no summary.json; train it first "
                              f"(accelerate launch jobs/train.py ... --out {self.path}, or --resume)")
        return read_json(self.summary_path)

    def load_model(self, map_location: str = "cpu"):
        """The best checkpoint as a ``catdog.models.Network`` in eval mode, and the class names.

        torch is imported here, not at module level, so Ray workers that only need paths stay light.
        """
        from safetensors.torch import load_file

        from catdog import models

        summary, config = self.summary(), self.config()
        if not self.best_checkpoint.is_file():
            raise CatdogError(f"run {self.path}: summary.json exists but best.safetensors is missing")
        classes = summary["classes"]
        network = models.create(config.model.name, len(classes), pretrained="none", drop_rate=config.model.drop_rate)
        network.load_state_dict(load_file(self.best_checkpoint, device=str(map_location)))
        return network.eval(), classes
