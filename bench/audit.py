"""The data audit against known answers: a copy of the shared photos with seeded label flips, injected cross-split
copies and injected non-photos; precision and recall of what the audit lists.

    python bench/audit.py --run RUN [--data ../shared/data/cats_vs_dogs] [--work /tmp/catdog-bench-audit]
    python bench/audit.py --scale 10000; python bench/audit.py --scale 40000     # time and memory against N
    python bench/audit.py --scale 40000 --exact-rows 0 [--subspace 32]   # the HNSW graph at any N; realistic spread

RUN: a run whose feature store was extracted from --data (e.g. Lite0 trained for one epoch, then jobs/extract.py).
The copy goes to WORK/data (never into the repository): ``--flip`` (2%) of the train images moved to another class's
folder (seeded); resized and re-encoded copies (and two byte-for-byte ones) of other train images put into test and
val; flat colours, noise and text/drawings put into train. Only the injected images are extracted (with RUN's model,
into WORK/injected_run); every other image's features are RUN's own (extraction depends on the image alone, not on
its folder), merged into WORK/run's store in the copy's row order. Then jobs/audit.py's ``audit`` runs on WORK/run.

Caveat: RUN was trained on the unflipped labels, so its features have not fitted the flips (training on the flipped
copy would make them harder to find). Prints, for each kind, precision and recall of the listed set, and the targets:
recall >= 0.9 of the flips in the first 2 x flips rows of label_issues.csv, every injected copy in duplicates.csv,
every non-photo in the top 1% of outliers.
"""
import argparse
import csv
import resource
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from catdog.audit import audit
from catdog.data import find_classes, list_samples
from catdog.extract import extract
from catdog.io import read_json
from catdog.run import RunDir
from catdog.store import FeatureStore, ShardInfo, ShardWriter, read_shard, shard_attrs, shard_name, write_manifest


def flip_labels(data: Path, classes: list[str], fraction: float, rng: np.random.Generator) -> dict[str, str]:
    """Move ``fraction`` of the train images into another class's folder; returns {new path: old path}."""
    train = sorted(p for p in (data / "train").glob("*/*") if p.is_file())
    flipped = {}
    for index in rng.choice(len(train), round(fraction * len(train)), replace=False):
        path = train[index]
        other = str(rng.choice([c for c in classes if c != path.parent.name]))
        dest = data / "train" / other / path.name
        path.rename(dest)
        flipped[dest.relative_to(data).as_posix()] = path.relative_to(data).as_posix()
    return flipped


def non_photo(kind: str, rng: np.random.Generator) -> Image.Image:
    """A flat colour, noise, or a drawing with text: pictures of neither class."""
    if kind == "flat":
        return Image.new("RGB", (400, 300), tuple(int(v) for v in rng.integers(0, 256, 3)))
    if kind == "noise":
        return Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8))
    image = Image.new("RGB", (400, 300), "white")
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y = rng.integers(0, 300), rng.integers(0, 200)
        draw.rectangle([x, y, x + rng.integers(20, 100), y + rng.integers(20, 100)], outline="black", width=3)
    draw.text((20, 20), "QUARTERLY REPORT 2024", fill="black")
    draw.line([(0, 299), (399, 0)], fill="blue", width=4)
    return image


