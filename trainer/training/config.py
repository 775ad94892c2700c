"""Training configuration: defaults, overridden by a YAML file, overridden by command-line flags.

The effective configuration is saved with the run (``config.yaml``) so a run can be repeated exactly
and ``--resume`` knows what it is continuing.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from serverless.errors import UserError


@dataclass
class TrainConfig:
    out: str = "runs/detector"
    arch: str = "fasterrcnn_resnet50_fpn_v2"
    weights: str = "coco"  # coco | imagenet | none | PATH (previous run, or a state_dict file)
    device: str = "auto"
    epochs: int = 50
    patience: int = 10  # epochs without validation mAP gain before stopping; 0 disables
    batch_size: int = 4
    image_size: int | None = None  # shorter side the model resizes to; None = architecture default
    max_size: int | None = None
    scale_jitter: float = 0.2  # train on shorter sides in [s*(1-j), s]; 0 disables
    lr: float | None = None  # None = per-optimizer default scaled by batch size
    optimizer: str = "sgd"  # sgd | adamw
    weight_decay: float | None = None
    scheduler: str = "cosine"  # cosine | step
    warmup_iters: int = 300
    clip_grad: float = 10.0
    amp: bool = True  # mixed precision on GPU (bf16 where supported, else fp16 + scaler)
    augment: str = "microscopy"  # none | flip | microscopy
    detections_per_img: int = 300
    roi_batch_size: int = 256  # R-CNN box-head samples per image (torchvision: 512); cost scales with it
    trainable_backbone_layers: int | None = None
    workers: int | None = None  # DataLoader workers; None = min(4, CPUs)
    cache_images: bool = False  # decode every image once and keep it in memory
    tile_size: int | None = None  # sliced inference in the served function for very large frames
    seed: int = 0
    resume: bool = False
    overwrite: bool = False

    def to_yaml(self, extra: dict[str, Any] | None = None) -> str:
        return yaml.safe_dump({**asdict(self), **(extra or {})}, sort_keys=False)


CHOICES = {
    "optimizer": ("sgd", "adamw"),
    "scheduler": ("cosine", "step"),
    "augment": ("none", "flip", "microscopy"),
}


def load_yaml(path: str | Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise UserError(f"{path}: cannot read config file: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: invalid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of option: value, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def apply_config_file(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Fill options the user did not give on the command line from ``--config``."""
    if not getattr(args, "config", None):
        return
    values = load_yaml(args.config)
    known = set(vars(args)) - {"config", "_run", "_parser", "command"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(
            f"{args.config}: unknown option(s) {', '.join(unknown)}; "
            f"expected some of: {', '.join(sorted(known))}"
        )
    for key, value in values.items():
        if getattr(args, key) == parser.get_default(key):
            setattr(args, key, value)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Build and validate the TrainConfig from parsed (and config-file-filled) arguments."""
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    values = {k: v for k, v in values.items() if v is not None}
    config = TrainConfig(**values)
    validate(config)
    return config


def validate(config: TrainConfig) -> None:
    for name, allowed in CHOICES.items():
        if getattr(config, name) not in allowed:
            raise UserError(f"{name}: {getattr(config, name)!r} is not one of {', '.join(allowed)}")
    positive = {"epochs": config.epochs, "batch_size": config.batch_size,
                "detections_per_img": config.detections_per_img}
    for name, value in positive.items():
        if not isinstance(value, int) or value < 1:
            raise UserError(f"{name}: expected a positive integer, got {value!r}")
    if config.image_size is not None and config.image_size < 32:
        raise UserError(f"image_size: expected at least 32 pixels, got {config.image_size}")
    if config.lr is not None and not config.lr > 0:
        raise UserError(f"lr: expected a positive learning rate, got {config.lr}")
    if not 0 <= config.scale_jitter < 1:
        raise UserError(f"scale_jitter: expected a fraction in [0, 1), got {config.scale_jitter}")
    if config.patience < 0:
        raise UserError(f"patience: expected 0 (off) or more epochs, got {config.patience}")
    if config.device not in ("auto", "cpu") and not config.device.startswith("cuda"):
        raise UserError(f"device: expected auto, cpu or cuda[:N], got {config.device!r}")
