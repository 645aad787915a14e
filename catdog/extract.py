"""Feature extraction: every image of the configured splits through the trained network, into the HDF5 store.

Each image is decoded by DataLoader workers with the eval transform, passed through ``net.spatial`` and
``net.pool`` in batches (inference mode, channels_last, BatchNorms folded into their convolutions, autocast
where it helps) and written batch by batch into its shard, so memory stays flat however large the dataset.
Under ``accelerate launch`` the missing shards are dealt round-robin to the processes, each writing its own.
Shards appear under their final name only when complete: a rerun writes only the missing ones, after
checking that the complete ones come from the same checkpoint, settings and images; the main process then
writes ``manifest.json``.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torch.utils.data import ConcatDataset, DataLoader
from tqdm import tqdm

from catdog.config import Config, ExtractConfig, save_config
from catdog.data import ImageDataset, find_classes, open_split
from catdog.devices import resolve_mixed_precision, use_cpu_cores
from catdog.errors import CatdogError
from catdog.io import file_sha256
from catdog.models import Network
from catdog.run import RunDir
from catdog.store import MANIFEST, ShardInfo, ShardWriter, shard_name, write_manifest

SHARD_FILE = re.compile(r"^[^.].*-\d{4}\.h5$")
TEMP_FILE = re.compile(r"^\..*\.tmp-\d+$")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
PER_RUN_ATTRS = ("split", "first_row", "rows")
"""Shard attributes that differ between the shards of one store; all others must match."""
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardTask:
    """One shard to write: rows ``[first_row, first_row + rows)`` of a split."""

    split: str
    index: int
    first_row: int
    rows: int

    @property
    def file(self) -> str:
        return shard_name(self.split, self.index)


def plan_shards(split_sizes: dict[str, int], shard_size: int) -> list[ShardTask]:
    """Every shard of every split, in split order then row order."""
    if shard_size < 1:
        raise CatdogError(f"extract.shard_size: must be at least 1 (got {shard_size})")
    return [ShardTask(split, index, first, min(shard_size, size - first))
            for split, size in split_sizes.items()
            for index, first in enumerate(range(0, size, shard_size))]


def deal(tasks: list[ShardTask], rank: int, world: int) -> list[ShardTask]:
    """This process's share of the shards still to write: every ``world``-th, starting at ``rank``."""
    return tasks[rank::world]


def batch_plan(tasks: list[ShardTask], offsets: dict[str, int], batch_size: int) -> list[tuple[ShardTask, list[int]]]:
    """Batches of indices into the concatenated splits, cut at shard ends so no batch spans two shards."""
    batches = []
    for task in tasks:
        start = offsets[task.split] + task.first_row
        for first in range(start, start + task.rows, batch_size):
            batches.append((task, list(range(first, min(first + batch_size, start + task.rows)))))
    return batches


def attr_conflict(found: dict, expected: dict) -> str | None:
    """The first store-wide attribute whose value differs, as ``key``, or None when they all agree."""
    for key, value in expected.items():
        if key not in PER_RUN_ATTRS and found.get(key) != value:
            return key
    return None


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


def _read_attrs(path: Path) -> dict:
    try:
        with h5py.File(path, "r") as f:
            return {key: _plain(value) for key, value in f.attrs.items()}
    except OSError as exc:
        raise CatdogError(f"feature store {path.parent}: {path.name} cannot be read as HDF5 ({exc}); "
                          "delete it or pass --overwrite") from None


def _refuse(folder: Path, what: str, key: str, found, expected) -> CatdogError:
    if key == "checkpoint_sha256":
        reason = (f"was extracted from another checkpoint (sha256 {str(found)[:12]}..., the run's "
                  f"best.safetensors is {str(expected)[:12]}...)")
    else:
        reason = f"was made with {key}={found!r}, this extraction uses {expected!r}"
    return CatdogError(f"feature store {folder}: {what} {reason}; pass --overwrite to rebuild the store "
                       "(or extract into another run directory)")


def _old_manifest(folder: Path) -> dict:
    """The manifest of an earlier extraction; empty when absent or unreadable (it is rewritten at the end)."""
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def check_store(folder: Path, tasks: list[ShardTask], attrs: dict,
                datasets: dict[str, ImageDataset]) -> set[ShardTask]:
    """The planned shards already complete in ``folder``; refuses a store made from another checkpoint,
    other settings or other images, so that shards are never mixed."""
    manifest = _old_manifest(folder)
    for key in ("checkpoint_sha256", "model", "transform"):
        if key in manifest and manifest[key] != attrs[key]:
            raise _refuse(folder, MANIFEST, key, manifest[key], attrs[key])
    planned = {task.file: task for task in tasks}
    complete = set()
    for path in sorted(folder.glob("*.h5")) if folder.is_dir() else []:
        if not SHARD_FILE.match(path.name):
            continue
        found = _read_attrs(path)
        key = attr_conflict(found, attrs)
        if key is not None:
            raise _refuse(folder, path.name, key, found.get(key), attrs[key])
        task = planned.get(path.name)
        if task is None:
            continue
        dataset = datasets[task.split]
        expected = [dataset.relative_path(i) for i in range(task.first_row, task.first_row + task.rows)]
        with h5py.File(path, "r") as f:
            stored = [p.decode() if isinstance(p, bytes) else p for p in f["paths"][:]]
        if stored != expected:
            raise CatdogError(f"feature store {folder}: {path.name} holds other images than rows "
                              f"{task.first_row}..{task.first_row + task.rows - 1} of split {task.split!r} "
                              "(did the data change?); pass --overwrite to rebuild the store")
        complete.add(task)
    return complete


