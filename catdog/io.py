"""Atomic file output: every artefact is written under a temporary name, then renamed into place; and the one rule
for file names in artefacts.

A file name is whatever bytes the file system allows, not necessarily UTF-8 (a photo copied from an old camera card
or another OS). Python lists such a name as a ``str`` with surrogate escapes (``os.fsdecode``); catdog keeps it
that way in memory and writes it losslessly: HDF5 stores its bytes (``path_to_bytes``, read back with
``path_from_bytes``), text artefacts (CSV) hold its bytes (``write_text`` and ``open_text`` use
``TEXT_ERRORS``), JSON holds ``\\udcxx`` escapes (``write_json``), and titles and pages
show ``printable_path``.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator, TextIO

_TEMP_NAME = re.compile(r"^\..+\.tmp-\d+$")
TEXT_ERRORS = "surrogateescape"
"""How text artefacts encode and decode: UTF-8, with a file name's bytes that are not UTF-8 written as they are."""


def path_to_bytes(path: str | os.PathLike) -> bytes:
    """A path as the file system's bytes (``os.fsencode``): how a name that is not UTF-8 is stored (HDF5)."""
    return os.fsencode(path)


def path_from_bytes(data: bytes) -> str:
    """The path ``path_to_bytes`` stored, as ``os.listdir`` gives it (bytes that are not UTF-8 as surrogate escapes)."""
    return os.fsdecode(data)


def printable_path(path: str | os.PathLike) -> str:
    """A path as text any font, page or terminal takes: bytes that are not UTF-8 shown as ``\\xe9`` (for titles and
    pages only: the artefacts keep the name itself)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def temp_path(path: str | os.PathLike, pid: int | None = None) -> Path:
    """The temporary sibling ``path`` is written under before it is renamed into place: ``.<name>.tmp-<pid>``
    (hidden, and named after the writing process so that two writers never share one)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid() if pid is None else pid}")


def is_temp_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` (or a bare file name) is a temporary file of ``temp_path``, e.g. left by a killed writer."""
    return bool(_TEMP_NAME.match(Path(path).name))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(path: str | os.PathLike) -> None:
    """Delete the temporary files of ``path`` whose writer no longer runs (a killed earlier run left them)."""
    path = Path(path)
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
        if is_temp_path(tmp) and not _alive(int(tmp.name.rsplit("-", 1)[1])):
            tmp.unlink(missing_ok=True)


def remove_stale_temps_in(folder: str | os.PathLike) -> None:
    """Delete every temporary file in ``folder`` whose writer no longer runs (a job killed mid-write left it)."""
    for tmp in Path(folder).glob(".*.tmp-*"):
        if is_temp_path(tmp) and not _alive(int(tmp.name.rsplit("-", 1)[1])):
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; rename it to ``path`` only if the block succeeds. Temporary files
    of ``path`` that a killed writer left behind are removed first, so a rerun leaves none."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        if exc.errno is not None and exc.filename is None:  # a failed write() (a full disk) names no file: name it
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(path: str | os.PathLike, data: bytes | memoryview) -> None:
    """``data`` to ``path`` atomically, written by Python: a full disk is an ``OSError(ENOSPC)`` that names itself.
    Writers in C++ or Rust (``torch.save``, safetensors' ``save_file``) serialise to bytes first and come here, since
    theirs report a full disk as a failed assertion."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """``text`` to ``path`` atomically, as UTF-8; a file name in it that is not UTF-8 is written as its own bytes."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", errors=TEXT_ERRORS)


def open_text(path: str | os.PathLike) -> TextIO:
    """Open a text artefact (a CSV) for reading as ``write_text`` wrote it: file names come back as they were."""
    return open(path, encoding="utf-8", errors=TEXT_ERRORS, newline="")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """``obj`` as JSON, atomically; ASCII, so a file name that is not UTF-8 is kept as ``\\udcxx`` escapes."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=True) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
