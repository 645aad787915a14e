"""The data audit (``jobs/audit.py``): wrong labels, pictures of no class, duplicates and leaks, from feature stores.

Every image of every split of one or more runs' feature stores (the same images: the runs were extracted from one
data root) is one row, in the stores' order (split, then row id). Three kinds of suspects:

* Wrong labels: out-of-fold probabilities of a K-fold cross-validated logistic regression on the pooled features
  (averaged over the runs), ranked by cleanlab (``find_label_issues``, ``get_label_quality_scores``). A row's fold
  is a hash of its path; each fold's regression is fitted on one seeded stratified sample of at most
  ``audit.fit_rows`` rows (those of the other folds) and predicts its own fold's rows block by block, so memory is
  bounded by the sample, not N. cleanlab then holds the (N, K) probabilities: N x K x 4 bytes.
* Outliers: the mean cosine distance to each image's ``audit.neighbours`` nearest neighbours (cleanlab's
  ``OutOfDistribution`` score before its exponential): L2-normalised features (every run's, each scaled by
  1/sqrt(runs), so a dot product is the runs' mean cosine) in a float32 array file on disk, read block by block
  into a faiss index: exact for small N, an HNSW graph above (``nearest_neighbours``), so the time per image stays
  nearly flat as N grows.
* Duplicates: exact ones by the sha256 of the file bytes, near ones by feature cosine >= ``audit.near_duplicate_cosine``
  among the same neighbours; within and across splits. A test or val image with a copy in train is leaked: each
  run's test and val accuracy is given with and without the leaked images.

Beside each suspect the runs' own probability of its given label: val from ``RUN/val_predictions.csv`` (exactly as
training evaluated, with its TTA), train and test from the run's head applied to its stored features (no TTA).
Outputs in the first run's ``audit/`` (``catdog.run.RunDir``), each CSV most suspicious first with ``path`` relative
to the data root, so any of them is a ``data.exclude`` file or a ``jobs/prepare.py --quarantine`` list.
"""
from __future__ import annotations

import csv
import hashlib
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from catdog.config import SPLITS, AuditConfig, Config, save_config
from catdog.errors import CatdogError
from catdog.io import file_sha256, open_text, read_json, remove_stale_temps_in, temp_path, write_json, write_text
from catdog.progress import progress_bar
from catdog.run import RunDir, run_label
from catdog.sampling import stratified_rows
from catdog.store import FeatureStore

KINDS = ("label_issues", "outliers", "duplicates")
"""The three suspect lists, each ``RUN/audit/<kind>.csv``."""
COLUMNS = ["path", "split", "given_label", "suggested_label", "score"]
"""The columns every suspect list starts with; ``score``: higher is more suspicious."""
MODEL_PROBABILITY = "model_p_given_"
"""Per-run columns ``model_p_given_<run>``: that run's probability of the given label (blank where unknown)."""


# ---------------------------------------------------------------------------------------------------- the rows

@dataclass
class Rows:
    """Every image of the stores, in their shared order: its split, given label and path (relative to the data).
    An image the extraction could not decode is not one (``FeatureStore.readable``: its features are zeros)."""

    splits: list[str]
    split_of: np.ndarray
    """(N,) index into ``splits``."""
    labels: np.ndarray
    paths: list[str]
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def pooled_rows(stores: list[FeatureStore]) -> Rows:
    """The readable rows of the first store, checked to be those of every other one (same classes, splits, paths
    and readable rows: ``iter_shards`` reads each store by its own)."""
    first = stores[0]
    splits = [s for s in SPLITS if s in first.splits] + [s for s in first.splits if s not in SPLITS]
    split_of, labels, paths = [], [], []
    for index, split in enumerate(splits):
        split_paths, readable = first.paths(split), first.readable(split)
        for other in stores[1:]:
            if other.classes != first.classes or split not in other.splits or other.paths(split) != split_paths:
                raise CatdogError(f"feature stores {first.path} and {other.path} hold other images or classes "
                                  f"(split {split}); audit runs extracted from the same data root")
            if not np.array_equal(other.readable(split), readable):
                raise CatdogError(f"feature stores {first.path} and {other.path} could not decode the same images "
                                  f"(split {split}); audit runs extracted from the same data root with the same "
                                  "data settings (data.max_image_pixels)")
        split_of.append(np.full(int(readable.sum()), index, dtype=np.int8))
        labels.append(first.labels(split)[readable])
        paths += [path for path, keep in zip(split_paths, readable) if keep]
    return Rows(splits, np.concatenate(split_of), np.concatenate(labels), paths, first.classes)