def inject(data: Path, injected: Path, flipped: dict, rng: np.random.Generator) -> tuple[dict, list[str]]:
    """Copies of train images into test/val and non-photos into train, each written to ``data`` and to the
    ``injected`` root (the same layout, those images only). Returns {copy: source} and the non-photos."""
    classes = sorted(p.name for p in (data / "train").iterdir())
    copies, taken = {}, set(flipped) | set(flipped.values())
    for cls in classes:  # per class: one exact, two resized and two re-encoded copies, in test and val alike
        sources = sorted(p.relative_to(data).as_posix() for p in (data / "train" / cls).iterdir())
        sources = [s for s in sources if s not in taken]
        for n, index in enumerate(rng.choice(len(sources), 5, replace=False)):
            source, how = sources[index], ("exact", "resized", "resized", "reencoded", "reencoded")[n]
            copies[f"{('test', 'val')[n % 2]}/{cls}/copy-{how}.{Path(source).name}"] = (source, how)
    for copy, (source, how) in copies.items():
        for root in (data, injected):
            (root / copy).parent.mkdir(parents=True, exist_ok=True)
            if how == "exact":
                shutil.copy(data / source, root / copy)
                continue
            with Image.open(data / source) as image:
                if how == "resized":
                    image.resize((image.width * 2 // 3, image.height * 2 // 3), Image.BICUBIC).save(root / copy,
                                                                                                   quality=90)
                else:
                    image.save(root / copy, quality=35)
    drawn = []
    for n, kind in enumerate(["flat"] * 3 + ["noise"] * 3 + ["drawing"] * 3):
        path = f"train/{classes[n % len(classes)]}/nonphoto-{kind}.{n}.jpg"
        image = non_photo(kind, rng)
        for root in (data, injected):
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            image.save(root / path, quality=90)
        drawn.append(path)
    return {copy: source for copy, (source, _) in copies.items()}, drawn


def merged_store(base: FeatureStore, extra: FeatureStore, data: Path, flipped: dict, out: Path) -> None:
    """A store of every image of ``data`` in its listing order: features from ``extra`` (the injected images) or
    ``base`` (the original path of a flipped one); no spatial maps."""
    features = {}
    for store in (base, extra):
        for split in store.splits:
            for shard in store.shards(split):
                arrays = read_shard(shard)
                features.update(zip(arrays["paths"], arrays["features"]))
    classes = base.classes
    attrs = {key: value for key, value in read_shard_attrs(base).items() if key not in ("split", "first_row", "rows")}
    attrs["spatial_shape"] = "null"
    shards = []
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test", "val"):
        samples = list_samples(data, split, classes)
        paths = [s.path.relative_to(data).as_posix() for s in samples]
        path = out / shard_name(split, 0)
        with ShardWriter(path, len(paths), base.feature_dim, None, shard_attrs(attrs, split, 0, len(paths))) as writer:
            writer.write(np.stack([features[flipped.get(p, p)] for p in paths]),
                         np.array([s.label for s in samples]), np.arange(len(paths)), paths)
        shards.append(ShardInfo.of_file(path, split, 0, len(paths)))
    write_manifest(out, {**{k: v for k, v in base.manifest.items() if k != "shards"}, "spatial_shape": None}, shards)


def read_shard_attrs(store: FeatureStore) -> dict:
    import h5py

    with h5py.File(store.shards(store.splits[0])[0], "r") as f:
        return {key: (value.item() if hasattr(value, "item") else value) for key, value in f.attrs.items()}


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _pr(listed: set, truth: set) -> str:
    hits = len(listed & truth)
    return (f"precision {hits / len(listed) if listed else float('nan'):.3f} ({hits}/{len(listed)}), "
            f"recall {hits / len(truth):.3f} ({hits}/{len(truth)})")


def scale(rows: int, work: Path, subspace: int | None = None, exact_rows: int | None = None, dim: int = 1280,
          seed: int = 0) -> None:
    """The audit's streamed parts on a synthetic store of ``rows`` rows (two classes, ``dim`` features, 1% of the
    labels flipped): seconds per image of each part and this process's peak resident memory. The spread around
    each class is isotropic noise (nearest neighbours all alike: the HNSW graph's worst case), or with ``subspace``
    mostly within a random subspace of that many dimensions (as a network's features are)."""
    from cleanlab.filter import find_label_issues

    from catdog.audit import nearest_neighbours, normalised_features, out_of_fold_probabilities, pooled_rows
    from catdog.config import AuditConfig

    rng, folder = np.random.default_rng(seed), work / f"store-{rows}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    shards, centres = [], rng.normal(size=(2, dim))
    basis = rng.normal(size=(subspace, dim)) / np.sqrt(subspace) if subspace else None
    for index, first in enumerate(range(0, rows, 1000)):
        count = min(1000, rows - first)
        labels = rng.integers(0, 2, count)
        noise = rng.normal(size=(count, dim))
        if subspace:
            noise = rng.normal(size=(count, subspace)) @ basis + 0.1 * noise
        features = (centres[labels] + 3 * noise).astype(np.float32)
        labels[rng.random(count) < 0.01] ^= 1
        path = folder / shard_name("train", index)
        with ShardWriter(path, count, dim, None, shard_attrs({}, "train", first, count)) as writer:
            writer.write(features, labels, np.arange(first, first + count),
                         [f"train/c/{i}.jpg" for i in range(first, first + count)])
        shards.append(ShardInfo.of_file(path, "train", first, count))
    write_manifest(folder, {"model": "synthetic", "checkpoint_sha256": "0", "classes": ["a", "b"], "feature_dim": dim,
                            "spatial_shape": None, "layer": "", "transform": "", "shard_size": 1000}, shards)
    cfg, seconds = AuditConfig(**({} if exact_rows is None else {"exact_rows": exact_rows})), {}
    start = time.perf_counter()
    store = FeatureStore(folder)
    pooled = pooled_rows([store])
    features = normalised_features([store], pooled, work / f"features-{rows}.npy")
    seconds["features"] = time.perf_counter() - start
    start = time.perf_counter()
    probabilities = out_of_fold_probabilities(features, [slice(0, dim)], pooled, cfg)
    find_label_issues(pooled.labels, probabilities, return_indices_ranked_by="self_confidence", n_jobs=1)
    seconds["cross_validation_and_cleanlab"] = time.perf_counter() - start
    start = time.perf_counter()
    nearest_neighbours(features, cfg.neighbours, cfg.block_rows, cfg.exact_rows)
    seconds["neighbours"] = time.perf_counter() - start
    (work / f"features-{rows}.npy").unlink()
    shutil.rmtree(folder)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    search = "exact" if rows <= cfg.exact_rows else "HNSW"
    print(f"{rows} rows x {dim}, {search} neighbours: "
          + ", ".join(f"{k} {v / rows * 1000:.3f} ms/image" for k, v in seconds.items())
          + f"; peak RSS {peak:.2f} GiB")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=int, help="instead: time the streamed parts on a synthetic store of this many rows")
    p.add_argument("--subspace", type=int, help="with --scale: the spread within a subspace of this many dimensions")
    p.add_argument("--run", type=Path, help="a run with a feature store extracted from --data")
    p.add_argument("--data", default=Path(__file__).resolve().parents[2] / "shared/data/cats_vs_dogs", type=Path)
    p.add_argument("--work", default=Path("/tmp/catdog-bench-audit"), type=Path)
    p.add_argument("--flip", default=0.02, type=float, help="share of train images whose label is flipped")
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("--exact-rows", type=int, help="exact neighbours up to this many rows, the HNSW graph above "
                   "(default audit.exact_rows; 0: always the graph)")
    args = p.parse_args()
    if args.scale:
        return scale(args.scale, args.work, args.subspace, args.exact_rows)
    if args.run is None:
        p.error("--run is required (or --scale ROWS)")
    rng = np.random.default_rng(args.seed)
    shutil.rmtree(args.work, ignore_errors=True)
    data, injected = args.work / "data", args.work / "injected"
    shutil.copytree(args.data, data)
    classes = find_classes(data)
    flipped = flip_labels(data, classes, args.flip, rng)
    copies, drawn = inject(data, injected, flipped, rng)
    for split in ("train", "test", "val"):  # the injected root needs every class folder of every split
        for cls in classes:
            (injected / split / cls).mkdir(parents=True, exist_ok=True)
    source = RunDir(args.run)
    config = source.config()
    config.extract.spatial = False
    if args.exact_rows is not None:
        config.audit.exact_rows = args.exact_rows
    extra_run, bench_run = args.work / "injected_run", args.work / "run"
    for folder in (extra_run, bench_run):
        folder.mkdir(parents=True)
        for name in ("config.yaml", "summary.json", "best.safetensors", "val_predictions.csv"):
            shutil.copy(source.path / name, folder / name)
    start = time.perf_counter()
    extract(config, extra_run, injected)
    extract_seconds = time.perf_counter() - start
    merged_store(FeatureStore(source.features_dir), FeatureStore(RunDir(extra_run).features_dir), data, flipped,
                 RunDir(bench_run).features_dir)
    start = time.perf_counter()
    summary = audit([bench_run], data, config)
    audit_seconds = time.perf_counter() - start
    run = RunDir(bench_run)
    labels = [r["path"] for r in _rows(run.audit_list("label_issues"))]
    outliers = [r["path"] for r in _rows(run.audit_list("outliers"))]
    duplicates = _rows(run.audit_list("duplicates"))
    found_copies = {(d["path"], d["duplicate_of"]) for d in duplicates}
    first = labels[:2 * len(flipped)]
    print(f"{summary['images']} images; {len(flipped)} train labels flipped, {len(copies)} copies injected into "
          f"test/val, {len(drawn)} non-photos into train; injected images extracted in {extract_seconds:.0f} s, "
          f"audit {audit_seconds:.0f} s ({summary['seconds']})")
    print(f"wrong labels, listed ({len(labels)}): {_pr(set(labels), set(flipped))}")
    print(f"wrong labels, first 2 x {len(flipped)} = {len(first)} listed: {_pr(set(first), set(flipped))} "
          f"[target recall >= 0.9]" + ("" if len(first) == 2 * len(flipped) else " (the list is shorter)"))
    print(f"copies (duplicates.csv, {len(duplicates)} pairs, {summary['counts']['cross_split_duplicates']} across "
          f"splits): {_pr({(d['path'], d['duplicate_of']) for d in duplicates if d['cross_split'] == 'True'}, set(copies.items()))} "
          f"[target: every injected copy]; missed: {sorted(set(copies.items()) - found_copies) or 'none'}")
    print(f"non-photos, top 1% of outliers ({len(outliers)}): {_pr(set(outliers), set(drawn))} "
          f"[target recall 1]; their ranks: {sorted(outliers.index(d) + 1 for d in drawn if d in outliers)}")
    similarity = sorted(float(d["score"]) for d in duplicates if (d["path"], d["duplicate_of"]) in set(copies.items())
                        and d["kind"] == "near")
    print(f"cosine of the injected near copies: {similarity}; threshold {summary['near_duplicate_cosine']}; "
          f"leak effect: {[(r['split'], r['accuracy'], r['accuracy_without_leaked']) for r in summary['leak_effect']]}")
    print(f"-> {run.audit_dir} (summary {read_json(run.audit_summary)['counts']})")


if __name__ == "__main__":
    main()
