"""One training epoch and batched prediction, shared by ``train``, the benchmarks and the demo."""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from serverless.errors import UserError
from serverless.precision import choose_precision


@dataclass
class Precision:
    """The compute dtype of training, chosen as the function chooses it
    (:func:`serverless.precision.choose_precision`; ``mode`` is ``--amp``), and for fp16 the
    gradient scaler that keeps small gradients from underflowing."""

    device: torch.device
    mode: str = "auto"

    def __post_init__(self) -> None:
        self.choice = choose_precision(self.device, self.mode)
        self.dtype = self.choice.dtype
        self.enabled = self.choice.autocast
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.choice.name == "fp16")

    def autocast(self) -> torch.autocast:
        return self.choice.context(self.device)


def to_device(images: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """uint8 CHW tensors → float [0, 1] on the device (the transfer moves 4x fewer bytes)."""
    return [im.to(device, non_blocking=True).float().div_(255.0) for im in images]


def targets_to_device(targets: list[dict], device: torch.device) -> list[dict]:
    keys = ("boxes", "labels", "masks")
    return [{k: t[k].to(device, non_blocking=True) for k in keys if k in t} for t in targets]


def train_one_epoch(
    model: torch.nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    precision: Precision,
    *,
    clip_grad: float,
    epoch: int,
    epochs: int,
    show_progress: bool = True,
) -> dict[str, float]:
    """Train for one pass over ``loader``; returns mean losses, learning rate and throughput."""
    model.train()
    device = precision.device
    sums: dict[str, float] = defaultdict(float)
    seen, steps, start = 0, 0, time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", leave=False, disable=not show_progress,
               dynamic_ncols=True, unit="batch")
    for images, targets in bar:
        images, targets = to_device(images, device), targets_to_device(targets, device)
        with precision.autocast():
            losses = model(images, targets)
        loss = sum(losses.values())
        if not math.isfinite(loss.item()):
            raise UserError(
                f"loss became {loss.item()} at epoch {epoch + 1} ({_fmt(losses)}); "
                "lower --lr or check the annotations"
            )
        optimizer.zero_grad(set_to_none=True)
        precision.scaler.scale(loss).backward()
        if clip_grad > 0:
            precision.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        precision.scaler.step(optimizer)
        precision.scaler.update()
        scheduler.step()
        steps, seen = steps + 1, seen + len(images)
        sums["loss"] += loss.item()
        for name, value in losses.items():
            sums[name] += value.item()
        bar.set_postfix(loss=f"{sums['loss'] / steps:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    elapsed = time.perf_counter() - start
    result = {name: total / max(steps, 1) for name, total in sums.items()}
    result.update(lr=optimizer.param_groups[0]["lr"], images_per_s=seen / max(elapsed, 1e-9),
                  seconds=elapsed)
    return result


@torch.inference_mode()
def predict(
    model: torch.nn.Module,
    loader: Iterable,
    precision: Precision,
    *,
    show_progress: bool = False,
    desc: str = "validate",
    masks: bool = False,
) -> dict[int, dict[str, np.ndarray]]:
    """Raw detections (no score threshold beyond the model's own) keyed by dataset index.

    Full-image masks of hundreds of detections per image are only kept when asked for.
    """
    model.eval()
    results: dict[int, dict[str, np.ndarray]] = {}
    for images, targets in tqdm(loader, desc=desc, leave=False, disable=not show_progress, unit="batch"):
        with precision.autocast():
            outputs = model(to_device(images, precision.device))
        for target, output in zip(targets, outputs, strict=True):
            results[int(target["image_id"])] = _to_numpy(output, masks)
    return results


def _to_numpy(output: dict[str, torch.Tensor], masks: bool) -> dict[str, np.ndarray]:
    out = {
        "boxes": output["boxes"].float().cpu().numpy(),
        "scores": output["scores"].float().cpu().numpy(),
        "labels": output["labels"].cpu().numpy().astype(np.int64),
    }
    if masks and "masks" in output:
        out["masks"] = (output["masks"][:, 0] >= 0.5).cpu().numpy()
    return out


def _fmt(losses: dict[str, torch.Tensor]) -> str:
    return ", ".join(f"{k}={v.item():.3g}" for k, v in losses.items())