def iter_shards(store: FeatureStore, splits: list[str]):
    """``(first, features)`` of each shard's readable rows (``FeatureStore.shard_readable``), ``first`` the place of
    the first in ``pooled_rows``'s order, one shard in memory at a time."""
    import h5py

    first = 0
    for split in splits:
        for info in store.shard_infos(split):
            readable = store.shard_readable(info)
            with h5py.File(store.path / info.file, "r") as f:
                yield first, f["features"][:][readable]
            first += int(readable.sum())


def fold_of(paths: list[str], folds: int, seed: int) -> np.ndarray:
    """Each row's cross-validation fold: a hash of its path and the seed (stable when images are added)."""
    return np.array([int.from_bytes(hashlib.sha256(f"{seed}:{p}".encode()).digest()[:8], "big") % folds
                     for p in paths], dtype=np.int16)


# ---------------------------------------------------------------------------------------------------- features

class FeatureFile:
    """A float32 (N, D) ``.npy`` file read a block at a time: each read maps the file, copies what it asks for and
    unmaps it, so the process holds one block, not the pages of every block read so far (a memory map kept open
    would keep them: N x D x 4 bytes, counted in its resident memory)."""

    def __init__(self, path: Path):
        self.path = path
        self.shape = np.load(path, mmap_mode="r").shape

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        return np.array(np.load(self.path, mmap_mode="r")[key])  # the map is gone with the expression


def normalised_features(stores: list[FeatureStore], rows: Rows, path: Path) -> FeatureFile:
    """Every store's features, L2-normalised and scaled by 1/sqrt(stores), side by side in a float32 array file at
    ``path``, read back block by block (``FeatureFile``): a row's dot product with another is the stores' mean
    cosine. Written shard by shard, the file mapped for each shard alone."""
    dims = [store.feature_dim for store in stores]
    np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(len(rows), sum(dims)))  # header and size
    scale = 1 / math.sqrt(len(stores))
    column = 0
    for store, dim in zip(stores, dims):
        for first, features in iter_shards(store, rows.splits):
            norms = np.linalg.norm(features, axis=1, keepdims=True)
            array = np.load(path, mmap_mode="r+")
            array[first:first + len(features), column:column + dim] = features / np.maximum(norms, 1e-12) * scale
            array.flush()
            del array
        column += dim
    return FeatureFile(path)


