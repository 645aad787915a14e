"""Feature extraction: every image of the configured splits through the trained network, into the HDF5 store.

The main process lists the splits once (``catdog.data.list_files``: file names, no image opened; ``data.exclude``
honoured) and checks the shards already there (``catdog.store.check_store``), then sends the listing and the plan to
the other processes. Each image is decoded by DataLoader workers (``catdog.data.load_rgb``, resized as uint8; the
batch is normalised in the main loop), passed through ``net.spatial`` and ``net.pool`` in batches (inference mode,
channels_last, BatchNorms folded into their convolutions, autocast where it helps) and written batch by batch into
its shard, so memory stays flat however large the dataset. Under ``accelerate launch`` the missing shards are dealt
round-robin to the processes, each writing its own.

Whether an image can be used is found where it is decoded anyway, in the workers: one PIL cannot use (unreadable, or
over ``data.max_image_pixels``) keeps its row, so row ids stay each file's index in the listing and shards their
planned sizes, with zero features and maps, ``readable`` False in its shard and its row id in the manifest entry's
``unreadable``; it is named in the one warning (``catdog.data.warn_skipped``). Readers leave such rows out.

Shards appear under their final name only when complete, hashed from the bytes written and recorded in their
writer's journal (``catdog.store.record_shard``); the main process assembles ``manifest.json`` from the journals,
reading no shard back. A rerun writes only the missing shards, after checking that the complete ones come from the
same checkpoint, decoder, settings and images (a store that does not is refused) and are whole (one that fails
``catdog.store.shard_damage`` is rewritten); kept shards keep their recorded hashes. The store's rules (names,
attributes, manifest, journals, checks) live in ``catdog.store``; BatchNorm folding in ``catdog.models``.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from catdog.config import Config, DataConfig, save_config
from catdog.data import (DECODER_VERSION, Sample, build_batch_transform, decode_steps, find_classes,
                         limit_image_pixels, list_files, load_rgb, loader_options, unreadable_reason, warn_skipped)
from catdog.devices import accelerator_for, autocast, require_shared_folder
from catdog.errors import CatdogError
from catdog.io import file_sha256
from catdog.models import Network, fold_batchnorm
from catdog.progress import progress_bar
from catdog.run import RunDir
from catdog.store import (MANIFEST, ShardInfo, ShardWriter, check_store, clear_store, manifest_metadata,
                          record_shard, recorded_shards, restart_journals, shard_attrs, shard_name, store_attrs,
                          write_manifest)

T = TypeVar("T")


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


def decode_workers(configured: int | None) -> int:
    """``extract.num_workers``, or one decoding worker per core this process may use, the cores shared among the
    processes of this machine (decoding is most of extraction's CPU time besides the forward pass). On the CPU they
    run under ``SCHED_IDLE`` (``catdog.data.loader_options``): they decode in the gaps the forward pass leaves
    instead of taking a core from one of its threads."""
    if configured is not None:
        return configured
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(1, len(os.sched_getaffinity(0)) // local_processes)


class DecodedRows(Dataset):
    """Rows of the concatenated listings: ``(uint8 image (3, size, size), label, row, problem)``, where ``problem``
    is why PIL cannot use the file ("" when it can; the image is then zeros), found here in the loader's workers."""

    def __init__(self, listing: list[Sample], cfg: DataConfig):
        self.listing, self.size = listing, cfg.image_size
        self.decode = v2.Compose(decode_steps(cfg))

    def __len__(self) -> int:
        return len(self.listing)

    def __getitem__(self, row: int) -> tuple[torch.Tensor, int, int, str]:
        sample = self.listing[row]
        try:
            return self.decode(load_rgb(sample.path, self.size)), sample.label, row, ""
        except Exception as exc:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
            return (torch.zeros(3, self.size, self.size, dtype=torch.uint8), sample.label, row,
                    unreadable_reason(sample.path, exc))


def on_main(accelerator: Accelerator, work: Callable[[], T]) -> T:
    """``work()`` on the main process alone, its result sent to every process; a CatdogError it raises is raised by
    every process (the others would otherwise wait for the result until the process group times out)."""
    outcome = [None]
    if accelerator.is_main_process:
        try:
            outcome = [(True, work())]
        except CatdogError as exc:
            outcome = [(False, str(exc))]
    if accelerator.num_processes > 1:
        broadcast_object_list(outcome)
    done, value = outcome[0]
    if not done:
        raise CatdogError(value)
    return value


def _spatial_shape(network: Network, image_size: int, device: torch.device) -> list[int]:
    with torch.inference_mode():
        return list(network.spatial(torch.zeros(1, 3, image_size, image_size, device=device)).shape[1:])


def extract(config: Config, run_dir: str | os.PathLike, data_root: str | os.PathLike,
            overwrite: bool = False, verify: bool = False) -> dict:
    """Write (or complete) ``RUN/features/``. Returns what this process did and, on the main process,
    ``written``: the shard files every process wrote.

    Shards already there are kept when they pass the store's checks (``catdog.store.check_store``: by default
    size and header against their recorded entry, with ``verify`` the full sha256); one that fails is deleted
    and written again. ``overwrite`` rebuilds everything."""
    cfg = config.extract
    run = RunDir(run_dir)
    folder = run.features_dir
    accelerator, precision = accelerator_for(cfg.mixed_precision, cfg.cpu)
    require_shared_folder(accelerator, run.path, "--run")
    limit_image_pixels(config.data)

    network, classes = run.load_model()
    checkpoint_sha256 = file_sha256(run.best_checkpoint)
    decode, normalise = v2.Compose(decode_steps(config.data)), build_batch_transform(config.data, augment=False)
    transform = f"catdog.data.load_rgb v{DECODER_VERSION}, " + " ".join(f"{decode!r}, {normalise!r}".split())

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

    listings, tasks, complete, damaged = on_main(
        accelerator, lambda: _list_and_check(config, data_root, classes, folder, attrs, overwrite, verify))
    missing = [task for task in tasks if task.file not in complete]
    accelerator.wait_for_everyone()

    mine = deal(missing, accelerator.process_index, accelerator.num_processes)
    accelerator.print(f"features: {len(tasks)} shard(s) in {cfg.splits}, {len(complete)} complete, "
                      f"{len(missing)} to write on {accelerator.num_processes} process(es) ({accelerator.device}, "
                      f"mixed precision {precision}, {folded} BatchNorms folded)")
    start = time.perf_counter()
    images, skipped = _write_shards(network, Path(data_root), listings, mine, folder, attrs, config, accelerator,
                                    precision, spatial_shape, normalise)
    seconds = time.perf_counter() - start

    accelerator.wait_for_everyone()
    skipped = gather_object(skipped)
    result = {"rank": accelerator.process_index, "images": images, "seconds": seconds,
              "images_per_second": images / seconds if images else 0.0, "kept": sorted(complete),
              "rebuilt": sorted(damaged)}
    if accelerator.is_main_process:
        recorded = recorded_shards(folder)
        result["written"] = {rank: list(recorded.get(str(rank), {})) for rank in range(accelerator.num_processes)}
        entries = {file: info for journal in recorded.values() for file, info in journal.items()}
        write_manifest(folder, manifest_metadata(attrs),
                       [entries.get(t.file) or ShardInfo.of_file(folder / t.file, t.split, t.first_row, t.rows)
                        for t in tasks])
        save_config(config, folder / "config.yaml")
        for rank, files in result["written"].items():
            print(f"rank {rank} wrote {len(files)} shard(s): {', '.join(files) or '-'}")
        warn_skipped(data_root, skipped)
        speed = f"{images} images at {result['images_per_second']:.1f} images/s" if images else "nothing"
        print(f"features: {folder} complete, {sum(t.rows for t in tasks)} images in {len(tasks)} shard(s)"
              f"{f' ({len(skipped)} unreadable, kept as zero rows)' if skipped else ''}; the main process extracted "
              f"{speed}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def _list_and_check(config: Config, data_root: str | os.PathLike, classes: list[str], folder: Path, attrs: dict,
                    overwrite: bool, verify: bool) -> tuple[dict[str, list[Sample]], list[ShardTask], dict, dict]:
    """On the main process: the splits' listings, every shard, which are complete and which damaged; then the folder
    made ready for the writers (temporary files, damaged shards and, while shards are missing, the manifest
    removed; the kept shards' entries in the journal)."""
    splits = config.extract.splits
    data_classes = find_classes(data_root, tuple(splits))
    if data_classes != classes:
        raise CatdogError(f"data root {data_root}: classes {data_classes} differ from the run's {classes}")
    listings = {split: list_files(data_root, split, classes, config.data.exclude) for split in splits}
    tasks = plan_shards({split: len(listing) for split, listing in listings.items()}, config.extract.shard_size)
    if overwrite:
        complete, damaged = {}, {}
    else:
        root = Path(data_root)
        planned = {t.file: [s.path.relative_to(root).as_posix()
                            for s in listings[t.split][t.first_row:t.first_row + t.rows]] for t in tasks}
        complete, damaged = check_store(folder, attrs, planned, verify)
    clear_store(folder, everything=overwrite)
    for file, reason in damaged.items():
        print(f"features: rebuilding {file}, which is damaged or was altered ({reason})")
        (folder / file).unlink()
    if len(complete) < len(tasks):  # the store is incomplete until the new manifest is written
        (folder / MANIFEST).unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    restart_journals(folder, [info for info in complete.values() if info is not None])
    return listings, tasks, complete, damaged


def _write_shards(network: Network, data_root: Path, listings: dict[str, list[Sample]], tasks: list[ShardTask],
                  folder: Path, attrs: dict, config: Config, accelerator: Accelerator, precision: str,
                  spatial_shape: list[int] | None, normalise) -> tuple[int, list[tuple[str, str]]]:
    """Extract this process's shards batch by batch, recording each in this process's journal. Returns the number
    of images written and the ``(path, reason)`` of those that could not be decoded."""
    if not tasks:
        return 0, []
    cfg = config.extract
    offsets, rows = {}, []
    for split, listing in listings.items():
        offsets[split] = len(rows)
        rows += listing
    plan = batch_plan(tasks, offsets, cfg.batch_size)
    workers = decode_workers(cfg.num_workers)
    loader = DataLoader(DecodedRows(rows, config.data), batch_sampler=[indices for _, indices in plan],
                        **loader_options(workers, accelerator.device, persistent=False))
    precision_context = autocast(accelerator.device.type, precision)
    bar = progress_bar(total=sum(t.rows for t in tasks), unit="img", desc="extract",
                       disable=not accelerator.is_main_process)
    writer, filled, images, skipped = None, 0, 0, []
    try:
        with torch.inference_mode(), precision_context:
            for (task, _), (batch, labels, indices, problems) in zip(plan, loader):
                if writer is None:
                    writer = ShardWriter(folder / task.file, task.rows, network.feature_dim, spatial_shape,
                                         shard_attrs(attrs, task.split, task.first_row, task.rows),
                                         cfg.compression)
                batch = normalise(batch.to(accelerator.device, non_blocking=True))
                if cfg.channels_last:
                    batch = batch.contiguous(memory_format=torch.channels_last)
                fmap = network.spatial(batch)
                features = network.pool(fmap).float().cpu().numpy()
                maps = (fmap.to(torch.float16, memory_format=torch.contiguous_format).cpu().numpy()  # HDF5's row order
                        if spatial_shape else None)
                readable = np.array([not problem for problem in problems])
                if not readable.all():
                    features[~readable] = 0
                    if maps is not None:
                        maps[~readable] = 0
                paths = [rows[int(i)].path.relative_to(data_root).as_posix() for i in indices]
                skipped += [(path, problem) for path, problem in zip(paths, problems) if problem]
                writer.write(features, labels.numpy(), indices.numpy() - offsets[task.split], paths, maps, readable)
                filled += len(indices)
                images += len(indices)
                bar.update(len(indices))
                if filled == task.rows:
                    sha256, size = writer.close()
                    record_shard(folder, str(accelerator.process_index),
                                 ShardInfo(task.file, task.split, task.first_row, task.rows, sha256, size,
                                           tuple(writer.unreadable)))
                    writer, filled = None, 0
    finally:
        bar.close()
        if writer is not None:
            writer.abort()
    return images, skipped
