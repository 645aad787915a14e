import json
import platform
import subprocess
import sys

import pytest

from conftest import REPO

FAULTS = """
import json, resource, sys, torch
from catdog.devices import keep_freed_memory
tuned = sys.argv[1] == "tuned" and keep_freed_memory()
torch.ones(64 * 2**20, dtype=torch.uint8)  # the first allocation of this size faults either way
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.ones(64 * 2**20, dtype=torch.uint8)  # 64 MiB, freed at once
print(json.dumps({"tuned": tuned, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def page_faults(mode: str) -> dict:
    result = subprocess.run([sys.executable, "-c", FAULTS, mode], cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="keep_freed_memory tunes glibc's malloc")
def test_keep_freed_memory_stops_the_page_faults_of_large_tensors():
    """With glibc's defaults a freed 64 MiB tensor goes back to the kernel, and the next one faults in all of its
    16,384 pages again; after keep_freed_memory the memory is reused."""
    default, tuned = page_faults("default"), page_faults("tuned")
    assert not default["tuned"] and tuned["tuned"]
    assert default["faults"] >= 10 * 16_000
    assert tuned["faults"] <= 2 * 16_384  # at most the heap growing once more
