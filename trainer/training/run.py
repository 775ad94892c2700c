"""A training run: data → model → epochs with validation → calibrated bundle in ``runs/NAME``.

Every epoch ends with a checkpoint (``checkpoints/last.pt``), so a crash or Ctrl-C loses at most one
epoch and ``--resume`` continues with the same model, optimizer, scheduler, scaler, RNG and data order.
"""

from __future__ import annotations

import csv
import io
import math
import os
import platform
import random
import shutil
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch.utils.data import DataLoader

from serverless.architectures import get_architecture
from serverless.bundle import MODEL_JSON, BundleInfo, atomic_write, save_bundle
from serverless.detector import pick_device
from serverless.errors import UserError
from trainer import __version__
from trainer.data.records import DetectionData, ImageRecord
from trainer.training import checkpoint, distributed, weights
from trainer.training.config import TrainConfig
from trainer.training.dataset import DetectionDataset, GroupedBatchSampler, collate
from trainer.training.engine import Precision, predict, train_one_epoch
from trainer.training.transforms import train_size_range, train_transforms

HISTORY = "history.csv"


def check_run_dir(config: TrainConfig) -> None:
    """Refuse to replace an existing run unless ``--overwrite``; ``--resume`` needs one.

    Called before any data is read, so a mistake costs nothing.
    """
    out = Path(config.out)
    last = out / "checkpoints" / checkpoint.LAST
    if config.resume:
        if not last.exists():
            raise UserError(f"--resume: {last} does not exist; nothing to resume")
    elif out.exists() and any(out.iterdir()):
        if not config.overwrite:
            raise UserError(f"{out} already holds a run; pass --overwrite to replace it or --resume")
        if not ((out / MODEL_JSON).exists() or last.exists()):
            raise UserError(f"{out} is not empty and is not a run; refusing to delete it")


def prepare_run_dir(config: TrainConfig) -> Path:
    """The run directory, emptied for a fresh run (after :func:`check_run_dir`)."""
    check_run_dir(config)
    out = Path(config.out)
    if not config.resume and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


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


