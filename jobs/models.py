"""List the registered models, and whether their ImageNet weights can be had on this machine.

    python jobs/models.py                       # every model
    python jobs/models.py --available NAME ...  # print only the names whose weights are available
"""
from catdog import models
from catdog.cli import parser, run_job


def main() -> None:
    p = parser(__doc__, overrides=False)
    p.add_argument("--available", nargs="+", metavar="NAME", help="print those of NAME whose weights are available")
    args = p.parse_args()
    if args.available:
        print(" ".join(n for n in args.available if models.imagenet_weights_available(n)))
        return
    for name in models.list_models():
        spec = models.get_spec(name)
        where = "bundled" if spec.bundled_weights else ("reachable" if models.imagenet_weights_available(name)
                                                         else "offline: pass model.pretrained=FILE")
        print(f"{name:20s} {spec.source}:{spec.arch:24s} {spec.feature_dim:5d}-d  weights {where}")


if __name__ == "__main__":
    run_job(main)
