"""ROAD's imputation: grad-cam's NoisyLinearImputer against catdog.cam.LinearImputer (the same system, built in one
vectorised pass), on real photos with CAM-shaped masks, in one run: seconds each, the ratio, and whether every
imputed image is the same, bit for bit.

    python bench/road.py --data ../shared/data/cats_vs_dogs [--images 10] [--size 260]

Each mask removes the top 30% and then the top 10% (ROAD's default percentiles 70 and 90 in the Grad-CAM stage) of
a smooth map like a CAM: uniform noise on a 9 x 9 grid, upsampled bilinearly.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from pytorch_grad_cam.metrics.road import NoisyLinearImputer

from catdog.cam import LinearImputer, upsample
from catdog.data import IMAGE_SUFFIXES, load_rgb


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a data root with a val/ split")
    p.add_argument("--images", type=int, default=10)
    p.add_argument("--size", type=int, default=260, help="side of the images, in pixels (Lite2's input: 260)")
    args = p.parse_args()
    torch.set_num_threads(1)
    files = sorted(f for f in (Path(args.data) / "val").rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
    files = files[:: max(1, len(files) // args.images)][: args.images]
    rng = np.random.default_rng(0)
    seconds = {"grad-cam NoisyLinearImputer": 0.0, "catdog LinearImputer": 0.0}
    same = 0
    for path in files:
        image = torch.from_numpy(np.asarray(load_rgb(path).resize((args.size, args.size)), dtype=np.float32) / 255)
        image = image.permute(2, 0, 1).contiguous()
        cam = upsample(rng.random((1, 9, 9)), args.size)[0]
        for removed in (0.3, 0.1):
            mask = torch.from_numpy((cam < np.quantile(cam, 1 - removed)).astype(np.float32))
            outputs = []
            for (name, imputer) in zip(seconds, (NoisyLinearImputer(), LinearImputer())):
                torch.manual_seed(0)
                start = time.perf_counter()
                outputs.append(imputer(image, mask))
                seconds[name] += time.perf_counter() - start
            same += torch.equal(*outputs)
    runs = 2 * len(files)
    print(f"{len(files)} photos of {args.data}/val at {args.size} px, top 30% and top 10% of a CAM-shaped map imputed")
    for name, total in seconds.items():
        print(f"{name:28s}: {total:6.1f} s ({total / runs:.2f} s per image)")
    print(f"ratio (grad-cam / catdog): {seconds['grad-cam NoisyLinearImputer'] / seconds['catdog LinearImputer']:.2f}; "
          f"identical imputed images: {same} of {runs}")


if __name__ == "__main__":
    main()