class Run:
    """The state of one training run on one rank."""

    def __init__(self, config: TrainConfig, data: DetectionData, splits: dict[str, list[ImageRecord]],
                 split_options: dict[str, Any] | None = None):
        self.config, self.data = config, data
        self.split_options = split_options or {}
        self.rank, self.world, self.device = distributed.init(pick_device(config.device))
        self.main = self.rank == 0
        self.spec = get_architecture(config.arch)
        if not splits.get("train"):
            raise UserError("no training images after splitting; check the subsets and --labels")
        self.splits = splits
        self.out = prepare_run_dir(config) if self.main else Path(config.out)
        distributed.barrier()
        seed_everything(config.seed)
        self.point = weights.resolve(config.weights, config.arch)
        self.model = self._build_model()
        self.precision = Precision(self.device, config.amp)
        self._build_loaders()
        self.optimizer = make_optimizer(config, self.model, self.world)
        self.scheduler = make_scheduler(config, self.optimizer, len(self.train_loader))
        self.history: list[dict[str, Any]] = []
        self.best_map, self.best_epoch, self.start_epoch = -1.0, -1, 0

    @property
    def size(self) -> int:
        return self.config.image_size or self.spec.min_size

    def _build_model(self) -> torch.nn.Module:
        sizes = train_size_range(self.size, self.config.scale_jitter)
        extra = self.spec.training_options(self.config.roi_batch_size)
        model = weights.build_from(
            self.point, self.config.arch, self.data.labels,
            min_size=sizes if len(sizes) > 1 else self.size,
            max_size=self.config.max_size,
            detections_per_img=self.config.detections_per_img,
            trainable_backbone_layers=self.config.trainable_backbone_layers, **extra,
        )
        return model.to(self.device)

    def _build_loaders(self) -> None:
        config, pin = self.config, self.device.type == "cuda"
        workers = config.workers if config.workers is not None else min(4, _cpus())
        common = {"collate_fn": collate, "num_workers": workers, "pin_memory": pin,
                  "persistent_workers": workers > 0}
        self.train_set = DetectionDataset(
            self.splits["train"], self.data.labels, train_transforms(config.augment),
            masks=self.spec.masks, seed=config.seed, cache_images=config.cache_images,
        )
        self.sampler = GroupedBatchSampler(
            self.train_set.aspect_ratios(), config.batch_size, seed=config.seed,
            rank=self.rank, world_size=self.world,
        )
        self.train_loader = DataLoader(
            self.train_set, batch_sampler=self.sampler,
            generator=torch.Generator().manual_seed(config.seed), **common,
        )
        self.val_set = DetectionDataset(self.splits.get("val", []), self.data.labels,
                                        cache_images=config.cache_images)
        shard = list(range(self.rank, len(self.val_set), self.world))
        self.val_loader = DataLoader(
            torch.utils.data.Subset(self.val_set, shard), batch_size=config.batch_size,
            generator=torch.Generator().manual_seed(config.seed), **common,
        )

    @property
    def net(self) -> torch.nn.Module:
        """The model without its DDP wrapper (what is saved and evaluated)."""
        return getattr(self.model, "module", self.model)

    def ddp(self) -> None:
        if self.world > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )

    # checkpoints ---------------------------------------------------------------------------------

    def save_checkpoint(self, epoch: int) -> None:
        state = {
            "model": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.precision.scaler.state_dict(),
            "epoch": epoch, "best_map": self.best_map, "best_epoch": self.best_epoch,
            "history": self.history, "rng": checkpoint.rng_state(), "labels": self.data.labels,
        }
        checkpoint.save(self.out / "checkpoints" / checkpoint.LAST, state)

    def resume(self) -> None:
        state = checkpoint.load(self.out / "checkpoints" / checkpoint.LAST)
        if state["labels"] != self.data.labels:
            raise UserError(
                f"--resume: the data's labels {self.data.labels} differ from the run's {state['labels']}"
            )
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.precision.scaler.load_state_dict(state["scaler"])
        self.best_map, self.best_epoch = state["best_map"], state["best_epoch"]
        self.history, self.start_epoch = state["history"], state["epoch"] + 1
        checkpoint.set_rng_state(state["rng"])

    # epochs ---------------------------------------------------------------------------------------

    def validate(self) -> tuple[list[dict], list[dict]]:
        """Ground truth and raw predictions of the validation split, gathered on rank 0."""
        # the bare network: DDP's forward would sync buffers, a collective with uneven shards
        from trainer.evaluation.metrics import record_target

        shards = distributed.gather(predict(self.net, self.val_loader, self.precision))
        preds_by_index = {k: v for shard in shards for k, v in shard.items()}
        order = sorted(preds_by_index)
        gts = [record_target(self.val_set.records[i], self.val_set.class_of) for i in order]
        return gts, [preds_by_index[i] for i in order]

    def evaluate(self) -> dict[str, float]:
        from trainer.evaluation.metrics import evaluate_detections

        if not len(self.val_set):
            return {}
        gts, preds = self.validate()
        if not self.main:
            return {}
        result = evaluate_detections(gts, preds, self.data.labels, max_dets=self.config.detections_per_img)
        return {"val_mAP": result.mAP, "val_mAP50": result.mAP50}

    def fit(self) -> None:
        config = self.config
        for epoch in range(self.start_epoch, config.epochs):
            self.sampler.set_epoch(epoch)
            stats = train_one_epoch(
                self.model, self.train_loader, self.optimizer, self.scheduler, self.precision,
                clip_grad=config.clip_grad, epoch=epoch, epochs=config.epochs, show_progress=self.main,
            )
            metrics = self.evaluate()
            stop = self.main and self._record(epoch, stats, metrics)
            if distributed.broadcast(stop):
                break

    def _record(self, epoch: int, stats: dict[str, float], metrics: dict[str, float]) -> bool:
        """Log the epoch, keep the best weights, checkpoint; True when early stopping triggers."""
        score = metrics.get("val_mAP", -float(stats["loss"]))  # no validation: lowest loss wins
        improved = score > self.best_map
        if improved:
            self.best_map, self.best_epoch = score, epoch
            checkpoint.save(self.out / "checkpoints" / checkpoint.BEST, self.net.state_dict())
        self.history.append({"epoch": epoch + 1, **stats, **metrics})
        self.save_checkpoint(epoch)
        self._write_history()
        print(_summary_line(epoch, self.config.epochs, stats, metrics, improved), flush=True)
        patience = self.config.patience
        if patience and epoch - self.best_epoch >= patience:
            print(f"early stopping: no validation mAP gain for {patience} epochs", flush=True)
            return True
        return False

    def _write_history(self) -> None:
        keys = list(dict.fromkeys(k for row in self.history for k in row))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=keys)
        writer.writeheader()
        writer.writerows(self.history)
        atomic_write(self.out / HISTORY, lambda f: f.write(buffer.getvalue().encode()))

    # the bundle -----------------------------------------------------------------------------------

    def finish(self, config_yaml: str) -> BundleInfo | None:
        """Reload the best epoch, calibrate thresholds, write the bundle, reports and plots.

        Every rank takes part (validation is sharded); rank 0 alone writes.
        """
        best = checkpoint.load(self.out / "checkpoints" / checkpoint.BEST)
        self.net.load_state_dict(best)
        validation = self.validate() if len(self.val_set) else None
        if not self.main:
            return None
        info = self._bundle_info()
        if validation:
            info = self._calibrate_and_report(info, *validation)
        save_bundle(self.out, info, self.net.state_dict())
        atomic_write(self.out / "config.yaml", lambda f: f.write(config_yaml.encode()))
        return info

    def _bundle_info(self) -> BundleInfo:
        config = self.config
        return BundleInfo(
            architecture=config.arch, labels=list(self.data.labels),
            shape_type=self.spec.shape_type,
            min_size=self.size, max_size=config.max_size,
            detections_per_img=config.detections_per_img, tile_size=config.tile_size,
            provenance=self._provenance(),
        )

    def _provenance(self) -> dict[str, Any]:
        return {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "data": self.data.summary(),
            "split": {name: len(records) for name, records in self.splits.items()},
            "split_options": self.split_options,
            "weights": {"kind": self.point.kind, "source": self.point.source},
            "parent_run": self.point.source if self.point.kind == "run" else None,
            "epochs_run": len(self.history), "best_epoch": self.best_epoch + 1,
            "config": asdict(self.config),
            "versions": {"cvat_detector": __version__, "torch": torch.__version__,
                         "torchvision": torchvision.__version__, "python": platform.python_version()},
            "device": str(self.device) + (f" ({torch.cuda.get_device_name(self.device)})"
                                          if self.device.type == "cuda" else ""),
        }

    def _calibrate_and_report(self, info: BundleInfo, gts: list[dict], preds: list[dict]) -> BundleInfo:
        from trainer.evaluation import plots, report
        from trainer.evaluation.calibration import calibrate_thresholds
        from trainer.evaluation.metrics import evaluate_detections

        result = evaluate_detections(gts, preds, info.labels, max_dets=info.detections_per_img)
        calibration = calibrate_thresholds(gts, preds, info.labels)
        info.threshold = float(calibration.threshold)
        info.class_thresholds = {k: float(v) for k, v in calibration.class_thresholds.items()}
        info.metrics = {"validation": result.to_dict(), "calibration": calibration.to_dict()}
        report.write_reports(self.out, result, calibration)
        samples = [(self.val_set.image(i), preds[i], gts[i]) for i in range(min(4, len(preds)))]
        plots.write_plots(self.out, calibration, samples)
        print(report.format_table(result, calibration), flush=True)
        return info


