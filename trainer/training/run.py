"""A training run: data → model → epochs with validation → calibrated bundle in ``runs/NAME``.

:func:`train` reads top-down like the torchvision references' ``main()``: open the run directory,
build the model and its data, resume, fit, finish. The run is plain data (:class:`Run`); the steps
are functions of it. Every epoch ends with a checkpoint (``checkpoints/last.pt``), so a crash or
Ctrl-C loses at most one epoch and ``--resume`` continues with the same model, optimizer,
scheduler, scaler, RNG and data order.
"""

from __future__ import annotations

import csv
import io
import math
import os
import platform
import random
import shutil
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch.utils.data import DataLoader

from serverless.architectures import Architecture, get_architecture
from serverless.bundle import (
    BEST_CHECKPOINT,
    CONFIG_YAML,
    HISTORY_CSV,
    LAST_CHECKPOINT,
    MODEL_JSON,
    BundleInfo,
    atomic_write,
    save_bundle,
)
from serverless.detector import pick_device
from serverless.errors import UserError
from trainer import __version__
from trainer.data.records import DetectionData
from trainer.data.splits import Split
from trainer.evaluation import plots, report
from trainer.evaluation.calibration import calibrate_thresholds
from trainer.evaluation.metrics import evaluate_detections, record_target
from trainer.training import checkpoint, distributed, weights
from trainer.training.config import TrainConfig
from trainer.training.dataset import DetectionDataset, GroupedBatchSampler, collate
from trainer.training.engine import Precision, predict, train_one_epoch
from trainer.training.transforms import train_size_range, train_transforms


@dataclass
class Progress:
    """What a checkpoint restores besides the tensors: where the run is and how it went."""

    next_epoch: int = 0
    best_map: float = -1.0  # validation mAP of the best epoch (minus the loss without validation)
    best_epoch: int = -1
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Run:
    """Everything one rank's training run holds."""

    config: TrainConfig
    data: DetectionData
    split: Split
    out: Path
    rank: int
    world: int
    device: torch.device
    spec: Architecture
    point: weights.StartingPoint
    model: torch.nn.Module  # DDP-wrapped once fitting starts on several ranks
    precision: Precision
    train_set: DetectionDataset
    sampler: GroupedBatchSampler
    train_loader: DataLoader
    val_set: DetectionDataset
    val_loader: DataLoader
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    progress: Progress = field(default_factory=Progress)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def net(self) -> torch.nn.Module:
        """The model without its DDP wrapper (what is saved and evaluated)."""
        return getattr(self.model, "module", self.model)


def train(config: TrainConfig, data: DetectionData, split: Split) -> Path:
    """Run training to completion (or early stop) and return the bundle directory.

    The caller has checked the run directory (:func:`check_run_dir`) before reading any data.
    """
    if not split["train"]:
        raise UserError("no training images after splitting; check the subsets and --labels")
    rank, world, device = distributed.init(pick_device(config.device))
    out = Path(config.out)
    try:
        if rank == 0:
            open_run_dir(config)
        distributed.barrier()
        run = build(config, data, split, out, rank, world, device)
        if config.resume:
            resume(run)
        if world > 1:
            run.model = torch.nn.parallel.DistributedDataParallel(
                run.model, device_ids=[device.index] if device.type == "cuda" else None
            )
        if run.main:
            print(plan(run), flush=True)
        fit(run)
        distributed.barrier()  # rank 0 has written best.pt
        info = finish(run)
        if info:
            print(f"bundle written to {out} (threshold {info.threshold:.2f})", flush=True)
        distributed.barrier()
    except KeyboardInterrupt:
        if rank == 0:
            print(f"\ninterrupted; continue with: --out {out} --resume", flush=True)
        raise
    finally:
        distributed.shutdown()
    return out


# ---------------------------------------------------------------- the run directory


