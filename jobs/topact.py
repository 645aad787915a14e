"""For each class's top features, the training images that activate each most, as montages with spatial maps.

    python jobs/topact.py --run RUN_DIR --data DATA_ROOT [--address HEAD:6379] [topact.features_per_class=5]
    RAY_AUTH_MODE=token ray job submit --address http://HEAD:8265 -- python jobs/topact.py --run RUN_DIR --data DATA_ROOT

Search tasks read their shard where their node sees RUN_DIR, else get its bytes through the object store; only this
process reads DATA_ROOT (montage images travel through the object store, PNGs come back). index.json records the node
of each piece.
"""
from catdog.cli import config_from, parser, run_job, writable_dir
from catdog.run import RunDir
from catdog.topact import run_topact


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--run", required=True, help="run directory with features/ and forest/")
    p.add_argument("--data", required=True, help="the data root the features were extracted from")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else start a local Ray)")
    p.add_argument("--verify", action="store_true", help="check each shard's sha256, not only its size and header")
    args = p.parse_args()
    run = RunDir(writable_dir(args.run, "--run"))
    config = config_from(args, fallback=str(run.config_path))
    with run.writer("topact"):
        index = run_topact(run.path, args.data, config, address=args.address, verify=args.verify)
    for class_name, entries in index["classes"].items():
        for entry in entries:
            shares = ", ".join(f"{name} {100 * share:.0f}%" for name, share in entry["class_shares"].items())
            top = entry["images"][0]
            print(f"{class_name} #{entry['rank']}: feature {entry['feature']:>5}  top-{index['selectivity_top']} "
                  f"shares: {shares}  best: {top['activation']:.2f} {top['path']}  -> {entry['montage']}")
    print("work per node: " + ", ".join(f"{node} {n['shards']} shard(s) {n['montages']} montage(s)"
                                        for node, n in index["nodes"].items()))
    print(f"wrote {run.topact_index}")


if __name__ == "__main__":
    run_job(main)
