"""What every job shares: ``--config`` plus ``key=value`` overrides, checked output folders, and one-line errors
with exit code 2."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable

from catdog.config import Config, load_config
from catdog.errors import CatdogError


def parser(description: str, overrides: bool = True) -> argparse.ArgumentParser:
    """An argument parser that keeps the usage examples' line breaks, with ``--config FILE`` and trailing
    ``section.key=value`` overrides (unless ``overrides`` is False, for jobs without a config)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    if overrides:
        p.add_argument("--config", help="YAML config (see configs/); defaults apply when omitted")
        p.add_argument("overrides", nargs="*", metavar="section.key=value",
                       help="config overrides, e.g. optim.lr=3e-4")
    return p


def config_from(args: argparse.Namespace, fallback: str | None = None) -> Config:
    """The config named by ``--config`` (else ``fallback``, e.g. a run's own config.yaml) with overrides applied."""
    if args.config is None and fallback is not None and not Path(fallback).is_file():
        raise CatdogError(f"run {Path(fallback).parent}: no config.yaml; give a run directory written by "
                          "jobs/train.py (or --config FILE)")
    return load_config(args.config or fallback, args.overrides)


def writable_dir(path: str | os.PathLike, flag: str) -> Path:
    """``path`` as a folder this job can write: it is one already, or it can be made. Nothing is created here.

    Checked by writing a probe file into the nearest existing folder, because permission bits alone do not
    tell (root ignores them; a read-only mount does not).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CatdogError(f"{flag} {path}: is an existing file, not a folder; give a folder (created if missing)")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise CatdogError(f"{flag} {path}: {existing} is a file, so the folder cannot be made; choose another path")
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".catdog-probe-"):
            pass
    except OSError as exc:
        raise CatdogError(f"{flag} {path}: cannot write in {existing} ({exc.strerror}); choose a folder you can "
                          "write, or fix its permissions") from None
    return path


def run_job(main: Callable[[], object]) -> None:
    """Run a job's ``main``: a ``CatdogError`` becomes one line, ``error: ...``, on stderr and exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        main()
    except CatdogError as exc:
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)
        sys.exit(2)
