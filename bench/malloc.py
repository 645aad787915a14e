"""How much of a CPU training step goes to page faults, with glibc's default allocator and with the settings
every catdog job uses on the CPU (``catdog.devices.keep_freed_memory``)?

    python bench/malloc.py [--model efficientnet_lite0] [--freeze 0] [--precision no|bf16] [--batch 32]
                           [--steps 6] [--rounds 2]

Times the same training step (forward, backward, Adam step; channels_last; random init, ready tensors) in two
fresh processes per round, one with glibc's defaults and one after ``keep_freed_memory()``, alternating their
order, and prints images/s, the system CPU seconds and the minor page faults of each (from ``getrusage``), then the
ratio of the best rates. The settings cannot be undone inside one process, hence the subprocesses.
"""
import argparse
import json
import resource
import subprocess
import sys

import torch

from catdog.devices import keep_freed_memory
from precision import ready_step, step_rate  # bench/precision.py, beside this script (sys.path[0])

ALLOCATORS = ("glibc defaults", "keep_freed_memory")


def child(args) -> None:
    """One measurement, printed as a JSON line."""
    tuned = args.child == ALLOCATORS[1] and keep_freed_memory()
    network, optimizer, images, labels = ready_step(args.model, args.freeze, args.batch, args.size)
    step_rate(network, optimizer, images, labels, args.precision, 2)  # warm-up: first allocations, Adam's state
    before = resource.getrusage(resource.RUSAGE_SELF)
    rate = step_rate(network, optimizer, images, labels, args.precision, args.steps)
    after = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"tuned": bool(tuned), "rate": rate, "system_seconds": after.ru_stime - before.ru_stime,
                      "user_seconds": after.ru_utime - before.ru_utime,
                      "page_faults": after.ru_minflt - before.ru_minflt}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--freeze", type=int, default=0)
    p.add_argument("--precision", choices=["no", "bf16"], default="no")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--child", choices=ALLOCATORS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    results: dict[str, list[dict]] = {name: [] for name in ALLOCATORS}
    for round_ in range(args.rounds):
        for name in ALLOCATORS if round_ % 2 == 0 else ALLOCATORS[::-1]:
            command = [sys.executable, __file__, *sys.argv[1:], "--child", name]
            results[name].append(json.loads(subprocess.run(command, check=True, capture_output=True,
                                                           text=True).stdout.splitlines()[-1]))
    print(f"{args.model}, {args.freeze} stages frozen, precision {args.precision}, batch {args.batch}, {args.size} "
          f"px, {torch.get_num_threads()} threads; {args.steps} steps per process, best of {args.rounds} round(s)")
    best = {}
    for name, runs in results.items():
        best[name] = max(run["rate"] for run in runs)
        steps = args.steps
        print(f"{name:18s}: {best[name]:5.1f} images/s; per step, every round: "
              + ", ".join(f"{run['rate']:.1f} images/s ({run['system_seconds'] / steps:.2f} s system, "
                          f"{run['user_seconds'] / steps:.2f} s user, {run['page_faults'] // steps} page faults)"
                          for run in runs)
              + ("" if name == ALLOCATORS[0] or all(run["tuned"] for run in runs) else "  (not glibc: no change)"))
    print(f"keep_freed_memory / glibc defaults = {best[ALLOCATORS[1]] / best[ALLOCATORS[0]]:.2f}")


if __name__ == "__main__":
    main()