def out_of_fold_probabilities(features: np.ndarray | FeatureFile, columns: list[slice], rows: Rows,
                              cfg: AuditConfig) -> np.ndarray:
    """(N, K) out-of-fold probabilities of a standardised logistic regression, averaged over the runs' ``columns``
    of ``features``. Each fold's model is fitted on the rows of one stratified sample (``stratified_rows``,
    ``audit.fit_rows``) outside that fold and predicts its fold block by block."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classes = len(rows.classes)
    folds = fold_of(rows.paths, cfg.folds, cfg.seed)
    sample = stratified_rows(rows.labels, cfg.fit_rows, cfg.seed)
    probabilities = np.zeros((len(rows), classes), dtype=np.float32)
    for cols in columns:
        sample_x = np.asarray(features[sample, cols])  # one read of the sample's rows
        models = []
        for fold in range(cfg.folds):
            fit = folds[sample] != fold
            model = make_pipeline(StandardScaler(), LogisticRegression(C=cfg.logistic_c, max_iter=1000))
            models.append(model.fit(sample_x[fit], rows.labels[sample][fit]))
        for start in range(0, len(rows), cfg.block_rows):
            stop = min(start + cfg.block_rows, len(rows))
            block = np.asarray(features[start:stop, cols])
            for fold, model in enumerate(models):
                inside = np.flatnonzero(folds[start:stop] == fold)
                if inside.size:
                    probabilities[start + inside[:, None], model[-1].classes_[None]] += (
                        model.predict_proba(block[inside]) / len(columns))
    return probabilities


HNSW_LINKS = 32
"""Links per node of the HNSW graph (memory: 2 x this x 4 bytes per row at its base layer)."""
HNSW_EF_CONSTRUCTION = 64
"""Candidates each insertion explores: more, a better graph and a slower build."""
HNSW_EF_SEARCH = 128
"""Candidates each query explores (at least k + 1): more, higher recall and a slower search."""


def nearest_neighbours(features: np.ndarray, k: int, block_rows: int,
                       exact_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``k`` most similar other rows (dot products of the normalised features): ``(similarity, index)``,
    both (N, k), most similar first; the similarities are exact float32 dot products.

    Up to ``exact_rows`` rows: exact (``faiss.IndexFlatIP``). Above: approximate, an HNSW graph
    (``faiss.IndexHNSWFlat``, inner product), because its insertions and queries each visit O(log N) nodes, so the
    time per image stays nearly flat as N grows, needs no training, and takes rows block by block. (An inverted-file
    index with sqrt(N) lists scans a share of rows that grows as sqrt(N) per query and needs k-means first.) The
    index holds every row, the one structure of all N rows: a graph search must reach any of them (N x (4 D + 8 x
    ``HNSW_LINKS``) bytes: 5.4 GB for 1M Lite0 rows, twice that for two runs' features side by side). Rows go in and
    queries go out ``block_rows`` at a time from ``features`` (an array or a ``FeatureFile``); faiss's threads are
    this process's CPUs."""
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its INFO lines list every build it tried
    import faiss

    faiss.omp_set_num_threads(len(os.sched_getaffinity(0)))
    n, dim = features.shape
    k = min(k, n - 1)
    if n <= exact_rows:
        index = faiss.IndexFlatIP(dim)
    else:
        index = faiss.IndexHNSWFlat(dim, HNSW_LINKS, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index.hnsw.efSearch = max(HNSW_EF_SEARCH, k + 1)
    blocks = [(start, min(start + block_rows, n)) for start in range(0, n, block_rows)]
    with progress_bar(total=n, desc="neighbour index", unit="img") as bar:
        for start, stop in blocks:
            index.add(np.ascontiguousarray(features[start:stop], dtype=np.float32))
            bar.update(stop - start)
    best_sim = np.empty((n, k), dtype=np.float32)
    best_idx = np.empty((n, k), dtype=np.int64)
    with progress_bar(total=n, desc="neighbours", unit="img") as bar:
        for start, stop in blocks:
            sim, idx = index.search(np.ascontiguousarray(features[start:stop], dtype=np.float32), k + 1)
            other = idx != np.arange(start, stop)[:, None]  # the query's own row is not its neighbour
            other[other.all(axis=1), -1] = False  # own row not returned (a tie with a copy): drop the last
            best_sim[start:stop] = sim[other].reshape(-1, k)
            best_idx[start:stop] = idx[other].reshape(-1, k)
            bar.update(stop - start)
    return best_sim, best_idx


# ---------------------------------------------------------------------------------------------------- duplicates

def content_hashes(data_root: Path, paths: list[str]) -> list[str]:
    """The sha256 of each image file's bytes, one file at a time."""
    return [file_sha256(data_root / p) for p in progress_bar(paths, desc="hashes", unit="img")]


def duplicate_pairs(rows: Rows, hashes: list[str], similarity: np.ndarray, neighbours: np.ndarray,
                    threshold: float) -> list[dict]:
    """Pairs of copies: exact (same bytes) and near (cosine >= ``threshold``), each once. ``listed`` is the member
    to leave out (the test or val copy of a train image, the later split's, else the later path), ``kept`` the
    other; exact pairs first, then by similarity."""
    pairs: dict[tuple[int, int], dict] = {}
    first_with: dict[str, int] = {}
    for i, digest in enumerate(hashes):
        if digest in first_with:
            pairs[(first_with[digest], i)] = {"kind": "exact", "similarity": 1.0}
        else:
            first_with[digest] = i
    for i, j in zip(*np.nonzero(similarity >= threshold)):
        a, b = sorted((int(i), int(neighbours[i, j])))
        pairs.setdefault((a, b), {"kind": "near", "similarity": float(similarity[i, j])})
    out = []
    for (a, b), pair in pairs.items():
        kept, listed = sorted((a, b), key=lambda r: (rows.split_of[r], rows.paths[r]))
        out.append({**pair, "kept": kept, "listed": listed})
    return sorted(out, key=lambda p: (p["kind"] != "exact", -p["similarity"], rows.paths[p["listed"]]))


# ---------------------------------------------------------------------------------------------------- the models

@dataclass
class ModelView:
    """One run's own predictions for every row: its probability of the given label and its predicted class."""

    name: str
    p_given: np.ndarray
    predicted: np.ndarray
    source: dict
    """Per split: where the numbers come from."""


def model_view(run: RunDir, store: FeatureStore, rows: Rows) -> ModelView:
    """The run's head on its stored features for every row, then val from ``val_predictions.csv`` (the evaluation
    itself, with its TTA) where it lists the image."""
    import torch

    network, _ = run.load_model()
    head = network.head.float().eval()
    p_given = np.empty(len(rows), dtype=np.float32)
    predicted = np.empty(len(rows), dtype=np.int64)
    with torch.inference_mode():
        for first, features in iter_shards(store, rows.splits):
            probs = head(torch.from_numpy(features).float()).softmax(dim=1).numpy()
            span = slice(first, first + len(features))
            p_given[span] = probs[np.arange(len(probs)), rows.labels[span]]
            predicted[span] = probs.argmax(axis=1)
    source = {split: "the run's head on its stored features (no TTA)" for split in rows.splits}
    if run.val_predictions_path.is_file() and "val" in rows.splits:
        where = {rows.paths[i]: i for i in np.flatnonzero(rows.split_of == rows.splits.index("val"))}
        with open_text(run.val_predictions_path) as handle:
            for record in csv.DictReader(handle):
                i = where.get(record["path"])
                if i is not None:
                    p_given[i] = float(record["p_" + rows.classes[rows.labels[i]]])
                    predicted[i] = rows.classes.index(record["predicted"])
        source["val"] = f"{run.val_predictions_path.name} (as training evaluated it)"
    return ModelView(run.path.name, p_given, predicted, source)


def leak_effect(rows: Rows, leaked: np.ndarray, views: list[ModelView]) -> list[dict]:
    """Each run's accuracy on test and val, with every image and without the ``leaked`` ones (boolean, (N,))."""
    table = []
    for view in views:
        for split in ("test", "val"):
            if split not in rows.splits:
                continue
            members = rows.split_of == rows.splits.index(split)
            right = view.predicted == rows.labels
            clean = members & ~leaked
            table.append({"run": view.name, "split": split, "images": int(members.sum()),
                          "leaked": int((members & leaked).sum()), "accuracy": float(right[members].mean()),
                          "accuracy_without_leaked": float(right[clean].mean()) if clean.any() else None,
                          "source": view.source[split]})
    return table


# ---------------------------------------------------------------------------------------------------- outputs

def _record(rows: Rows, i: int, suggested: int, score: float, views: list[ModelView], **extra) -> dict:
    record = {"path": rows.paths[i], "split": rows.splits[rows.split_of[i]],
              "given_label": rows.classes[rows.labels[i]], "suggested_label": rows.classes[suggested],
              "score": round(float(score), 6), **extra}
    record.update({MODEL_PROBABILITY + v.name: round(float(v.p_given[i]), 6) for v in views})
    return record


def suspects_figure(runs: list[RunDir], data_root: Path, suspects: list[dict], path: Path) -> None:
    """The suspects (``{path, kind, given_label, suggested_label, score}``) with every run's Grad-CAM for the class
    it predicts (``catdog.cam``): one row per suspect, one column per run."""
    import torch

    from catdog.cam import class_activation_maps, display_photo, draw_grid
    from catdog.data import build_transform, load_rgb
    from catdog.devices import inference_device

    device, columns = inference_device(), []
    for run in runs:
        config, (network, classes) = run.config(), run.load_model()
        network = network.to(device)
        transform = build_transform(config.data, train=False)
        images = torch.stack([transform(load_rgb(data_root / s["path"], config.data.image_size)) for s in suspects])
        images = images.to(device)
        with torch.no_grad():
            probs = network(images).softmax(dim=1).cpu()
        targets = probs.argmax(dim=1)
        columns.append({"title": run_label(run.path.name, config.model.name), "maps": class_activation_maps(
            network, "gradcam", images, targets), "predictions": [
            {"predicted": classes[int(t)], "probability": float(p[t]), "label": s["given_label"]}
            for t, p, s in zip(targets, probs, suspects)]})
    photos = [display_photo(data_root / s["path"]) for s in suspects]
    titles = [f"{s['kind']}: {Path(s['path']).name}\ngiven {s['given_label']}, suggested {s['suggested_label']}, "
              f"score {s['score']:.3f}" for s in suspects]
    draw_grid(photos, titles, columns, path)


def completed_summary(run_paths: list[str | os.PathLike]) -> Path | None:
    """The first run's ``audit/summary.json`` when it exists and covers exactly these runs, else None."""
    path = RunDir(run_paths[0]).audit_summary
    if not path.is_file():
        return None
    covered = [Path(r).resolve() for r in read_json(path)["runs"]]
    return path if covered == [Path(r).resolve() for r in run_paths] else None


def audit(run_paths: list[str | os.PathLike], data_root: str | os.PathLike, config: Config) -> dict:
    """Audit the data of ``run_paths``' feature stores (extracted from ``data_root``); write the first run's
    ``audit/`` (label_issues.csv, outliers.csv, duplicates.csv, suspects.png, config.yaml, summary.json last)."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    from catdog.predict import csv_text

    cfg, data_root = config.audit, Path(data_root)
    runs = [RunDir(p) for p in run_paths]
    if not data_root.is_dir():
        raise CatdogError(f"data root {data_root}: no such directory; pass the --data root the runs were extracted "
                          "from")
    if len({run.path.resolve() for run in runs}) != len(runs):
        raise CatdogError("--run: each run once")
    stores = [FeatureStore(run.features_dir) for run in runs]
    rows = pooled_rows(stores)
    if len(rows) < 2 * cfg.folds:
        raise CatdogError(f"feature store {stores[0].path}: {len(rows)} images, too few for audit.folds={cfg.folds}")
    out = runs[0].audit_dir
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps_in(out)
    seconds, start = {}, time.perf_counter()

    def lap(name: str) -> None:
        nonlocal start
        seconds[name] = round(time.perf_counter() - start, 2)
        start = time.perf_counter()

    features_file = temp_path(out / "features.npy")
    try:
        features = normalised_features(stores, rows, features_file)
        lap("features")
        columns, first = [], 0
        for store in stores:
            columns.append(slice(first, first + store.feature_dim))
            first += store.feature_dim
        probabilities = out_of_fold_probabilities(features, columns, rows, cfg)
        lap("cross_validation")
        similarity, neighbours = nearest_neighbours(features, cfg.neighbours, cfg.block_rows, cfg.exact_rows)
        lap("neighbours")
    finally:
        features_file.unlink(missing_ok=True)
    ranked = find_label_issues(rows.labels, probabilities, return_indices_ranked_by="self_confidence", n_jobs=1)
    quality = get_label_quality_scores(rows.labels, probabilities)
    outlier_score = 1 - similarity.mean(axis=1)
    hashes = content_hashes(data_root, rows.paths)
    pairs = duplicate_pairs(rows, hashes, similarity, neighbours, cfg.near_duplicate_cosine)
    lap("cleanlab_and_duplicates")
    views = [model_view(run, store, rows) for run, store in zip(runs, stores)]
    lap("models")

    suggested = probabilities.argmax(axis=1)
    label_records = [_record(rows, i, suggested[i], 1 - quality[i], views, label_quality=round(float(quality[i]), 6),
                             oof_p_given=round(float(probabilities[i, rows.labels[i]]), 6)) for i in ranked]
    listed = max(1, math.ceil(cfg.outlier_fraction * len(rows)))
    order = np.argsort(-outlier_score, kind="stable")[:listed]
    outlier_records = [_record(rows, i, suggested[i], outlier_score[i], views,
                               oof_confidence=round(float(probabilities[i].max()), 6)) for i in order]
    train = rows.splits.index("train") if "train" in rows.splits else -1
    leaked = np.zeros(len(rows), dtype=bool)
    duplicate_records = []
    for pair in pairs:
        kept, i = pair["kept"], pair["listed"]
        cross = rows.split_of[kept] != rows.split_of[i]
        if rows.split_of[kept] == train and cross:
            leaked[i] = True
        duplicate_records.append(_record(rows, i, rows.labels[kept], pair["similarity"], views, kind=pair["kind"],
                                         cross_split=bool(cross), duplicate_of=rows.paths[kept],
                                         duplicate_split=rows.splits[rows.split_of[kept]]))
    model_columns = [MODEL_PROBABILITY + v.name for v in views]
    extra = {"label_issues": ["label_quality", "oof_p_given"], "outliers": ["oof_confidence"],
             "duplicates": ["kind", "cross_split", "duplicate_of", "duplicate_split"]}
    lists = dict(zip(KINDS, (label_records, outlier_records, duplicate_records)))
    for kind, records in lists.items():
        write_text(runs[0].audit_list(kind), csv_text(records, COLUMNS + extra[kind] + model_columns))
    suspects = [{**record, "kind": kind} for kind, records in lists.items()
                for record in records[:cfg.suspects_per_kind]]
    if suspects:
        suspects_figure(runs, data_root, suspects, runs[0].audit_suspects_plot)
    lap("figure")
    summary = {
        "runs": [str(run.path) for run in runs],
        "data": str(data_root.resolve()),
        "images": len(rows),
        "images_per_split": {split: int((rows.split_of == s).sum()) for s, split in enumerate(rows.splits)},
        "classes": rows.classes,
        "counts": {
            "label_issues": len(label_records),
            "outliers": len(outlier_records),
            "duplicates": len(duplicate_records),
            "exact_duplicates": sum(p["kind"] == "exact" for p in pairs),
            "near_duplicates": sum(p["kind"] == "near" for p in pairs),
            "cross_split_duplicates": sum(r["cross_split"] for r in duplicate_records),
            "leaked": {split: int((leaked & (rows.split_of == s)).sum()) for s, split in enumerate(rows.splits)
                       if split != "train"},
        },
        "cross_validation": {"folds": cfg.folds, "fit_rows": int(min(cfg.fit_rows, len(rows))),
                             "accuracy": float((suggested == rows.labels).mean())},
        "outlier_score": f"mean cosine distance to the {similarity.shape[1]} nearest images (features averaged over "
                         f"the runs); the top {cfg.outlier_fraction:.1%} are listed",
        "near_duplicate_cosine": cfg.near_duplicate_cosine,
        "model_probability": {v.name: v.source for v in views},
        "leak_effect": leak_effect(rows, leaked, views),
        "top": {kind: [{key: record[key] for key in COLUMNS} for record in records[:10]]
                for kind, records in lists.items()},
        "suspects_plot": runs[0].audit_suspects_plot.name if suspects else None,
        "suspects": [{key: s[key] for key in ["kind", *COLUMNS]} for s in suspects],
        "seconds": seconds,
        "seconds_per_image": round(sum(seconds.values()) / len(rows), 6),
    }
    save_config(config, out / "config.yaml")
    write_json(runs[0].audit_summary, summary)  # last: marks the stage complete
    return summary


if __name__ == "__main__":  # python -m catdog.audit RUN...: exit 0 when the first run's audit covers these runs
    import sys

    done = completed_summary(sys.argv[1:])
    print(done or RunDir(sys.argv[1]).audit_summary)
    sys.exit(0 if done else 1)
