"""Peak memory of a process and all its descendants (Ray's GCS, raylet and workers, DataLoader workers), sampled
every 50 ms in a thread: what bench/sweep.py and bench/topact_memory.py report. bench/scale.py samples a whole
session instead (its ``SessionSampler``), since Ray's processes there are not the job's descendants."""
from __future__ import annotations

import threading
import time

import psutil


def sample_tree(pid: int, stop: threading.Event, peaks: dict) -> None:
    """Until ``stop``: in ``peaks`` (MB) the peak of the tree's summed RSS (``rss``) and PSS (``pss``: shared pages
    split between the processes that map them), of its largest process (``largest``) and of ``pid``'s own RSS
    (``driver``)."""
    root = psutil.Process(pid)
    while not stop.is_set():
        try:
            processes = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        rss = pss = 0
        for process in processes:
            try:
                info = process.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            rss, pss = rss + info.rss, pss + info.pss
            peaks["largest"] = max(peaks.get("largest", 0), info.rss / 2**20)
            if process.pid == pid:
                peaks["driver"] = max(peaks.get("driver", 0), info.rss / 2**20)
        peaks["rss"] = max(peaks.get("rss", 0), rss / 2**20)
        peaks["pss"] = max(peaks.get("pss", 0), pss / 2**20)
        time.sleep(0.05)