def check_run_dir(config: TrainConfig) -> None:
    """Refuse to replace an existing run unless ``--overwrite``; ``--resume`` needs one.

    Called before any data is read, so a mistake costs nothing.
    """
    out = Path(config.out)
    last = out / LAST_CHECKPOINT
    if config.resume:
        if not last.exists():
            raise UserError(f"--resume: {last} does not exist; nothing to resume")
    elif out.exists() and any(out.iterdir()):
        if not config.overwrite:
            raise UserError(f"{out} already holds a run; pass --overwrite to replace it or --resume")
        if not ((out / MODEL_JSON).exists() or last.exists()):
            raise UserError(f"{out} is not empty and is not a run; refusing to delete it")


def open_run_dir(config: TrainConfig) -> None:
    """Create the run directory; a fresh run (checked by :func:`check_run_dir`) starts empty."""
    out = Path(config.out)
    if not config.resume and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


# ---------------------------------------------------------------- building


def build(config: TrainConfig, data: DetectionData, split: Split, out: Path, rank: int, world: int,
          device: torch.device) -> Run:
    """Model, data loaders, optimizer and schedule of a run, seeded."""
    seed_everything(config.seed)
    spec = get_architecture(config.arch)
    point = weights.resolve(config.weights, config.arch)
    size = image_size(config, spec)
    sizes = train_size_range(size, config.scale_jitter)
    model = weights.build_from(
        point, config.arch, data.labels,
        min_size=sizes if len(sizes) > 1 else size, max_size=config.max_size,
        detections_per_img=config.detections_per_img,
        trainable_backbone_layers=config.trainable_backbone_layers,
        **spec.training_options(config.roi_batch_size),
    ).to(device)
    loaders = _loaders(config, data, split, spec, rank, world, device)
    optimizer = make_optimizer(config, model, world)
    scheduler = make_scheduler(config, optimizer, len(loaders["train_loader"]))
    return Run(config, data, split, out, rank, world, device, spec, point, model,
               Precision(device, config.amp), optimizer=optimizer, scheduler=scheduler, **loaders)


def image_size(config: TrainConfig, spec: Architecture) -> int:
    return config.image_size or spec.min_size


def _loaders(config: TrainConfig, data: DetectionData, split: Split, spec: Architecture, rank: int,
             world: int, device: torch.device) -> dict[str, Any]:
    workers = config.workers if config.workers is not None else min(4, _cpus())
    common = {"collate_fn": collate, "num_workers": workers, "pin_memory": device.type == "cuda",
              "persistent_workers": workers > 0}
    train_set = DetectionDataset(
        split["train"], data.labels, train_transforms(config.augment),
        masks=spec.masks, seed=config.seed, cache_images=config.cache_images, max_pixels=data.max_pixels,
    )
    sampler = GroupedBatchSampler(
        train_set.aspect_ratios(), config.batch_size, seed=config.seed, rank=rank, world_size=world
    )
    train_loader = DataLoader(train_set, batch_sampler=sampler,
                              generator=torch.Generator().manual_seed(config.seed), **common)
    val_set = DetectionDataset(split["val"], data.labels, cache_images=config.cache_images,
                               max_pixels=data.max_pixels)
    shard = list(range(rank, len(val_set), world))
    val_loader = DataLoader(torch.utils.data.Subset(val_set, shard), batch_size=config.batch_size,
                            generator=torch.Generator().manual_seed(config.seed), **common)
    return {"train_set": train_set, "sampler": sampler, "train_loader": train_loader,
            "val_set": val_set, "val_loader": val_loader}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def default_lr(config: TrainConfig, world_size: int) -> float:
    """Linear scaling from torchvision's references (SGD 0.02 and AdamW 1e-4 at 16 images)."""
    base = 0.02 if config.optimizer == "sgd" else 1e-4
    return base * config.batch_size * world_size / 16


def make_optimizer(config: TrainConfig, model: torch.nn.Module, world_size: int):
    params = [p for p in model.parameters() if p.requires_grad]
    lr = config.lr or default_lr(config, world_size)
    if config.optimizer == "sgd":
        decay = 1e-4 if config.weight_decay is None else config.weight_decay
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=decay)
    decay = 0.05 if config.weight_decay is None else config.weight_decay
    return torch.optim.AdamW(params, lr=lr, weight_decay=decay)


