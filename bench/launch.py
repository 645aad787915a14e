"""./launch.sh with two models against the two one-model launches, in one run: each launch's time per stage (from its
OUT/timings.tsv) and the ratio of the two-model launch to the sum of the one-model ones.

    python bench/launch.py --data ../shared/data/cats_vs_dogs --models efficientnet_lite0 mobilenetv2_100 \\
        --weights mobilenetv2_100=../shared/weights/mobilenetv2_100.safetensors [--per-class 100] [--set k=v ...]

The launches run one after another on a slice of DATA (``--per-class`` images of each class in train, half as many
in test and val, linked, not copied) with small settings (one epoch, a smaller Grad-CAM sample), so that the whole
comparison takes minutes; ``--set`` adds or overrides settings. The two-model launch does everything the one-model
launches do (its Grad-CAM stage covers both runs in one job, its report both runs) plus the comparison.
"""
from __future__ import annotations

import argparse
import csv
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from catdog.config import SPLITS
from catdog.data import IMAGE_SUFFIXES

REPO = Path(__file__).resolve().parents[1]
SMALL = ["optim.epochs=1", "gradcam.faithfulness_images=40", "gradcam.sanity_images_per_class=2",
         "concepts.passes=1"]


def slice_of(data: Path, per_class: int, into: Path) -> Path:
    """``per_class`` images of each class in train and half as many in test and val, as symbolic links."""
    for split in SPLITS:
        count = per_class if split == "train" else max(1, per_class // 2)
        for folder in sorted(p for p in (data / split).iterdir() if p.is_dir()):
            (into / split / folder.name).mkdir(parents=True)
            for image in sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)[:count]:
                (into / split / folder.name / image.name).symlink_to(image.resolve())
    return into


def launch(data: Path, out: Path, models: list[str], weights: list[str], sets: list[str]) -> dict[str, float]:
    """One ./launch.sh; its seconds per stage, and ``wall`` (the whole command, set-up and checks included)."""
    command = ["./launch.sh", "--data", str(data), "--out", str(out), "--models", *models]
    for pair in weights:
        if pair.split("=", 1)[0] in models:
            command += ["--weights", pair]
    for item in sets:
        command += ["--set", item]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    with open(out / "timings.tsv", newline="") as handle:
        stages = {row["stage"]: float(row["seconds"]) for row in csv.DictReader(handle, delimiter="\t")}
    return {**stages, "wall": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--models", nargs=2, required=True)
    p.add_argument("--weights", action="append", default=[], metavar="NAME=FILE")
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--set", action="append", default=[], dest="sets", metavar="section.key=value")
    args = p.parse_args()
    weights = [f"{pair.split('=', 1)[0]}={Path(pair.split('=', 1)[1]).resolve()}" for pair in args.weights]
    with tempfile.TemporaryDirectory(prefix="catdog-bench-launch-") as tmp:
        data = slice_of(args.data, args.per_class, Path(tmp) / "data")
        sets = SMALL + args.sets
        times = {model: launch(data, Path(tmp) / model, [model], weights, sets) for model in args.models}
        both = launch(data, Path(tmp) / "both", args.models, weights, sets)
        shutil.rmtree(Path(tmp) / "data")
    a, b = args.models
    print(f"{args.per_class} train images per class; settings: {' '.join(sets)}")
    print(f"{'stage':28s} {a + ' alone':>24s} {b + ' alone':>24s} {'both in one launch':>20s}")
    stages = [stage for stage in dict.fromkeys([*times[a], *times[b], *both]) if stage != "wall"] + ["wall"]
    for stage in stages:
        cells = [times[a].get(stage), times[b].get(stage), both.get(stage)]
        print(f"{stage:28s} " + " ".join(f"{'' if c is None else f'{c:.1f} s':>{w}s}" for c, w in zip(cells, (24, 24, 20))))
    summed = times[a]["wall"] + times[b]["wall"]
    compare = both.get("compare", 0.0)
    print(f"two-model launch / sum of the one-model launches: {both['wall'] / summed:.3f} "
          f"({both['wall']:.0f} s / {summed:.0f} s, wall time of each ./launch.sh); without its compare stage "
          f"({compare:.0f} s): {(both['wall'] - compare) / summed:.3f}")


if __name__ == "__main__":
    main()
