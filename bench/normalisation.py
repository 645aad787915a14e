"""Which input normalisation do the bundled EfficientNet-Lite0 ImageNet weights expect?

    python bench/normalisation.py --data ../shared/data/cats_vs_dogs [--split test] [--limit 1000]

timm's ``tf_efficientnet_lite0`` config says mean = std = 0.5; the seed used ImageNet's statistics. Without
any fine-tuning, the 1000-class ImageNet head is scored zero-shot on a cat/dog split under each: an image
counts as right when the summed probability of ImageNet's cat classes (281-285) or dog classes (151-268)
favours its label. The normalisation the weights were trained with scores clearly higher. Also prints the
top-1 ImageNet class of scikit-image's cat photo (when scikit-image is installed) under each.
"""
import argparse

import torch
from torch.utils.data import DataLoader, Subset

from catdog import models
from catdog.config import DataConfig
from catdog.data import build_transform, find_classes
from catdog.splits import open_split

CANDIDATES = {"imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), "inception (0.5, 0.5)": ((0.5,) * 3, (0.5,) * 3)}
IMAGENET_CATS, IMAGENET_DOGS = range(281, 286), range(151, 269)


@torch.inference_mode()
def zero_shot(network, data_root, split, data: DataConfig, limit: int) -> tuple[float, float, int]:
    """Cat/dog accuracy of the ImageNet head and the mean probability it puts on cats + dogs at all."""
    classes = find_classes(data_root)
    dataset = open_split(data_root, split, data, classes=classes)
    rows = torch.linspace(0, len(dataset) - 1, min(limit, len(dataset))).long().tolist()
    correct = mass = 0.0
    for images, labels, _ in DataLoader(Subset(dataset, rows), batch_size=64, num_workers=2):
        probs = network(images).softmax(-1)
        cat, dog = probs[:, list(IMAGENET_CATS)].sum(1), probs[:, list(IMAGENET_DOGS)].sum(1)
        predicted = (dog > cat).long()
        if classes != ["cat", "dog"]:
            raise SystemExit(f"expected classes ['cat', 'dog'], got {classes}")
        correct += (predicted == labels).sum().item()
        mass += (cat + dog).sum().item()
    return correct / len(rows), mass / len(rows), len(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=1000)
    args = p.parse_args()
    network = models.imagenet_backbone("efficientnet_lite0").eval()
    for name, (mean, std) in CANDIDATES.items():
        data = models.data_config("efficientnet_lite0", DataConfig(mean=mean, std=std))
        line = f"{name:22s}"
        try:
            from PIL import Image
            from skimage.data import chelsea

            with torch.inference_mode():
                top = network(build_transform(data, train=False)(Image.fromarray(chelsea()))[None]).softmax(-1).max(1)
            line += f" chelsea: class {top.indices.item()} p={top.values.item():.3f};"
        except ImportError:
            pass
        accuracy, mass, n = zero_shot(network, args.data, args.split, data, args.limit)
        print(f"{line} zero-shot cat/dog on {n} {args.split} images: {accuracy:.2%}, "
              f"mean probability on cat+dog classes {mass:.3f}", flush=True)


if __name__ == "__main__":
    main()
