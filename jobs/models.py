"""Which timm models catdog runs, and whether a model's ImageNet weights can be had on this machine.

    python jobs/models.py                           # the families known to work, and the bundled weights
    python jobs/models.py resnet50 convnext_tiny    # for each name: features, CAM layer, stages, weights
    python jobs/models.py --available NAME ...      # print only the names whose weights can be had (for scripts)

Any convolutional timm model works (``model.name``); transformers (tokens, no C x h x w map) are refused.
"""
from catdog import models
from catdog.cli import parser, run_job
from catdog.config import DataConfig

WHERE = {"bundled": "bundled with a Python package (offline)", "cached": "in the local Hugging Face cache",
         "hub": "downloadable from the Hugging Face hub", None: "cannot be had here: pass model.pretrained=FILE"}


def describe(name: str) -> str:
    network = models.create(name, num_classes=2, pretrained="none")
    data = models.data_config(name, DataConfig())
    return (f"{name}: timm {models.timm_name(name)}, {network.feature_dim}-d features, CAM layer "
            f"{network.cam_layer_name}, {len(network.stages)} stages, input {data.image_size} px {data.interpolation}, "
            f"mean {data.mean} std {data.std}; ImageNet weights {WHERE[models.weights_source(name)]}")


def main() -> None:
    p = parser(__doc__, overrides=False)
    p.add_argument("names", nargs="*", metavar="NAME", help="timm model names (or catdog aliases)")
    p.add_argument("--available", action="store_true", help="print only the NAMEs whose ImageNet weights can be had")
    args = p.parse_args()
    if args.available:
        print(" ".join(n for n in args.names if models.weights_source(n)))
        return
    if not args.names:
        print("families known to work (any convolutional timm model should):")
        for family, examples in models.KNOWN_FAMILIES.items():
            print(f"  {family:14s} {examples}")
        print("bundled ImageNet weights (work offline): " + ", ".join(models.BUNDLED_WEIGHTS)
              + "; aliases: " + ", ".join(f"{a} -> {t}" for a, t in models.ALIASES.items()))
    for name in args.names:
        print(describe(name))


if __name__ == "__main__":
    run_job(main)
