"""Does decoding JPEGs at a reduced scale change a trained run's accuracy? Each image of a split decoded in full and as
catdog decodes it (``catdog.data.load_rgb`` with the image size: libjpeg's DCT scaling through PIL's draft mode, the
sides kept at least ``DRAFT_MIN_SIDE`` x the size), then the same resize, normalisation and network.

    python bench/decoding.py --run RUN_DIR --data DATA_ROOT [--split val] [--batch 64]

Prints how many images the reduced decoding changed, the accuracy of each decoding, the predictions that differ and
the verdict against issue 24's goal: the same accuracy within 0.1 point. Images too small for a reduced scale at the
run's size decode identically; a run at a smaller size (e.g. trained with ``data.image_size=112``) shows more of them.
The network runs in float32 without the mirror image: the accuracies compare the decodings, they are not the run's
recorded ``val_accuracy``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from catdog.cli import run_job
from catdog.data import DRAFT_MIN_SIDE, build_transform, find_classes, list_samples, load_rgb
from catdog.errors import CatdogError
from catdog.run import RunDir


class TwoDecodings(Dataset):
    """``(full, reduced, label, whether the reduced one is smaller)`` for each sample, both through ``transform``."""

    def __init__(self, samples, transform, size: int):
        self.samples, self.transform, self.size = samples, transform, size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        sample = self.samples[index]
        full, reduced = load_rgb(sample.path), load_rgb(sample.path, self.size)
        return self.transform(full), self.transform(reduced), sample.label, reduced.size != full.size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="trained run directory")
    p.add_argument("--data", required=True, help="data root with the run's classes")
    p.add_argument("--split", default="val")
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args()
    run = RunDir(args.run)
    config = run.config()
    network, classes = run.load_model()
    data_root = Path(args.data)
    if find_classes(data_root, (args.split,)) != classes:
        raise CatdogError(f"{data_root}/{args.split}: classes differ from the run's {classes}; give the data root "
                          "the run was trained on")
    samples = list_samples(data_root, args.split, classes)
    size = config.data.image_size
    loader = DataLoader(TwoDecodings(samples, build_transform(config.data, train=False), size),
                        batch_size=args.batch, num_workers=2)
    labels, smaller, predictions = [], [], {"full": [], "reduced": []}
    with torch.inference_mode():
        for full, reduced, label, was_smaller in loader:
            labels.append(label.numpy())
            smaller.append(was_smaller.numpy())
            predictions["full"].append(network(full).argmax(1).numpy())
            predictions["reduced"].append(network(reduced).argmax(1).numpy())
    labels, smaller = np.concatenate(labels), np.concatenate(smaller)
    predicted = {name: np.concatenate(batches) for name, batches in predictions.items()}
    accuracy = {name: 100 * float((values == labels).mean()) for name, values in predicted.items()}
    differ = int((predicted["full"] != predicted["reduced"]).sum())
    gap = abs(accuracy["full"] - accuracy["reduced"])
    print(f"{run.path} ({config.model.name}, {size} px), {len(labels)} {args.split} images of {data_root}: "
          f"{int(smaller.sum())} decoded at a reduced JPEG scale (sides >= {DRAFT_MIN_SIDE} x {size} px), the rest "
          "identically")
    print(f"accuracy, full decoding   : {accuracy['full']:.2f}%")
    print(f"accuracy, reduced decoding: {accuracy['reduced']:.2f}%")
    print(f"predictions that differ: {differ} of {len(labels)}; accuracy gap {gap:.2f} point(s): "
          f"{'PASS' if gap <= 0.1 else 'FAIL'} (goal <= 0.1)")


if __name__ == "__main__":
    run_job(main)
