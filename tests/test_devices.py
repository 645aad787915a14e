import json
import os
import platform
import subprocess
import sys

import pytest

from catdog.devices import FREED_MEMORY_KEPT
from conftest import REPO

FAULTS = """
import json, resource, sys, torch
from catdog.devices import keep_freed_memory
tuned = sys.argv[1] == "tuned" and keep_freed_memory()
for _ in range(30):  # the heap grows a few times (1 to 5 seen) before its free chunks fit: warm it up until one fits
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(64 * 2**20, dtype=torch.uint8)  # 64 MiB, freed at once
    if resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < 1_000:
        break
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.ones(64 * 2**20, dtype=torch.uint8)  # 64 MiB, freed at once
print(json.dumps({"tuned": tuned, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def page_faults(mode: str, environment: dict | None = None) -> dict:
    result = subprocess.run([sys.executable, "-c", FAULTS, mode], cwd=REPO, capture_output=True, text=True, check=True,
                            env={**os.environ, **(environment or {})})
    return json.loads(result.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="keep_freed_memory tunes glibc's malloc")
def test_keep_freed_memory_stops_the_page_faults_of_large_tensors():
    """With glibc's defaults a freed 64 MiB tensor goes back to the kernel, and the next one faults in all of its
    16,384 pages again; after keep_freed_memory the memory is reused once the heap has grown to fit (how many times it
    grows first depends on where small allocations land, so the count starts after a warm-up), and glibc's
    environment variables named in FREED_MEMORY_KEPT (what bench/train.py gives timm's train.py) do the same for
    another process."""
    default, tuned = page_faults("default"), page_faults("tuned")
    by_environment = page_faults("default", {name: str(value) for name, value in FREED_MEMORY_KEPT.items()})
    assert not default["tuned"] and tuned["tuned"]
    assert default["faults"] >= 10 * 16_000
    assert tuned["faults"] <= 2 * 16_384  # at most the heap growing once more
    assert by_environment["faults"] <= 2 * 16_384
