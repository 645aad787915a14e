"""Progress bars that stay readable in a log file.

On a terminal this is plain tqdm. When stderr is not a terminal (``./launch.sh ... > log 2>&1``), tqdm's
carriage-return redraws would pile up into one enormous line, so each refresh becomes its own short line
instead, at most one every ``CATDOG_PROGRESS_SECONDS`` (default 10) seconds, plus the final one; work that
ends within one interval prints nothing.
"""
from __future__ import annotations

import os
import sys
from typing import Any, TextIO

from tqdm import tqdm


class _LineStream:
    """A stream for tqdm that turns each redraw (``\\r...``) into one line and drops the bar's erasures."""

    def __init__(self, stream: TextIO):
        self._stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line:
            self._stream.write(line + "\n")

    def flush(self) -> None:
        self._stream.flush()


def progress_bar(iterable=None, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)`` on a terminal; one line every few seconds otherwise."""
    stream = kwargs.get("file") or sys.stderr
    kwargs["file"] = stream
    if not stream.isatty():
        kwargs.setdefault("mininterval", float(os.environ.get("CATDOG_PROGRESS_SECONDS", 10)))
        kwargs.setdefault("maxinterval", kwargs["mininterval"])
        kwargs.setdefault("delay", kwargs["mininterval"])  # work shorter than one interval prints nothing
        kwargs.update(file=_LineStream(stream), ncols=100, dynamic_ncols=False, ascii=True)
    return tqdm(iterable, **kwargs)
