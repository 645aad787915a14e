"""The fine-tuning loop, on Accelerate: one process or many, CPU or GPUs, read top to bottom.

First: the linear probe on the frozen pretrained features (``catdog.probe``), the baseline to beat and LP-FT's
head. Per epoch: train, evaluate on ``test`` (every image counted once across processes), keep the best epoch's
weights (the EMA's when ``train.ema_decay`` is set) by test accuracy, save a resumable state, log to Accelerate's
trackers. At the end: evaluate the best weights on ``val``. Each epoch starts from ``set_seed(seed + epoch)``, so a
resumed run draws the same shuffles and augmentations as an uninterrupted one.
"""
from __future__ import annotations

import copy
import io
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from safetensors.torch import save as safetensors_bytes
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader, Subset

from catdog import models, probe
from catdog.config import SPLITS, Config, OptimConfig, save_config
from catdog.devices import accelerator_for, require_shared_folder
from catdog.data import find_classes, loader_options
from catdog.splits import open_split
from catdog.errors import CatdogError
from catdog.io import remove_stale_temps_in, write_bytes, write_json, write_text
from catdog.predict import InputImage, csv_columns, csv_text, prediction_rows
from catdog.progress import progress_bar
from catdog.run import RunDir
from catdog.sampling import stratified_rows


LOG_EVERY_STEPS = 10
"""Training loss and learning rate go to the progress bar and the trackers every this many steps."""


def build_optimizer(cfg: OptimConfig, network: models.Network) -> torch.optim.Optimizer:
    """The trainable parameters in two groups: the head at ``lr``, the backbone at ``lr * backbone_lr_scale``."""
    head = {id(p) for p in network.head.parameters()}
    trainable = [p for p in network.parameters() if p.requires_grad]
    params = [{"params": [p for p in trainable if id(p) in head], "lr": cfg.lr},
              {"params": [p for p in trainable if id(p) not in head], "lr": cfg.lr * cfg.backbone_lr_scale}]
    params = [group for group in params if group["params"]]
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
def evaluate(model, loader, accelerator: Accelerator, desc: str, channels_last: bool, batch_transform,
             tta_hflip: bool = False, per_image: bool = False) -> dict:
    """Accuracy over the whole split (``gather_for_metrics`` drops the padding added to even out processes); with
    ``tta_hflip`` also the accuracy of the mean softmax over each image and its mirror image. With ``per_image``,
    also each image's ``probabilities`` (the mean softmax with TTA) and ``predicted`` class, in the split's order."""
    model.eval()
    correct = correct_tta = total = 0  # device tensors after the first batch: one sync, at the end
    kept = {"indices": [], "probabilities": [], "predicted": []}
    for images, labels, indices in progress_bar(loader, desc=desc, leave=False,
                                                disable=not accelerator.is_local_main_process):
        images = batch_transform(images)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with accelerator.autocast():
            logits = model(images).float()
            flipped = model(images.flip(-1)).float() if tta_hflip else logits
        predictions = logits.argmax(dim=1)
        mean_softmax = (logits.softmax(1) + flipped.softmax(1)) / 2
        predictions_tta = mean_softmax.argmax(dim=1)
        predictions, predictions_tta, labels = accelerator.gather_for_metrics((predictions, predictions_tta, labels))
        correct += (predictions == labels).sum()
        correct_tta += (predictions_tta == labels).sum()
        total += labels.numel()
        if per_image:  # only the final val pass: the per-epoch test passes gather no more than they count
            mean_softmax, indices = accelerator.gather_for_metrics((mean_softmax, indices.to(labels.device)))
            kept["indices"].append(indices.cpu())
            kept["probabilities"].append(mean_softmax.cpu())
            kept["predicted"].append((predictions_tta if tta_hflip else predictions).cpu())
    result = {"accuracy": int(correct) / total, "images": total}
    if tta_hflip:
        result["accuracy_tta"] = int(correct_tta) / total
    if per_image:
        order = torch.cat(kept["indices"]).argsort()
        result.update({key: torch.cat(kept[key])[order].numpy() for key in ("probabilities", "predicted")})
    return result


