"""What every job shares: ``--config`` plus ``key=value`` overrides, and one-line errors with exit code 2."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from catdog.config import Config, load_config
from catdog.errors import CatdogError


def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with ``--config FILE`` and trailing ``section.key=value`` overrides."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", help="YAML config (see configs/); defaults apply when omitted")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, e.g. optim.lr=3e-4")
    return p


def config_from(args: argparse.Namespace, fallback: str | None = None) -> Config:
    """The config named by ``--config`` (else ``fallback``, e.g. a run's own config.yaml) with overrides applied."""
    return load_config(args.config or fallback, args.overrides)


def run_job(main: Callable[[], object]) -> None:
    """Run a job's ``main``: a ``CatdogError`` becomes ``error: ...`` on stderr and exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        main()
    except CatdogError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
