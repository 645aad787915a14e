"""Device choices shared by the jobs that run a network: precision, CPU threads and the CPU allocator."""
from __future__ import annotations

import ctypes
import os
import platform
import uuid
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DataLoaderConfiguration, broadcast_object_list, gather_object

from catdog.errors import CatdogError


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
FREED_MEMORY_KEPT = {"MALLOC_MMAP_MAX_": 0, "MALLOC_TRIM_THRESHOLD_": 2**31 - 1}
"""The glibc malloc settings of ``keep_freed_memory``, by the names of their environment variables (how a process
that is not catdog's, such as timm's train.py in ``bench/train.py``, gets the same)."""
MALLOPT_PARAMETERS = {"MALLOC_MMAP_MAX_": -4, "MALLOC_TRIM_THRESHOLD_": -1}  # M_MMAP_MAX, M_TRIM_THRESHOLD (malloc.h)


def autocast(device_type: str, precision: str) -> torch.autocast:
    """Autocast for a resolved precision (``no``, ``bf16``, ``fp16``) outside Accelerate's own loop."""
    return torch.autocast(device_type, dtype=AUTOCAST_DTYPES.get(precision), enabled=precision in AUTOCAST_DTYPES)


def resolve_mixed_precision(setting: str, on_cpu: bool) -> str:
    """``auto``: bf16 where the hardware runs it fast (AMX/AVX512-BF16 CPUs, Ampere+ GPUs), fp16 on older GPUs,
    else full precision (on CPUs without bf16 units autocast only adds conversions: measured slower here). On an
    AVX512-BF16 CPU without AMX the training step is about as fast either way, and evaluation faster in bf16
    (docs/performance.md, "The allocator")."""
    if setting != "auto":
        return setting
    if on_cpu:
        fast_bf16 = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
        return "bf16" if fast_bf16 else "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def keep_freed_memory() -> bool:
    """Make glibc's malloc serve every allocation from its heap and keep what is freed, as Intel's advice to preload
    jemalloc or tcmalloc for PyTorch on CPUs does. Otherwise each tensor over 32 MiB (an early activation at batch
    32 and 224 px) is mapped and unmapped at every step, and the kernel zeroes each of its pages again on first
    touch: Lite0's full fine-tuning step in fp32 ran 1.87x faster with these settings, the default recipe's 1.16x
    (``bench/malloc.py``). Returns whether the C library took the settings (False where it is not glibc)."""
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    return all([libc.mallopt(MALLOPT_PARAMETERS[name], value) == 1 for name, value in FREED_MEMORY_KEPT.items()])


def inference_device(name: str | None = None) -> torch.device:
    """The device of a job that runs a network outside Accelerate (Grad-CAM, predict, compare): ``name``, else the
    GPU when there is one, else the CPU, where ``keep_freed_memory`` applies as in ``accelerator_for``."""
    device = torch.device(name) if name is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        keep_freed_memory()
    return device


def use_cpu_cores(accelerator: Accelerator, threads: int | None = None) -> None:
    """On the CPU, give each local process its share of the cores, or ``threads`` when given.

    ``accelerate launch`` sets OMP_NUM_THREADS=1 for every process, which leaves cores idle on a CPU run.
    """
    if accelerator.device.type != "cpu":
        return
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // local_processes))


def accelerator_for(precision_setting: str, force_cpu: bool, cpu_threads: int | None = None,
                    log_with: str | None = None, project_dir: Path | None = None) -> tuple[Accelerator, str]:
    """The job's ``Accelerator`` (the CPU when asked or when there is no GPU; then with ``keep_freed_memory`` and
    ``use_cpu_cores``) and the precision it resolved to; ``log_with`` names a tracker writing under ``project_dir``.

    Accelerate keeps one precision per process; the one a job before this one chose (``train`` then
    ``extract`` in one notebook or test session) is forgotten first. The process group itself stays.
    """
    use_cpu = force_cpu or not torch.cuda.is_available()
    precision = resolve_mixed_precision(precision_setting, use_cpu)
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(cpu=use_cpu, mixed_precision=precision, log_with=log_with, project_dir=project_dir,
                              dataloader_config=DataLoaderConfiguration(non_blocking=True))  # copies overlap compute
    if use_cpu:
        keep_freed_memory()
    use_cpu_cores(accelerator, cpu_threads)
    return accelerator, precision


def require_shared_folder(accelerator: Accelerator, folder: Path, flag: str) -> None:
    """With processes on several machines, every one must see ``folder`` (the run directory) at the same path:
    the main process writes a probe file there and each process looks for it. One that cannot see it makes every
    process stop with the same one-line error, rather than a traceback on a worker later."""
    if int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes)) == accelerator.num_processes:
        return  # one machine
    probe = [None]
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        probe = [f".catdog-shared-{uuid.uuid4().hex}"]
        (folder / probe[0]).touch()
    broadcast_object_list(probe)
    seen = gather_object([(accelerator.process_index, (folder / probe[0]).is_file())])
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (folder / probe[0]).unlink()
    blind = [rank for rank, ok in seen if not ok]
    if blind:
        raise CatdogError(f"{flag} {folder}: not visible from process(es) {blind} on another machine; every machine "
                          "must see the run directory at the same path (a shared filesystem such as NFS)")
