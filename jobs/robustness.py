"""Score the run's fine-tuned model and its linear probe on a labelled split, clean and under corruptions.

    python jobs/robustness.py --run RUN_DIR --data DATA_ROOT                     # DATA_ROOT/val
    python jobs/robustness.py --run RUN_DIR --data OTHER_ROOT --split test       # another collection's folder
    python jobs/robustness.py --run RUN_DIR --data DATA_ROOT data.eval_batch_size=128 train.cpu=true

Both models see every image of DATA_ROOT/SPLIT/<class>/ (the run's classes, no more, no fewer) clean and under
Gaussian noise, Gaussian blur, JPEG compression, brightness and contrast at ImageNet-C severity 3 (applied by
torchvision.transforms.v2.functional to the resized image before normalisation; the noise is seeded per image).
The linear probe is RUN_DIR/linear_probe.safetensors on the frozen pretrained backbone; a run without one is
scored alone. Writes RUN_DIR/robustness/config.yaml and, last and atomically, summary.json: per corruption the
accuracy of each model and fine-tuned minus probe, with the split, data root, image count and every parameter.
The clean accuracy is what jobs/predict.py --labelled DATA_ROOT/SPLIT reports (same inputs, batches, precision).
"""
from catdog.cli import config_from, parser, run_job, writable_dir
from catdog.errors import CatdogError
from catdog.robustness import robustness, table
from catdog.run import RunDir


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--run", required=True, help="run directory written by jobs/train.py")
    p.add_argument("--data", required=True, help="data root holding SPLIT/<class>/<image>")
    p.add_argument("--split", default="val", help="the folder of DATA_ROOT to score (default val)")
    args = p.parse_args()
    run = RunDir(args.run)
    if not run.path.is_dir():
        raise CatdogError(f"--run {run.path}: no such directory (give a run directory written by jobs/train.py)")
    writable_dir(run.robustness_dir, "--run")
    config = config_from(args, fallback=str(run.config_path))
    with run.writer("robustness"):
        summary = robustness(config, run.path, args.data, args.split)
    print(f"{summary['model']} on {summary['data']}/{summary['split']}: {summary['images']} image(s)"
          + (f", {len(summary['skipped'])} skipped (undecodable)" if summary["skipped"] else "")
          + f"; {summary['device']}, autocast {summary['precision']}")
    print(table(summary))
    if summary["below_linear_probe"]:
        print(f"fine-tuned below the linear probe on: {', '.join(summary['below_linear_probe'])}")
    print(f"wrote {run.robustness_summary}")


if __name__ == "__main__":
    run_job(main)
