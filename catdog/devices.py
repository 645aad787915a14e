"""Device choices shared by the jobs that run a network: precision and CPU threads."""
from __future__ import annotations

import os

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device_type: str, precision: str) -> torch.autocast:
    """Autocast for a resolved precision (``no``, ``bf16``, ``fp16``) outside Accelerate's own loop."""
    return torch.autocast(device_type, dtype=AUTOCAST_DTYPES.get(precision), enabled=precision in AUTOCAST_DTYPES)


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


def accelerator_for(precision_setting: str, force_cpu: bool, cpu_threads: int | None = None) -> tuple[Accelerator, str]:
    """The job's ``Accelerator`` (the CPU when asked or when there is no GPU) and the precision it resolved to.

    Accelerate keeps one precision per process; the one a job before this one chose (``train`` then
    ``extract`` in one notebook or test session) is forgotten first. The process group itself stays.
    """
    use_cpu = force_cpu or not torch.cuda.is_available()
    precision = resolve_mixed_precision(precision_setting, use_cpu)
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(cpu=use_cpu, mixed_precision=precision)
    use_cpu_cores(accelerator, cpu_threads)
    return accelerator, precision
