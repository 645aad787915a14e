"""Extract pooled features and spatial maps of every image into the run's HDF5 feature store.

    python jobs/extract.py --run RUN_DIR --data DATA_ROOT
    python jobs/extract.py --run RUN_DIR --data DATA_ROOT extract.splits=[train] extract.spatial=false
    accelerate launch --multi_gpu --num_processes N jobs/extract.py --run RUN_DIR --data DATA_ROOT

With N processes (GPUs, or CPU processes where there is no GPU) each writes its share of the shards.

Writes RUN_DIR/features/{manifest.json, <split>-<nnnn>.h5, config.yaml}. A killed extraction, run again,
writes only the missing shards; a store from another checkpoint is refused unless --overwrite. Shards already
there are checked against manifest.json (size and HDF5 header; the full sha256 with --verify) and rewritten
when damaged.
"""
from catdog.cli import config_from, parser, run_job
from catdog.extract import extract
from catdog.run import RunDir


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--run", required=True, help="run directory written by jobs/train.py")
    p.add_argument("--data", required=True, help="data root with train/, test/, val/ class folders")
    p.add_argument("--overwrite", action="store_true", help="rebuild the store from scratch")
    p.add_argument("--verify", action="store_true",
                   help="check the full sha256 of the shards already there (reads them all), not only size and header")
    args = p.parse_args()
    run = RunDir(args.run)
    config = config_from(args, fallback=str(run.config_path))
    with run.writer("extract"):
        extract(config, run.path, args.data, overwrite=args.overwrite, verify=args.verify)


if __name__ == "__main__":
    run_job(main)