def train_one_epoch(model, loader, optimizer, scheduler, loss_fn, accelerator: Accelerator, epoch: int,
                    steps: int, channels_last: bool, batch_transform, ema: ModelEmaV3 | None = None) -> dict:
    """One pass over this process's share of the train split (``steps`` batches in all processes together),
    updating the weight EMA after each step when there is one and logging loss and learning rate to the trackers.

    Returns the mean loss over every process's images, the images each process saw, and the seconds taken.
    """
    model.train()
    start = time.perf_counter()
    loss_sum = torch.zeros((), device=accelerator.device)
    images_per_rank = 0
    bar = progress_bar(total=steps // accelerator.num_processes or 1, desc=f"epoch {epoch}",
                       disable=not accelerator.is_local_main_process)
    steps_per_rank = -(-steps // accelerator.num_processes)
    for step, (images, labels, _) in enumerate(loader):
        if step * accelerator.num_processes >= steps:
            break
        images = batch_transform(images)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        loss = loss_fn(model(images), labels)
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        global_step = (epoch - 1) * steps_per_rank + step + 1
        if ema is not None:
            ema.update(accelerator.unwrap_model(model), step=global_step)
        loss_sum += loss.detach() * labels.numel()
        images_per_rank += labels.numel()
        bar.update()
        if step % LOG_EVERY_STEPS == 0:  # .item() waits for the device: not at every step
            loss_value = loss.item()
            bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
            accelerator.log({"train/loss": loss_value, "train/lr": scheduler.get_last_lr()[0]}, step=global_step)
    bar.close()
    seconds = time.perf_counter() - start
    seen = accelerator.gather(torch.tensor([images_per_rank], device=accelerator.device))
    return {"train_loss": accelerator.reduce(loss_sum, reduction="sum").item() / seen.sum().item(),
            "train_seconds": seconds, "images_per_rank": seen.tolist(),
            "images_per_second": seen.sum().item() / seconds}


def wise_ft(initial: dict[str, torch.Tensor], fine_tuned: dict[str, torch.Tensor], alpha: float) -> dict:
    """WiSE-FT (Wortsman et al., CVPR 2022): ``(1 - alpha) * initial + alpha * fine_tuned`` for every float tensor;
    integer buffers (a BatchNorm's step count) are the fine-tuned ones. The weights between the starting point and
    the fine-tuned model keep more of the pretrained features' robustness at little cost in accuracy."""
    return {key: torch.lerp(initial[key].to(value.device, value.dtype), value, alpha) if value.is_floating_point()
            else value for key, value in fine_tuned.items()}


def _save_atomic(tensors: dict, path: Path) -> None:
    write_bytes(path, safetensors_bytes({k: v.detach().contiguous().cpu() for k, v in tensors.items()}))


def save_state(run: RunDir, accelerator: Accelerator, model, ema: ModelEmaV3 | None, evaluated, optimizer,
               scheduler, epoch: int, history: list[dict], best: dict, improved: bool, classes: list[str]) -> None:
    """After an epoch, on the main process: the evaluated weights as the best ones (when this epoch improved), the
    resumable state and metrics.jsonl, each replaced atomically."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        weights = accelerator.unwrap_model(model).state_dict()
        if improved:
            _save_atomic(accelerator.unwrap_model(evaluated).state_dict(), run.best_checkpoint)
        state = io.BytesIO()
        torch.save({"epoch": epoch, "model": weights, "ema": ema.module.state_dict() if ema else None,
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "history": history,
                    "best": best, "classes": classes}, state)
        write_bytes(run.state_path, state.getbuffer())
        write_text(run.metrics_path, "".join(json.dumps(record) + "\n" for record in history))
    accelerator.wait_for_everyone()


RESULT_NEUTRAL = {"train.log_with", "train.cpu_threads", "data.eval_batch_size"}
"""Training settings that leave the trained weights as they are: a resumed run may change them."""


def resume_differences(saved: Config, given: Config) -> list[str]:
    """What in ``given`` would train a resumed run differently from the run's saved config: every changed setting
    of the sections training reads (model, data, optim, train), but those in ``RESULT_NEUTRAL``; ``optim.epochs`` may
    grow (the cosine schedule is then stretched over the new length), not shrink."""
    differences = []
    for section in ("model", "data", "optim", "train"):
        before, after = (getattr(c, section).model_dump(mode="json") for c in (saved, given))
        for key in before:
            name = f"{section}.{key}"
            if before[key] == after[key] or name in RESULT_NEUTRAL:
                continue
            if name == "optim.epochs" and after[key] > before[key]:
                continue
            differences.append(f"{name} {before[key]!r} -> {after[key]!r}")
    return differences


def check_resume(run: RunDir, config: Config) -> None:
    """Refuse to resume a run with a config or classes other than those it was trained with, naming each
    difference, before anything is built (another ``model.name`` would otherwise fail on its weights)."""
    differences = resume_differences(run.config(), config)
    if differences:
        raise CatdogError(f"run {run.path} was trained with another config: {'; '.join(differences)}. Resume with "
                          f"its own config (jobs/train.py --out {run.path} --data DATA --resume, no --config and no "
                          "overrides but optim.epochs to train longer), or train into a new --out")


def _resume(run: RunDir, model, ema: ModelEmaV3 | None, optimizer, scheduler, classes: list[str],
            ) -> tuple[int, list[dict], dict]:
    """Load ``last.pt`` into the model, its EMA, optimizer and scheduler; returns the next epoch, history and best."""
    state = run.load_state()
    if state.get("classes", classes) != classes:
        raise CatdogError(f"run {run.path} was trained on classes {state['classes']}, but the data root has "
                          f"{classes}; resume with the data root it was trained on, or train into a new --out")
    models.load_weights(model, state["model"], f"run {run.path}: last.pt")
    if ema is not None:
        if state.get("ema") is None:
            raise CatdogError(f"run {run.path}: last.pt has no weight EMA but train.ema_decay is set; resume with the "
                              "run's own config.yaml (no --config), or train into a new --out")
        models.load_weights(ema.module, state["ema"], f"run {run.path}: last.pt (EMA)")
    try:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except (ValueError, KeyError) as exc:
        raise CatdogError(f"run {run.path}: last.pt's optimizer state does not fit this config ({exc}); "
                          "resume with the run's own config.yaml (no --config), or train into a new --out") from None
    return state["epoch"] + 1, state["history"], state["best"]


def linear_probe(run: RunDir, network: models.Network, loaders: dict, accelerator: Accelerator, transforms: dict,
                 config: Config, train_images: int) -> dict:
    """Fit the linear probe on the pretrained features, once, on the main process (a resumed run reads it back);
    returns its scores. The others send their share of the train sample's features, receive the fitted candidates
    and score their share of test and val (``probe.count_correct``); the main process keeps the best on test."""
    if not run.linear_probe_path.exists():
        sample = probe.pooled_features(network, loaders["train"], accelerator, transforms["train"],
                                       config.train.channels_last, "linear probe: train features")
        candidates = [probe.fit(sample, config.train.seed, of=train_images) if accelerator.is_main_process else None]
        if accelerator.num_processes > 1:
            broadcast_object_list(candidates)
        counts = {split: probe.count_correct(candidates[0], network, loaders[split], accelerator, transforms[split],
                                             config.train.channels_last, f"linear probe: {split}")
                  for split in ("test", "val")}
        if accelerator.is_main_process:
            probe.save(run, *probe.best(candidates[0], counts["test"], counts["val"]))
        accelerator.wait_for_everyone()
    state, scores = probe.load(run)
    accelerator.print(f"linear probe on the pretrained features (C = {scores['C']:g}): test "
                      f"{scores['test_accuracy']:.2%}, val {scores['val_accuracy']:.2%}")
    return {"state": state, **scores}


def _tracker_config(config: Config) -> dict:
    """The config flattened to ``section/key`` scalars, the form TensorBoard's hyperparameter table takes."""
    return {f"{section}/{key}": value if isinstance(value, (int, float, str, bool)) else str(value)
            for section, values in config.model_dump(mode="json").items() for key, value in values.items()}


def build_network(config: Config, num_classes: int) -> models.Network:
    """The network as configured (pretrained weights, frozen stages, BatchNorm statistics), in the memory format the
    loop feeds it."""
    network = models.create(config.model.name, num_classes, config.model.pretrained, config.model.drop_rate,
                            config.model.freeze_stages, config.model.cam_layer, config.model.batchnorm_statistics)
    return network.to(memory_format=torch.channels_last) if config.train.channels_last else network


def build_ema(config: Config, network: models.Network) -> ModelEmaV3 | None:
    """The weight EMA (timm's, with its warm-up: early steps average over fewer steps), when ``train.ema_decay``."""
    return ModelEmaV3(network, decay=config.train.ema_decay, use_warmup=True) if config.train.ema_decay else None


def build_loaders(config: Config, data_root: str | os.PathLike, classes: list[str], cache_dir: Path | None,
                  device: torch.device) -> tuple[dict, dict[str, DataLoader]]:
    """The datasets and loaders of the three splits (train augmented and shuffled) and of ``probe``: the train split
    without augmentation, for the linear probe (its loader reads the stratified sample of at most
    ``train.linear_probe_max_rows`` images). Each dataset's ``batch_transform`` finishes its batches on the device
    (data.cache).

    The train loader starts its workers afresh every epoch: they are seeded from the global generator when they
    start, which ``set_seed(seed + epoch)`` has just reset, so a resumed epoch draws the same augmentations as an
    uninterrupted one. Persistent workers would carry their generators over from the epochs before, which a
    resumed run never ran (the cost: forking two workers per epoch)."""
    datasets = {split: open_split(data_root, split, config.data, train=split == "train", classes=classes,
                                  cache_dir=cache_dir) for split in SPLITS}
    datasets["probe"] = datasets["train"].unaugmented(config.data)
    probe_rows = stratified_rows(np.asarray([sample.label for sample in datasets["train"].samples]),
                                 config.train.linear_probe_max_rows, config.train.seed).tolist()
    kept, fresh = (loader_options(config.data.num_workers, device, persistent=keep) for keep in (True, False))
    loaders = {"train": DataLoader(datasets["train"], config.data.batch_size, shuffle=True, **fresh),
               "test": DataLoader(datasets["test"], config.data.eval_batch_size, **kept),
               "val": DataLoader(datasets["val"], config.data.eval_batch_size, **kept),
               "probe": DataLoader(Subset(datasets["probe"], probe_rows), config.data.eval_batch_size, **fresh)}
    return datasets, loaders


def write_val_predictions(run: RunDir, dataset, val: dict, classes: list[str]) -> None:
    """The best weights' prediction for every val image, as ``jobs/predict.py --labelled DATA/val`` writes them (paths
    relative to the data root): what ``jobs/compare.py`` reads, with no second pass over the split."""
    items = [InputImage(Path(dataset.relative_path(i)), dataset.relative_path(i), sample.label)
             for i, sample in enumerate(dataset.samples)]
    rows = prediction_rows(items, val["probabilities"], val["predicted"], classes, labelled=True)
    write_text(run.val_predictions_path, csv_text(rows, csv_columns(classes, labelled=True)))


def summarize(config: Config, data_root: str | os.PathLike, classes: list[str], accelerator: Accelerator,
              precision: str, history: list[dict], best: dict, val: dict, baseline: dict | None) -> dict:
    """summary.json: the best epoch, its test and val accuracies beside the linear probe's, and the training speed;
    ``data``, the data root's absolute path, tells which runs can be compared."""
    train_seconds = sum(r["train_seconds"] for r in history)
    return {
        "model": config.model.name,
        "data": str(Path(data_root).resolve()),
        "classes": classes,
        "best_epoch": best["epoch"],
        "best_test_accuracy": best["test_accuracy"],
        "val_accuracy": val["accuracy_tta" if config.train.tta_hflip else "accuracy"],
        "tta_hflip": config.train.tta_hflip,
        **({"val_accuracy_no_tta": val["accuracy"]} if config.train.tta_hflip else {}),
        **({"linear_probe_test_accuracy": baseline["test_accuracy"],
            "linear_probe_val_accuracy": baseline["val_accuracy"]} if baseline else {}),
        "test_images": history[-1]["test_images"],
        "val_images": val["images"],
        "epochs": len(history),
        "train_seconds": train_seconds,
        "images_per_second": sum(sum(r["images_per_rank"]) for r in history) / train_seconds,
        "num_processes": accelerator.num_processes,
        "images_per_rank": history[-1]["images_per_rank"],
        "device": str(accelerator.device),
        "mixed_precision": precision,
    }


def train(config: Config, data_root: str | os.PathLike, out: str | os.PathLike, resume: bool = False) -> dict:
    """Fine-tune ``config.model`` on ``data_root`` and write the run directory ``out``, holding its writer lock once
    the inputs are checked. Returns the summary."""
    config = config.model_copy(update={"data": models.data_config(config.model.name, config.data)})
    run = RunDir(out)
    if run.state_path.exists() and not resume:
        raise CatdogError(f"run {run.path} already has a training state (last.pt): continue it with "
                          f"jobs/train.py --out {run.path} --data DATA_ROOT --resume, or choose another --out")
    if config.optim.head_init == "linear_probe" and not config.train.linear_probe:
        raise CatdogError("optim.head_init=linear_probe needs the linear probe: set train.linear_probe=true")
    classes = find_classes(data_root)
    if resume and run.state_path.exists():
        check_resume(run, config)
    with run.writer("train"):
        return fine_tune(config, data_root, run, classes, resume)


def fine_tune(config: Config, data_root: str | os.PathLike, run: RunDir, classes: list[str], resume: bool) -> dict:
    """The loop itself, on a checked config (``train``)."""
    remove_stale_temps_in(run.path)  # what a killed run was writing when it died
    accelerator, precision = accelerator_for(config.train.mixed_precision, config.train.cpu, config.train.cpu_threads,
                                             config.train.log_with, run.trackers_dir)
    require_shared_folder(accelerator, run.path, "--out")
    channels_last, tta = config.train.channels_last, config.train.tta_hflip

    # data, model, optimizer, schedule (built on the unsharded loader's length: Accelerate steps a prepared scheduler
    # once per process)
    datasets, loaders = build_loaders(config, data_root, classes, run.cache_dir if config.data.cache else None,
                                      accelerator.device)
    transforms = {name: dataset.batch_transform for name, dataset in datasets.items()}
    steps_per_epoch = min(len(loaders["train"]), config.train.max_train_batches or len(loaders["train"]))
    set_seed(config.train.seed)
    model = build_network(config, len(classes))
    optimizer = build_optimizer(config.optim, model)
    scheduler = build_scheduler(config.optim, optimizer, steps_per_epoch)
    model, optimizer, scheduler, *prepared = accelerator.prepare(model, optimizer, scheduler, *loaders.values())
    loaders = dict(zip(loaders, prepared))
    if accelerator.is_main_process:
        run.path.mkdir(parents=True, exist_ok=True)
        save_config(config, run.config_path)
    accelerator.print(f"{config.model.name}: {accelerator.num_processes} process(es) on {accelerator.device}, "
                      f"mixed precision {precision}, classes {classes}, train/test/val "
                      + "/".join(str(len(datasets[split])) for split in SPLITS) + " images")

    # the linear probe on the pretrained features: the baseline, and LP-FT's head (also when resuming: it is
    # WiSE-FT's start); then the weight EMA and the state of a killed run
    network = accelerator.unwrap_model(model)
    baseline = None
    if config.train.linear_probe:
        baseline = linear_probe(run, network, {**loaders, "train": loaders["probe"]}, accelerator,
                                {**transforms, "train": transforms["probe"]}, config, len(datasets["train"]))
        if config.optim.head_init == "linear_probe":
            network.head.load_state_dict(baseline["state"])
    start = {key: value.detach().clone() for key, value in network.state_dict().items()}  # for WiSE-FT
    ema = build_ema(config, network)
    start_epoch, history, best = 1, [], {"epoch": 0, "test_accuracy": -1.0}
    if resume and run.state_path.exists():
        start_epoch, history, best = _resume(run, network, ema, optimizer, scheduler, classes)
        accelerator.print(f"resuming {run.path} after epoch {start_epoch - 1} "
                          f"(best so far: epoch {best['epoch']}, test {best['test_accuracy']:.2%})")
    # what is evaluated and kept: the trained weights, or their EMA, mixed with the start by WiSE-FT
    mixing = config.train.wise_ft < 1
    evaluated = copy.deepcopy(network).eval() if mixing else ema.module if ema else model
    accelerator.init_trackers("train", config=_tracker_config(config))

    # per epoch: train, evaluate on test, keep the best weights and a resumable state
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=config.optim.label_smoothing)
    for epoch in range(start_epoch, config.optim.epochs + 1):
        set_seed(config.train.seed + epoch, device_specific=True)
        epoch_start = time.perf_counter()
        record = {"epoch": epoch, **train_one_epoch(model, loaders["train"], optimizer, scheduler, loss_fn,
                                                    accelerator, epoch, steps_per_epoch, channels_last,
                                                    transforms["train"], ema)}
        if mixing:
            evaluated.load_state_dict(wise_ft(start, (ema.module if ema else network).state_dict(),
                                              config.train.wise_ft))
        test = evaluate(evaluated, loaders["test"], accelerator, "test", channels_last, transforms["test"], tta)
        record.update(test_accuracy=test["accuracy_tta" if tta else "accuracy"], test_images=test["images"],
                      lr=scheduler.get_last_lr()[0], seconds=time.perf_counter() - epoch_start)
        if tta:
            record["test_accuracy_no_tta"] = test["accuracy"]
        history.append(record)
        accelerator.log({"test/accuracy": record["test_accuracy"], "train/epoch_loss": record["train_loss"],
                         "train/images_per_second": record["images_per_second"]},
                        step=epoch * -(-steps_per_epoch // accelerator.num_processes))
        accelerator.print(f"epoch {epoch}: train loss {record['train_loss']:.4f}, test {record['test_accuracy']:.2%} "
                          f"({record['test_images']} images), {record['images_per_second']:.1f} train images/s, "
                          f"{record['seconds']:.0f} s")
        improved = record["test_accuracy"] > best["test_accuracy"]
        if improved:
            best = {"epoch": epoch, "test_accuracy": record["test_accuracy"]}
        save_state(run, accelerator, model, ema, evaluated, optimizer, scheduler, epoch, history, best, improved,
                   classes)

    # at the end: the best weights on val
    if not run.best_checkpoint.exists():
        raise CatdogError(f"run {run.path}: no best checkpoint was written (optim.epochs = {config.optim.epochs})")
    accelerator.unwrap_model(evaluated).load_state_dict(run.load_weights())
    val = evaluate(evaluated, loaders["val"], accelerator, "val", channels_last, transforms["val"], tta, per_image=True)
    summary = summarize(config, data_root, classes, accelerator, precision, history, best, val, baseline)
    accelerator.log({"val/accuracy": summary["val_accuracy"]},
                    step=config.optim.epochs * -(-steps_per_epoch // accelerator.num_processes))
    accelerator.print(f"best epoch {best['epoch']}: test {best['test_accuracy']:.2%}, val {summary['val_accuracy']:.2%} "
                      f"({val['images']} images)" + (f"; linear probe: test {baseline['test_accuracy']:.2%}, val "
                                                     f"{baseline['val_accuracy']:.2%}" if baseline else ""))
    if accelerator.is_main_process:
        write_val_predictions(run, datasets["val"], val, classes)
        write_json(run.summary_path, summary)
    accelerator.end_training()
    return summary
