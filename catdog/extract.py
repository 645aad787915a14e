"""Feature extraction: every image of the configured splits through the trained network, into the HDF5 store.

Each image is decoded by DataLoader workers with the eval transform, passed through ``net.spatial`` and
``net.pool`` in batches (inference mode, channels_last, BatchNorms folded into their convolutions, autocast
where it helps) and written batch by batch into its shard, so memory stays flat however large the dataset.
Under ``accelerate launch`` the missing shards are dealt round-robin to the processes, each writing its own.
Shards appear under their final name only when complete: a rerun writes only the missing ones, after
checking that the complete ones come from the same checkpoint, settings and images (a store that does not is
refused) and are whole (one that fails ``catdog.store.shard_damage`` is rewritten); the main process then
writes ``manifest.json``. The store's rules (names, attributes, manifest, checks) live in ``catdog.store``;
BatchNorm folding in ``catdog.models``.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch.utils.data import ConcatDataset, DataLoader

from catdog.config import Config, ExtractConfig, save_config
from catdog.data import ImageDataset, find_classes
from catdog.splits import open_split
from catdog.devices import accelerator_for, autocast, require_shared_folder
from catdog.errors import CatdogError
from catdog.io import file_sha256
from catdog.models import Network, fold_batchnorm
from catdog.progress import progress_bar
from catdog.run import RunDir
from catdog.store import (MANIFEST, ShardInfo, ShardWriter, check_store, clear_store, manifest_metadata, shard_attrs,
                          shard_name, store_attrs, write_manifest)



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
    """Every shard of every split, in split order then row order (``shard_size`` >= 1: checked by the config)."""
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


def _spatial_shape(network: Network, image_size: int, device: torch.device) -> list[int]:
    with torch.inference_mode():
        return list(network.spatial(torch.zeros(1, 3, image_size, image_size, device=device)).shape[1:])


def extract(config: Config, run_dir: str | os.PathLike, data_root: str | os.PathLike,
            overwrite: bool = False, verify: bool = False) -> dict:
    """Write (or complete) ``RUN/features/``. Returns what this process did and, on the main process,
    ``written``: the shard files every process wrote.

    Shards already there are kept when they pass the store's checks (``catdog.store.check_store``: by default
    size and header against the earlier manifest, with ``verify`` the full sha256); one that fails is deleted
    and written again. ``overwrite`` rebuilds everything."""
    cfg = config.extract
    run = RunDir(run_dir)
    folder = run.features_dir
    accelerator, precision = accelerator_for(cfg.mixed_precision, cfg.cpu)
    require_shared_folder(accelerator, run.path, "--run")

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
    attrs = store_attrs(model=network.name, checkpoint_sha256=checkpoint_sha256,
                        layer=f"backbone.{network.cam_layer_name}", transform=transform,
                        image_size=config.data.image_size, shard_size=cfg.shard_size, precision=precision,
                        classes=classes, feature_dim=network.feature_dim, spatial_shape=spatial_shape)

    tasks = plan_shards({split: len(d) for split, d in datasets.items()}, cfg.shard_size)
    if overwrite:
        complete, damaged = {}, {}
    else:
        planned = {t.file: [datasets[t.split].relative_path(i) for i in range(t.first_row, t.first_row + t.rows)]
                   for t in tasks}
        complete, damaged = check_store(folder, attrs, planned, verify)
    missing = [task for task in tasks if task.file not in complete]
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        clear_store(folder, everything=overwrite)
        for file, reason in damaged.items():
            print(f"features: rebuilding {file}, which is damaged or was altered ({reason})")
            (folder / file).unlink()
        if missing:  # the store is incomplete until the new manifest is written
            (folder / MANIFEST).unlink(missing_ok=True)
        folder.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()

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
              "written": {rank: files for rank, files in written}, "kept": sorted(complete),
              "rebuilt": sorted(damaged)}
    if accelerator.is_main_process:
        write_manifest(folder, manifest_metadata(attrs), [_manifest_entry(folder, t, complete.get(t.file))
                                                          for t in tasks])
        save_config(config, folder / "config.yaml")
        for rank, files in result["written"].items():
            print(f"rank {rank} wrote {len(files)} shard(s): {', '.join(files) or '-'}")
        speed = f"{images} images at {result['images_per_second']:.1f} images/s" if images else "nothing"
        print(f"features: {folder} complete, {sum(t.rows for t in tasks)} images in {len(tasks)} shard(s); "
              f"the main process extracted {speed}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def _manifest_entry(folder: Path, task: ShardTask, kept: ShardInfo | None) -> ShardInfo:
    """A shard's manifest entry. A kept shard keeps the sha256 recorded when it was written, so that damage the
    cheap checks let through is still caught by a later ``--verify``; new shards are hashed."""
    path = folder / task.file
    if kept is None:
        return ShardInfo.of_file(path, task.split, task.first_row, task.rows)
    return ShardInfo(task.file, task.split, task.first_row, task.rows, kept.sha256, path.stat().st_size)


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
    precision_context = autocast(accelerator.device.type, precision)
    bar = progress_bar(total=sum(t.rows for t in tasks), unit="img", desc="extract",
                       disable=not accelerator.is_main_process)
    writer, filled, images = None, 0, 0
    try:
        with torch.inference_mode(), precision_context:
            for (task, _), (batch, labels, rows) in zip(plan, loader):
                if writer is None:
                    writer = ShardWriter(folder / task.file, task.rows, network.feature_dim, spatial_shape,
                                         shard_attrs(attrs, task.split, task.first_row, task.rows),
                                         cfg.compression)
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
