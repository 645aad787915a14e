"""Check what ./launch.sh is about to train before its first stage: every model name, override and weights file.

    python jobs/check.py [overrides] --models efficientnet_lite2 mobilenetv2_100 --weights mobilenetv2_100=FILE

Prints one line per model (its recipe and where its weights come from); any problem is one line, exit code 2.
"""
from catdog.cli import parser, refuse_overrides_in, run_job
from catdog.plan import parse_weights, plan


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--models", nargs="+", required=True, help="model names (a recipe configs/NAME.yaml, or any timm CNN)")
    p.add_argument("--weights", action="append", default=[], metavar="NAME=FILE",
                   help="a weights file for one of --models (repeatable)")
    args = p.parse_args()
    refuse_overrides_in(args.models, "--models")
    for _, line in plan(args.models, parse_weights(args.weights, args.models), args.overrides).values():
        print(line)


if __name__ == "__main__":
    run_job(main)
