"""Concepts from the feature store (CRAFT-style NMF of each class's spatial maps), with montages, importance
against a random baseline, and concept maps beside the Grad-CAM sample's CAMs.

    python jobs/concepts.py --run RUN_DIR [RUN_DIR ...] --data DATA_ROOT [--address HEAD:6379] [concepts.concepts=5]

Writes RUN_DIR/concepts/{index.json,config.yaml,<class>-c<n>.png,<class>-samples.png,parts/}. The work runs
as Ray tasks over the store's shards (sample, gather, per-class NMF fit, measure), for the shown classes
(figures.max_classes); --no-ray: in this process; a rerun reuses the classes already done.
"""
import contextlib

from catdog.cli import config_from, parser, refuse_overrides_in, run_job, writable_dir
from catdog.concepts import run_concepts
from catdog.run import RunDir


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--run", nargs="+", required=True, help="run directories with features/ (spatial maps)")
    p.add_argument("--data", required=True, help="the data root the features were extracted from")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else start a local Ray)")
    p.add_argument("--no-ray", action="store_true", help="run the per-class work in this process, one by one")
    args = p.parse_args()
    refuse_overrides_in(args.run, "--run")
    runs = [RunDir(writable_dir(path, "--run")) for path in args.run]
    config = config_from(args, fallback=str(runs[0].config_path))
    with contextlib.ExitStack() as held:
        for run in runs:
            held.enter_context(run.writer("concepts"))
        indexes = run_concepts([run.path for run in runs], args.data, config, address=args.address,
                               use_ray=not args.no_ray)
    for run in runs:
        index = indexes[str(run.path)]
        for class_name, entry in index["classes"].items():
            for concept in entry["concepts"]:
                print(f"{run.path} {class_name} concept {concept['concept']}: logit drop {concept['importance']:.3f} "
                      f"vs {concept['random_importance']:.3f} random (beats it on {concept['beats_random']:.0%} of "
                      f"{entry['importance_images']} {index['importance_split']} images)  -> {concept['montage']}")
            print(f"{run.path} {class_name}: {entry['images']} {index['split']} images, NMF relative error "
                  f"{entry['reconstruction_error']:.3f} (the computation of every pending class: {entry['seconds']:.0f} s, "
                  f"peak RSS {entry['peak_rss_mib']:.0f} MiB)  -> {entry['sample_figure']}")
        print(f"wrote {run.concepts_index}")


if __name__ == "__main__":
    run_job(main)