def clear_store(folder: Path, everything: bool) -> None:
    """Remove temporary files left by a killed extraction; with ``everything``, also the shards and manifest."""
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if TEMP_FILE.match(path.name) or (everything and (SHARD_FILE.match(path.name) or path.name == MANIFEST)):
            path.unlink()


def store_attrs(network: Network, config: Config, checkpoint_sha256: str, transform: str, precision: str,
                spatial_shape: list[int] | None, classes: list[str]) -> dict:
    """Attributes every shard of one store shares (``split``/``first_row``/``rows`` are added per shard)."""
    return {
        "model": network.name,
        "checkpoint_sha256": checkpoint_sha256,
        "layer": f"backbone.{network.spec.cam_layer}",
        "transform": transform,
        "image_size": config.data.image_size,
        "shard_size": config.extract.shard_size,
        "precision": precision,
        "classes": json.dumps(classes),
        "feature_dim": network.feature_dim,
        "spatial_shape": json.dumps(spatial_shape),
    }


def _manifest_metadata(attrs: dict) -> dict:
    return {
        "model": attrs["model"],
        "checkpoint_sha256": attrs["checkpoint_sha256"],
        "classes": json.loads(attrs["classes"]),
        "feature_dim": attrs["feature_dim"],
        "spatial_shape": json.loads(attrs["spatial_shape"]),
        "layer": attrs["layer"],
        "transform": attrs["transform"],
        "shard_size": attrs["shard_size"],
        "image_size": attrs["image_size"],
        "precision": attrs["precision"],
    }


def _conv_batchnorm_pairs(network: Network, probe: torch.Tensor) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """(conv, BatchNorm) pairs where, on ``probe``, the BatchNorm's input is the convolution's output tensor."""
    conv_outputs, pairs = {}, []

    def record(module, inputs, output):
        if isinstance(module, nn.Conv2d):
            conv_outputs[id(output)] = (module, output)
        elif id(inputs[0]) in conv_outputs:
            pairs.append((conv_outputs[id(inputs[0])][0], module))

    hooks = [m.register_forward_hook(record) for m in network.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    try:
        with torch.inference_mode():
            network.spatial(probe)
    finally:
        for hook in hooks:
            hook.remove()
    return pairs


def fold_batchnorm(network: Network, probe: torch.Tensor) -> tuple[Network, int]:
    """A copy of the (eval mode) network with each BatchNorm that follows a convolution folded into its weights,
    and the number folded. The BatchNorm's activation, if it has one (timm's BatchNormAct2d), stays. Should the
    copy's spatial maps on ``probe`` differ from the original's, the original is returned, with 0."""
    folded = copy.deepcopy(network)
    parents = {child: (parent, name) for parent in folded.modules() for name, child in parent.named_children()}
    pairs = _conv_batchnorm_pairs(folded, probe)
    for conv, bn in pairs:
        conv.weight, conv.bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var,
                                                      bn.eps, bn.weight, bn.bias)
        parent, name = parents[bn]
        setattr(parent, name, nn.Sequential(bn.drop, bn.act) if hasattr(bn, "act") else nn.Identity())
    with torch.inference_mode():
        expected, found = network.spatial(probe), folded.spatial(probe)
    if not torch.allclose(found, expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max())):
        log.warning("%s: folding BatchNorm changed the spatial maps; extracting without folding", network.name)
        return network, 0
    return folded, len(pairs)


def _spatial_shape(network: Network, image_size: int, device: torch.device) -> list[int]:
    with torch.inference_mode():
        return list(network.spatial(torch.zeros(1, 3, image_size, image_size, device=device)).shape[1:])


