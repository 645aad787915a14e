"""Is bf16 autocast faster than fp32 for a training step on this machine? (what ``mixed_precision: auto`` decides)

    python bench/precision.py [--model efficientnet_lite0] [--freeze 4] [--batch 32] [--steps 4] [--rounds 3]

Times the same training step (forward, backward, Adam step; channels_last) on the same ready tensors in fp32
and under bf16 autocast, alternating rounds so that a busy machine slows both alike, and prints images/s and
the ratio, next to what ``catdog.devices.resolve_mixed_precision('auto')`` picks here. The allocator is set up as
in every catdog job on the CPU (``catdog.devices.keep_freed_memory``).
"""
import argparse
import time

import torch

from catdog import models
from catdog.devices import autocast, keep_freed_memory, resolve_mixed_precision


def step_rate(network, optimizer, images, labels, precision: str, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        with autocast("cpu", precision):
            loss = torch.nn.functional.cross_entropy(network(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return steps * len(labels) / (time.perf_counter() - start)


def ready_step(model: str, freeze: int, batch: int, size: int) -> tuple:
    """A random-init network in channels_last with ``freeze`` stages frozen, its Adam optimizer, and one ready
    batch: what the step is timed on."""
    torch.manual_seed(0)
    network = models.create(model, 2, pretrained="none", freeze_stages=freeze).train()
    network = network.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam([q for q in network.parameters() if q.requires_grad], lr=1e-4)
    images = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    return network, optimizer, images, torch.randint(0, 2, (batch,))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--freeze", type=int, default=4)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    keep_freed_memory()
    network, optimizer, images, labels = ready_step(args.model, args.freeze, args.batch, args.size)
    rates = {"no": [], "bf16": []}
    step_rate(network, optimizer, images, labels, "no", 1)  # warm-up
    step_rate(network, optimizer, images, labels, "bf16", 1)
    for _ in range(args.rounds):
        for precision in rates:
            rates[precision].append(step_rate(network, optimizer, images, labels, precision, args.steps))
    best = {precision: max(values) for precision, values in rates.items()}
    print(f"{args.model}, {args.freeze} stages frozen, batch {args.batch}, {args.size} px, "
          f"{torch.get_num_threads()} threads; best of {args.rounds} rounds of {args.steps} steps")
    print(f"fp32: {best['no']:.1f} images/s   bf16 autocast: {best['bf16']:.1f} images/s   "
          f"bf16/fp32 = {best['bf16'] / best['no']:.2f}")
    print(f"AMX {torch.cpu._is_amx_tile_supported()}, AVX512-BF16 {torch.cpu._is_avx512_bf16_supported()}: "
          f"mixed_precision auto picks {resolve_mixed_precision('auto', on_cpu=True)!r}")


if __name__ == "__main__":
    main()
