"""What every job shares: ``--config`` plus ``key=value`` overrides, checked output folders, and one-line errors
with exit code 2."""
from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, NoReturn

from catdog.config import Config, load_config, load_recipe
from catdog.errors import CatdogError
from catdog.io import TEXT_ERRORS
from catdog.run import RunDir


class _Parser(argparse.ArgumentParser):
    """argparse whose errors (an unknown option, a missing value, a value its type refuses) are a ``CatdogError``:
    one line ``error: ...`` naming the option, exit code 2, like every other mistake (plain argparse prints its
    usage, then ``prog: error: ...``)."""

    def error(self, message: str) -> NoReturn:
        raise CatdogError(f"{message} (see {self.prog} --help)")


def whole_number(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``minimum`` (a count of images, workers or processes)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= {minimum}; give {minimum} or more")
        return value
    return parse


def numbers(count: int) -> Callable[[str], tuple[float, ...]]:
    """An argparse type: ``count`` comma-separated numbers (e.g. ``0.8,0.1,0.1``); their range is checked where
    they are used."""
    def parse(text: str) -> tuple[float, ...]:
        try:
            values = tuple(float(x) for x in text.split(","))
        except ValueError:
            values = ()
        if len(values) != count:
            raise argparse.ArgumentTypeError(f"{text!r}: expected {count} comma-separated numbers")
        return values
    return parse


def parser(description: str, overrides: bool = True, recipes: bool = False) -> argparse.ArgumentParser:
    """An argument parser that keeps the usage examples' line breaks, with ``--config FILE`` and trailing
    ``section.key=value`` overrides (unless ``overrides`` is False, for jobs without a config); with ``recipes``,
    also ``--model NAME``: that model's recipe (``catdog.config.load_recipe``) instead of a config file."""
    p = _Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    if recipes:
        p.add_argument("--model", help="a model name: its recipe configs/<NAME>.yaml when catdog ships one, else the "
                                       "defaults with model.name=NAME (instead of --config)")
    if overrides:
        p.add_argument("--config", help="YAML config (see configs/); defaults apply when omitted")
        p.add_argument("overrides", nargs="*", metavar="section.key=value",
                       help="config overrides, e.g. optim.lr=3e-4")
    return p


def config_from(args: argparse.Namespace, fallback: str | None = None) -> Config:
    """The config named by ``--config`` or ``--model`` (else ``fallback``, e.g. a run's own config.yaml) with
    overrides applied."""
    if getattr(args, "model", None):
        if args.config:
            raise CatdogError(f"--model {args.model} and --config {args.config}: give one of them")
        return load_recipe(args.model, args.overrides)
    if args.config is None and fallback is not None and not Path(fallback).is_file():
        raise CatdogError(f"run {Path(fallback).parent}: no config.yaml; give a run directory written by "
                          "jobs/train.py (or --config FILE)")
    return load_config(args.config or fallback, args.overrides)


def refuse_overrides_in(values: list[str], flag: str) -> None:
    """A list option (``nargs="+"``) swallows the ``section.key=value`` overrides after it: name the first one."""
    misplaced = [value for value in values if "=" in value]
    if misplaced:
        raise CatdogError(f"{flag} {misplaced[0]}: looks like an override; put overrides before {flag}")


def parse_runs_into_out(p: argparse.ArgumentParser, runs: str, data: str, out: str) -> tuple[argparse.Namespace, Config]:
    """Jobs that read several runs and write one folder (gradcam, compare): ``--runs RUN... --data DATA --out OUT``,
    overrides before ``--runs``, and the config of ``--config`` else of the first run. Returns the arguments and it."""
    p.add_argument("--runs", nargs="+", required=True, help=runs)
    p.add_argument("--data", required=True, help=data)
    p.add_argument("--out", required=True, help=out)
    args = p.parse_args()
    refuse_overrides_in(args.runs, "--runs")
    writable_dir(args.out, "--out")
    return args, config_from(args, fallback=str(RunDir(args.runs[0]).config_path))


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


def _chain(exc: BaseException | None):
    """``exc`` and the exceptions it was raised from or during."""
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is a full disk or an exhausted quota. Not every writer
    raises ``OSError(ENOSPC)``: HDF5 and torch's zip writer raise RuntimeErrors that only quote it."""
    return any(getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(e)
               for e in _chain(exc))


def run_job(main: Callable[[], object], go_on: str = "run the same command again: finished work is kept") -> None:
    """Run a job's ``main``; what a user causes or meets ends in one line on stderr, without a traceback:
    a ``CatdogError`` (printed by the first process of a job of several), ``error: ...`` and exit code 2; a full
    disk, exit code 2, and Ctrl-C, exit code 130, each with ``go_on``, how to continue. Every artefact is written
    under a temporary name and renamed, so neither leaves a partial file under a final name."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if hasattr(sys.stdout, "reconfigure"):  # a file name that is not UTF-8 is printed as its own bytes, as ls does
        sys.stdout.reconfigure(errors=TEXT_ERRORS)
    try:
        main()
    except CatdogError as exc:
        if int(os.environ.get("RANK", "0")) == 0:  # every process of a job checks the same inputs: one line for all
            print("error: " + " ".join(str(exc).split()), file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"\nerror: interrupted (Ctrl-C); {go_on}", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        if not disk_full(exc):
            raise
        where = next((Path(e.filename).parent for e in _chain(exc) if getattr(e, "filename", None)), None)
        print(f"error: no space left on the device{f' writing in {where}' if where else ''} (the partial file was "
              f"removed); free some space (df -h), then {go_on}", file=sys.stderr)
        sys.exit(2)

