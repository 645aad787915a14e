"""Fine-tune an ImageNet CNN on an ImageFolder data root.

    accelerate launch jobs/train.py --config configs/efficientnet_lite0.yaml --data DATA_ROOT --out RUN_DIR
    python jobs/train.py --model efficientnet_lite2 --data DATA_ROOT --out RUN_DIR     # a model's own recipe
    accelerate launch jobs/train.py --out RUN_DIR --data DATA_ROOT --resume       # continue a killed run
    accelerate launch --multi_gpu --num_processes 2 jobs/train.py ...             # 2 processes (GPUs, or the CPU)
"""
from catdog.cli import config_from, parser, run_job, writable_dir
from catdog.run import RunDir
from catdog.train import train


def main() -> None:
    p = parser(__doc__, recipes=True)
    p.add_argument("--data", required=True, help="data root with train/, test/, val/ class folders")
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--resume", action="store_true", help="continue from the run's last completed epoch")
    args = p.parse_args()
    run = RunDir(writable_dir(args.out, "--out"))
    fallback = str(run.config_path) if args.resume and run.config_path.exists() else None
    train(config_from(args, fallback), args.data, args.out, resume=args.resume)


if __name__ == "__main__":
    run_job(main, go_on="continue with the same command plus --resume: the last completed epoch is kept")