def make_scheduler(config: TrainConfig, optimizer, iters_per_epoch: int):
    """Per-iteration schedule: linear warm-up, then cosine to zero or x0.1 steps at 2/3 and 8/9."""
    total = max(config.epochs * iters_per_epoch, 1)
    warmup = min(config.warmup_iters, max(iters_per_epoch - 1, 1))

    def factor(step: int) -> float:
        if step < warmup:
            return 0.001 + (1 - 0.001) * step / warmup
        progress = (step - warmup) / max(total - warmup, 1)
        if config.scheduler == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return 0.1 ** sum(progress >= m for m in (2 / 3, 8 / 9))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------- checkpoints


def save_checkpoint(run: Run) -> None:
    state = {
        "model": run.net.state_dict(), "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(), "scaler": run.precision.scaler.state_dict(),
        "epoch": run.progress.next_epoch - 1, "best_map": run.progress.best_map,
        "best_epoch": run.progress.best_epoch, "history": run.progress.history,
        "rng": checkpoint.rng_state(), "labels": run.data.labels,
    }
    checkpoint.save(run.out / LAST_CHECKPOINT, state)


def resume(run: Run) -> None:
    state = checkpoint.load(run.out / LAST_CHECKPOINT)
    if state["labels"] != run.data.labels:
        raise UserError(
            f"--resume: the data's labels {run.data.labels} differ from the run's {state['labels']}"
        )
    run.net.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if state["scaler"]:  # empty when the run was not in fp16 (a scaler refuses to load that)
        run.precision.scaler.load_state_dict(state["scaler"])
    run.progress = Progress(state["epoch"] + 1, state["best_map"], state["best_epoch"], state["history"])
    checkpoint.set_rng_state(state["rng"])
    if run.main:
        print(f"resuming {run.out} at epoch {run.progress.next_epoch + 1}", flush=True)


# ---------------------------------------------------------------- epochs


def fit(run: Run) -> None:
    """Train epoch after epoch, validating and checkpointing each, until the last or early stop."""
    config = run.config
    for epoch in range(run.progress.next_epoch, config.epochs):
        run.sampler.set_epoch(epoch)
        stats = train_one_epoch(
            run.model, run.train_loader, run.optimizer, run.scheduler, run.precision,
            clip_grad=config.clip_grad, epoch=epoch, epochs=config.epochs, show_progress=run.main,
        )
        metrics = evaluate(run)
        stop = run.main and record_epoch(run, epoch, stats, metrics)
        if distributed.broadcast(stop):
            break


def validate(run: Run) -> tuple[list[dict], list[dict]]:
    """Ground truth and raw predictions of the validation split, gathered on rank 0."""
    # the bare network: DDP's forward would sync buffers, a collective with uneven shards
    shards = distributed.gather(predict(run.net, run.val_loader, run.precision))
    preds_by_index = {k: v for shard in shards for k, v in shard.items()}
    order = sorted(preds_by_index)
    gts = [record_target(run.val_set.records[i], run.val_set.class_of) for i in order]
    return gts, [preds_by_index[i] for i in order]


def evaluate(run: Run) -> dict[str, float]:
    if not len(run.val_set):
        return {}
    gts, preds = validate(run)
    if not run.main:
        return {}
    result = evaluate_detections(gts, preds, run.data.labels, max_dets=run.config.detections_per_img)
    return {"val_mAP": result.mAP, "val_mAP50": result.mAP50}


def record_epoch(run: Run, epoch: int, stats: dict[str, float], metrics: dict[str, float]) -> bool:
    """Log the epoch, keep the best weights, checkpoint; True when early stopping triggers."""
    progress = run.progress
    score = metrics.get("val_mAP", -float(stats["loss"]))  # no validation: lowest loss wins
    improved = score > progress.best_map
    if improved:
        progress.best_map, progress.best_epoch = score, epoch
        checkpoint.save(run.out / BEST_CHECKPOINT, run.net.state_dict())
    progress.history.append({"epoch": epoch + 1, **stats, **metrics})
    progress.next_epoch = epoch + 1
    save_checkpoint(run)
    _write_history(run.out / HISTORY_CSV, progress.history)
    print(_summary_line(epoch, run.config.epochs, stats, metrics, improved), flush=True)
    patience = run.config.patience
    if patience and epoch - progress.best_epoch >= patience:
        print(f"early stopping: no validation mAP gain for {patience} epochs", flush=True)
        return True
    return False


