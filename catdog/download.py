"""Resumable, verified download of a file over HTTP(S), and of the PetImages archive (for users who are online)."""
from __future__ import annotations

import os
import urllib.error
import urllib.request
import zipfile
from pathlib import Path


from catdog.errors import CatdogError
from catdog.io import file_sha256
from catdog.progress import progress_bar

PETIMAGES_URL = ("https://download.microsoft.com/download/3/E/1/3E1C3F21-ECDB-4869-8368-6DEBA77B919F/"
                 "kagglecatsanddogs_5340.zip")


def download(url: str, dest: str | os.PathLike, sha256: str | None = None, size: int | None = None,
             timeout: float = 30.0) -> Path:
    """Download ``url`` to ``dest``, resuming a partial ``dest.part`` with an HTTP Range request.

    The file is renamed to ``dest`` only once its size (``size``, else the server's) and, when given,
    its ``sha256`` match. A finished ``dest`` that verifies is not downloaded again.
    """
    dest = Path(dest)
    if dest.exists() and (sha256 is None or file_sha256(dest) == sha256) and (size is None or dest.stat().st_size == size):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code != 416:  # 416: the partial file is already complete
            raise CatdogError(f"download {url}: HTTP {exc.code} {exc.reason}") from None
        response = None
    except (urllib.error.URLError, OSError) as exc:
        raise CatdogError(f"download {url}: {getattr(exc, 'reason', exc)}. Offline? Download it on another machine, "
                          f"copy it to {dest}, and run again") from None
    if response is not None:
        with response:
            resumed = response.status == 206
            if not resumed:
                have = 0
            total = size or (int(response.headers["Content-Length"]) + have if response.headers.get("Content-Length")
                             else None)
            with open(part, "ab" if resumed else "wb") as out, progress_bar(
                    total=total, initial=have, unit="B", unit_scale=True, desc=dest.name) as bar:
                for block in iter(lambda: response.read(1 << 20), b""):
                    out.write(block)
                    bar.update(len(block))
        size = size or total
    got = part.stat().st_size
    if size is not None and got != size:
        raise CatdogError(f"download {url}: got {got} bytes, expected {size}; run again to resume")
    if sha256 is not None and file_sha256(part) != sha256:
        part.unlink()
        raise CatdogError(f"download {url}: checksum mismatch (expected sha256 {sha256}); the partial file was removed")
    os.replace(part, dest)
    return dest


def fetch_petimages(cache: str | os.PathLike, url: str = PETIMAGES_URL) -> Path:
    """Download (resumably) and unpack the PetImages archive into ``cache``; returns the PetImages folder."""
    cache = Path(cache)
    archive = download(url, cache / Path(url).name)
    folder = cache / "PetImages"
    if not folder.is_dir():
        try:
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(cache / "unpacking")
        except zipfile.BadZipFile:
            raise CatdogError(f"{archive}: not a valid zip archive; delete it and run again") from None
        (cache / "unpacking" / "PetImages").rename(folder)
    return folder