def train(
    config: TrainConfig,
    data: DetectionData,
    splits: dict[str, list[ImageRecord]],
    split_options: dict[str, Any] | None = None,
) -> Path:
    """Run training to completion (or early stop) and return the bundle directory."""
    run = Run(config, data, splits, split_options)
    try:
        if config.resume:
            run.resume()
            if run.main:
                print(f"resuming {run.out} at epoch {run.start_epoch + 1}", flush=True)
        run.ddp()
        if run.main:
            _print_plan(run)
        run.fit()
        distributed.barrier()  # rank 0 has written best.pt
        info = run.finish(config.to_yaml())
        if info:
            print(f"bundle written to {run.out} (threshold {info.threshold:.2f})", flush=True)
        distributed.barrier()
    except KeyboardInterrupt:
        if run.main:
            print(f"\ninterrupted; continue with: --out {run.out} --resume", flush=True)
        raise
    finally:
        distributed.shutdown()
    return run.out


def _print_plan(run: Run) -> None:
    c = run.config
    devices = f"{run.world} x {run.device.type}" if run.world > 1 else str(run.device)
    print(
        f"training {c.arch} ({run.point.kind} weights) on {devices}: "
        f"{len(run.train_set)} train / {len(run.val_set)} val images, {len(run.data.labels)} labels, "
        f"shorter side {run.size}, batch {c.batch_size}, up to {c.epochs} epochs -> {run.out}",
        flush=True,
    )


def _summary_line(epoch: int, epochs: int, stats: dict, metrics: dict, improved: bool) -> str:
    parts = [f"epoch {epoch + 1}/{epochs}", f"loss {stats['loss']:.3f}", f"lr {stats['lr']:.2e}",
             f"{stats['images_per_s']:.1f} img/s"]
    if metrics:
        parts += [f"val mAP {metrics['val_mAP']:.3f}", f"mAP50 {metrics['val_mAP50']:.3f}"]
    return "  ".join(parts) + ("  *best*" if improved else "")


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

