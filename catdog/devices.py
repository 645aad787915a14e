"""Device choices shared by the jobs that run a network: precision and CPU threads."""
from __future__ import annotations

import os

import torch
from accelerate import Accelerator


def resolve_mixed_precision(setting: str, on_cpu: bool) -> str:
    """``auto``: bf16 where the hardware runs it fast (AMX/AVX512-BF16 CPUs, Ampere+ GPUs), fp16 on older GPUs,
    else full precision (on CPUs without bf16 units autocast only adds conversions: measured slower here)."""
    if setting != "auto":
        return setting
    if on_cpu:
        fast_bf16 = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
        return "bf16" if fast_bf16 else "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def use_cpu_cores(accelerator: Accelerator, threads: int | None = None) -> None:
    """On the CPU, give each local process its share of the cores, or ``threads`` when given.

    ``accelerate launch`` sets OMP_NUM_THREADS=1 for every process, which leaves cores idle on a CPU run.
    """
    if accelerator.device.type != "cpu":
        return
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // local_processes))