def extract(config: Config, run_dir: str | os.PathLike, data_root: str | os.PathLike,
            overwrite: bool = False) -> dict:
    """Write (or complete) ``RUN/features/``. Returns what this process did and, on the main process,
    ``written``: the shard files every process wrote."""
    cfg = config.extract
    if not cfg.splits or len(set(cfg.splits)) != len(cfg.splits):
        raise CatdogError(f"extract.splits: give one or more distinct split names, e.g. [train, test, val] "
                          f"(got {cfg.splits})")
    run = RunDir(run_dir)
    folder = run.stage("features")
    use_cpu = cfg.cpu or not torch.cuda.is_available()
    precision = resolve_mixed_precision(cfg.mixed_precision, use_cpu)
    accelerator = Accelerator(cpu=use_cpu, mixed_precision=precision)
    use_cpu_cores(accelerator)

    network, classes = run.load_model()
    checkpoint_sha256 = file_sha256(run.best_checkpoint)
    data_classes = find_classes(data_root, tuple(cfg.splits))
    if data_classes != classes:
        raise CatdogError(f"data root {data_root}: classes {data_classes} differ from the run's {classes}")
    datasets = {split: open_split(data_root, split, config.data, classes=classes) for split in cfg.splits}
    transform = " ".join(repr(datasets[cfg.splits[0]].transform).split())

    folded = 0
    if cfg.fold_batchnorm:
        size = config.data.image_size
        probe = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        network, folded = fold_batchnorm(network, probe)
    network = network.to(accelerator.device)
    if cfg.channels_last:
        network = network.to(memory_format=torch.channels_last)
    spatial_shape = _spatial_shape(network, config.data.image_size, accelerator.device) if cfg.spatial else None
    attrs = store_attrs(network, config, checkpoint_sha256, transform, precision, spatial_shape, classes)

    tasks = plan_shards({split: len(d) for split, d in datasets.items()}, cfg.shard_size)
    complete = set() if overwrite else check_store(folder, tasks, attrs, datasets)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        clear_store(folder, everything=overwrite)
        folder.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()

    missing = [task for task in tasks if task not in complete]
    mine = deal(missing, accelerator.process_index, accelerator.num_processes)
    accelerator.print(f"features: {len(tasks)} shard(s) in {cfg.splits}, {len(complete)} complete, "
                      f"{len(missing)} to write on {accelerator.num_processes} process(es) ({accelerator.device}, "
                      f"mixed precision {precision}, {folded} BatchNorms folded)")
    start = time.perf_counter()
    images = _write_shards(network, datasets, mine, folder, attrs, cfg, accelerator, precision, spatial_shape)
    seconds = time.perf_counter() - start

    accelerator.wait_for_everyone()
    written = gather_object([(accelerator.process_index, [task.file for task in mine])])
    result = {"rank": accelerator.process_index, "images": images, "seconds": seconds,
              "images_per_second": images / seconds if images else 0.0,
              "written": {rank: files for rank, files in written}, "kept": sorted(t.file for t in complete)}
    if accelerator.is_main_process:
        shards = [ShardInfo(t.file, t.split, t.first_row, t.rows, file_sha256(folder / t.file)) for t in tasks]
        write_manifest(folder, _manifest_metadata(attrs), shards)
        save_config(config, folder / "config.yaml")
        for rank, files in result["written"].items():
            print(f"rank {rank} wrote {len(files)} shard(s): {', '.join(files) or '-'}")
        speed = f"{images} images at {result['images_per_second']:.1f} images/s" if images else "nothing"
        print(f"features: {folder} complete, {sum(t.rows for t in tasks)} images in {len(tasks)} shard(s); "
              f"the main process extracted {speed}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def _write_shards(network: Network, datasets: dict[str, ImageDataset], tasks: list[ShardTask], folder: Path,
                  attrs: dict, cfg: ExtractConfig, accelerator: Accelerator, precision: str,
                  spatial_shape: list[int] | None) -> int:
    """Extract this process's shards batch by batch; returns the number of images written."""
    if not tasks:
        return 0
    offsets, total = {}, 0
    for split, dataset in datasets.items():
        offsets[split] = total
        total += len(dataset)
    plan = batch_plan(tasks, offsets, cfg.batch_size)
    loader = DataLoader(ConcatDataset(list(datasets.values())), batch_sampler=[indices for _, indices in plan],
                        num_workers=cfg.num_workers, pin_memory=accelerator.device.type == "cuda")
    autocast = torch.autocast(accelerator.device.type, dtype=AUTOCAST_DTYPES.get(precision),
                              enabled=precision in AUTOCAST_DTYPES)
    bar = tqdm(total=sum(t.rows for t in tasks), unit="img", desc="extract",
               disable=not accelerator.is_main_process)
    writer, filled, images = None, 0, 0
    try:
        with torch.inference_mode(), autocast:
            for (task, _), (batch, labels, rows) in zip(plan, loader):
                if writer is None:
                    writer = ShardWriter(folder / task.file, task.rows, network.feature_dim, spatial_shape,
                                         {**attrs, "split": task.split, "first_row": task.first_row,
                                          "rows": task.rows}, cfg.compression)
                batch = batch.to(accelerator.device, non_blocking=True)
                if cfg.channels_last:
                    batch = batch.contiguous(memory_format=torch.channels_last)
                fmap = network.spatial(batch)
                features = network.pool(fmap).float().cpu().numpy()
                maps = fmap.to(torch.float16).contiguous().cpu().numpy() if spatial_shape else None
                dataset = datasets[task.split]
                writer.write(features, labels.numpy(), rows.numpy(),
                             [dataset.relative_path(int(i)) for i in rows], maps)
                filled += len(rows)
                images += len(rows)
                bar.update(len(rows))
                if filled == task.rows:
                    writer.close()
                    writer, filled = None, 0
    finally:
        bar.close()
        if writer is not None:
            writer.abort()
    return images