def _write_history(path: Path, history: list[dict[str, Any]]) -> None:
    keys = list(dict.fromkeys(k for row in history for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys)
    writer.writeheader()
    writer.writerows(history)
    atomic_write(path, lambda f: f.write(buffer.getvalue().encode()))


# ---------------------------------------------------------------- the bundle


def finish(run: Run) -> BundleInfo | None:
    """Reload the best epoch, calibrate thresholds, write the bundle, reports and plots.

    Every rank takes part (validation is sharded); rank 0 alone writes.
    """
    run.net.load_state_dict(checkpoint.load(run.out / BEST_CHECKPOINT))
    validation = validate(run) if len(run.val_set) else None
    if not run.main:
        return None
    info = bundle_info(run)
    if validation:
        info = _calibrate_and_report(run, info, *validation)
    save_bundle(run.out, info, run.net.state_dict())
    config_yaml = run.config.to_yaml()
    atomic_write(run.out / CONFIG_YAML, lambda f: f.write(config_yaml.encode()))
    return info


def bundle_info(run: Run) -> BundleInfo:
    config = run.config
    return BundleInfo(
        architecture=config.arch, labels=list(run.data.labels), shape_type=run.spec.shape_type,
        min_size=image_size(config, run.spec), max_size=config.max_size,
        detections_per_img=config.detections_per_img, tile_size=config.tile_size,
        provenance=provenance(run),
    )


def provenance(run: Run) -> dict[str, Any]:
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "data": run.data.summary(),
        "split": run.split.counts(),
        "split_options": run.split.options.to_dict(),
        "weights": {"kind": run.point.kind, "source": run.point.source},
        "parent_run": run.point.source if run.point.kind == "run" else None,
        "epochs_run": len(run.progress.history), "best_epoch": run.progress.best_epoch + 1,
        "config": asdict(run.config),
        "versions": {"cvat_detector": __version__, "torch": torch.__version__,
                     "torchvision": torchvision.__version__, "python": platform.python_version()},
        "device": str(run.device) + (f" ({torch.cuda.get_device_name(run.device)})"
                                     if run.device.type == "cuda" else ""),
        "precision": run.precision.choice.name,
    }


def _calibrate_and_report(run: Run, info: BundleInfo, gts: list[dict], preds: list[dict]) -> BundleInfo:
    result = evaluate_detections(gts, preds, info.labels, max_dets=info.detections_per_img)
    calibration = calibrate_thresholds(gts, preds, info.labels)
    info.threshold = float(calibration.threshold)
    info.class_thresholds = {k: float(v) for k, v in calibration.class_thresholds.items()}
    info.metrics = {"validation": result.to_dict(), "calibration": calibration.to_dict()}
    report.write_reports(run.out, result, calibration)
    samples = [(run.val_set.image(i), preds[i], gts[i]) for i in range(min(4, len(preds)))]
    plots.write_plots(run.out, calibration, samples)
    print(report.format_table(result, calibration), flush=True)
    return info


# ---------------------------------------------------------------- what the user reads


def plan(run: Run) -> str:
    c = run.config
    devices = f"{run.world} x {run.device.type}" if run.world > 1 else str(run.device)
    return (
        f"training {c.arch} ({run.point.kind} weights) on {devices}: "
        f"{len(run.train_set)} train / {len(run.val_set)} val images, {len(run.data.labels)} labels, "
        f"shorter side {image_size(c, run.spec)}, batch {c.batch_size}, up to {c.epochs} epochs, "
        f"precision {run.precision.choice} -> {run.out}"
    )


def _summary_line(epoch: int, epochs: int, stats: dict, metrics: dict, improved: bool) -> str:
    parts = [f"epoch {epoch + 1}/{epochs}", f"loss {stats['loss']:.3f}", f"lr {stats['lr']:.2e}",
             f"{stats['images_per_s']:.1f} img/s"]
    if metrics:
        parts += [f"val mAP {metrics['val_mAP']:.3f}", f"mAP50 {metrics['val_mAP50']:.3f}"]
    return "  ".join(parts) + ("  *best*" if improved else "")


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
