"""The fine-tuning loop, on Accelerate: one process or many, CPU or GPUs, read top to bottom.

Per epoch: train, evaluate on ``test`` (every image counted once across processes), keep the best
epoch's weights by test accuracy, save a resumable state. At the end: evaluate the best weights on ``val``.
Each epoch starts from ``set_seed(seed + epoch)``, so a resumed run draws the same shuffles and
augmentations as an uninterrupted one.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from catdog import models
from catdog.config import SPLITS, Config, OptimConfig, save_config
from catdog.devices import accelerator_for, require_shared_folder
from catdog.data import find_classes, open_split
from catdog.errors import CatdogError
from catdog.io import atomic_path, write_json, write_text
from catdog.progress import progress_bar
from catdog.run import RunDir


def build_optimizer(cfg: OptimConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)


def build_scheduler(cfg: OptimConfig, optimizer, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then constant or cosine to zero."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = int(cfg.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def evaluate(model, loader, accelerator: Accelerator, desc: str, channels_last: bool) -> tuple[float, int]:
    """Accuracy over the whole split; ``gather_for_metrics`` drops the padding added to even out processes."""
    model.eval()
    correct = total = 0
    for images, labels, _ in progress_bar(loader, desc=desc, leave=False, disable=not accelerator.is_local_main_process):
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        predictions = model(images).argmax(dim=1)
        predictions, labels = accelerator.gather_for_metrics((predictions, labels))
        correct += (predictions == labels).sum().item()
        total += labels.numel()
    return correct / total, total


def train_one_epoch(model, loader, optimizer, scheduler, loss_fn, accelerator: Accelerator, epoch: int,
                    steps: int, channels_last: bool) -> dict:
    """One pass over this process's share of the train split (``steps`` batches in all processes together).

    Returns the mean loss over every process's images, the images each process saw, and the seconds taken.
    """
    model.train()
    start = time.perf_counter()
    loss_sum = torch.zeros((), device=accelerator.device)
    images_per_rank = 0
    bar = progress_bar(total=steps // accelerator.num_processes or 1, desc=f"epoch {epoch}",
                       disable=not accelerator.is_local_main_process)
    for step, (images, labels, _) in enumerate(loader):
        if step * accelerator.num_processes >= steps:
            break
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        loss = loss_fn(model(images), labels)
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach() * labels.numel()
        images_per_rank += labels.numel()
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    bar.close()
    seconds = time.perf_counter() - start
    seen = accelerator.gather(torch.tensor([images_per_rank], device=accelerator.device))
    return {"train_loss": accelerator.reduce(loss_sum, reduction="sum").item() / seen.sum().item(),
            "train_seconds": seconds, "images_per_rank": seen.tolist(),
            "images_per_second": seen.sum().item() / seconds}


def _save_atomic(tensors: dict, path: Path) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp)


def save_state(run: RunDir, accelerator: Accelerator, model, optimizer, scheduler, epoch: int, history: list[dict],
               best: dict, improved: bool) -> None:
    """After an epoch, on the main process: the best weights (when this epoch improved), the resumable state and
    metrics.jsonl, each replaced atomically."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        weights = accelerator.unwrap_model(model).state_dict()
        if improved:
            _save_atomic(weights, run.best_checkpoint)
        with atomic_path(run.state_path) as tmp:
            torch.save({"epoch": epoch, "model": weights, "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "history": history, "best": best}, tmp)
        write_text(run.metrics_path, "".join(json.dumps(record) + "\n" for record in history))
    accelerator.wait_for_everyone()


def _resume(run: RunDir, model, optimizer, scheduler) -> tuple[int, list[dict], dict]:
    """Load ``last.pt`` into the model, optimizer and scheduler; returns the next epoch, history and best so far."""
    state = run.load_state()
    models.load_weights(model, state["model"], f"run {run.path}: last.pt")
    try:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except (ValueError, KeyError) as exc:
        raise CatdogError(f"run {run.path}: last.pt's optimizer state does not fit this config ({exc}); "
                          "resume with the run's own config.yaml (no --config), or train into a new --out") from None
    return state["epoch"] + 1, state["history"], state["best"]


def train(config: Config, data_root: str | os.PathLike, out: str | os.PathLike, resume: bool = False) -> dict:
    """Fine-tune ``config.model`` on ``data_root`` and write the run directory ``out``. Returns the summary."""
    config = config.model_copy(update={"data": models.data_config(config.model.name, config.data)})
    run = RunDir(out)
    if run.state_path.exists() and not resume:
        raise CatdogError(f"run {run.path} already has a training state (last.pt): continue it with "
                          f"jobs/train.py --out {run.path} --data DATA_ROOT --resume, or choose another --out")
    accelerator, precision = accelerator_for(config.train.mixed_precision, config.train.cpu, config.train.cpu_threads)
    require_shared_folder(accelerator, run.path, "--out")
    channels_last = config.train.channels_last

    # data: the three splits, the train one augmented and shuffled
    classes = find_classes(data_root)
    splits = {split: open_split(data_root, split, config.data, train=split == "train", classes=classes)
              for split in SPLITS}
    loader_args = dict(num_workers=config.data.num_workers, pin_memory=accelerator.device.type == "cuda",
                       persistent_workers=config.data.num_workers > 0)
    train_loader = DataLoader(splits["train"], config.data.batch_size, shuffle=True, **loader_args)
    test_loader = DataLoader(splits["test"], config.data.eval_batch_size, **loader_args)
    val_loader = DataLoader(splits["val"], config.data.eval_batch_size, **loader_args)
    steps_per_epoch = min(len(train_loader), config.train.max_train_batches or len(train_loader))

    # model, optimizer, schedule (built on the unsharded loader's length: Accelerate steps a prepared scheduler once
    # per process), and the state of a killed run
    set_seed(config.train.seed)
    model = models.create(config.model.name, len(classes), config.model.pretrained, config.model.drop_rate,
                          config.model.freeze_stages, config.model.cam_layer)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(config.optim, [p for p in model.parameters() if p.requires_grad])
    scheduler = build_scheduler(config.optim, optimizer, steps_per_epoch)
    start_epoch, history, best = 1, [], {"epoch": 0, "test_accuracy": -1.0}
    if resume and run.state_path.exists():
        start_epoch, history, best = _resume(run, model, optimizer, scheduler)
        accelerator.print(f"resuming {run.path} after epoch {start_epoch - 1} "
                          f"(best so far: epoch {best['epoch']}, test {best['test_accuracy']:.2%})")
    model, optimizer, train_loader, test_loader, val_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, test_loader, val_loader, scheduler)
    if accelerator.is_main_process:
        run.path.mkdir(parents=True, exist_ok=True)
        save_config(config, run.config_path)
    accelerator.print(f"{config.model.name}: {accelerator.num_processes} process(es) on {accelerator.device}, "
                      f"mixed precision {precision}, classes {classes}, train/test/val "
                      + "/".join(str(len(splits[split])) for split in SPLITS) + " images")

    # per epoch: train, evaluate on test, keep the best weights and a resumable state
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=config.optim.label_smoothing)
    for epoch in range(start_epoch, config.optim.epochs + 1):
        set_seed(config.train.seed + epoch, device_specific=True)
        epoch_start = time.perf_counter()
        record = {"epoch": epoch, **train_one_epoch(model, train_loader, optimizer, scheduler, loss_fn, accelerator,
                                                    epoch, steps_per_epoch, channels_last)}
        record["test_accuracy"], record["test_images"] = evaluate(model, test_loader, accelerator, "test",
                                                                  channels_last)
        record.update(lr=scheduler.get_last_lr()[0], seconds=time.perf_counter() - epoch_start)
        history.append(record)
        accelerator.print(f"epoch {epoch}: train loss {record['train_loss']:.4f}, test {record['test_accuracy']:.2%} "
                          f"({record['test_images']} images), {record['images_per_second']:.1f} train images/s, "
                          f"{record['seconds']:.0f} s")
        improved = record["test_accuracy"] > best["test_accuracy"]
        if improved:
            best = {"epoch": epoch, "test_accuracy": record["test_accuracy"]}
        save_state(run, accelerator, model, optimizer, scheduler, epoch, history, best, improved)

    # at the end: the best weights on val
    if not run.best_checkpoint.exists():
        raise CatdogError(f"run {run.path}: no best checkpoint was written (optim.epochs = {config.optim.epochs})")
    accelerator.unwrap_model(model).load_state_dict(run.load_weights())
    val_accuracy, val_images = evaluate(model, val_loader, accelerator, "val", channels_last)
    train_seconds = sum(r["train_seconds"] for r in history)
    summary = {
        "model": config.model.name,
        "classes": classes,
        "best_epoch": best["epoch"],
        "best_test_accuracy": best["test_accuracy"],
        "val_accuracy": val_accuracy,
        "test_images": history[-1]["test_images"],
        "val_images": val_images,
        "epochs": len(history),
        "train_seconds": train_seconds,
        "images_per_second": sum(sum(r["images_per_rank"]) for r in history) / train_seconds,
        "num_processes": accelerator.num_processes,
        "images_per_rank": history[-1]["images_per_rank"],
        "device": str(accelerator.device),
        "mixed_precision": precision,
    }
    accelerator.print(f"best epoch {best['epoch']}: test {best['test_accuracy']:.2%}, val {val_accuracy:.2%} "
                      f"({val_images} images)")
    if accelerator.is_main_process:
        write_json(run.summary_path, summary)
    accelerator.end_training()
    return summary
