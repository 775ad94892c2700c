"""Training configuration: defaults, overridden by a YAML file, overridden by command-line flags.

:class:`TrainConfig` is the one definition of every training option: each field's metadata gives
its help text, choices and parser, from which :mod:`trainer.commands` builds the ``train`` flags
and reads ``--config`` files. The effective configuration is saved with the run (``config.yaml``)
so a run can be repeated exactly and ``--resume`` knows what it is continuing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import yaml

from serverless.architectures import ARCHITECTURES, DEFAULT_ARCH, get_architecture
from serverless.errors import UserError
from serverless.precision import MODES as PRECISION_MODES
from trainer.data.options import option

AUGMENT_PRESETS = ("none", "flip", "microscopy")
OPTIMIZERS = ("sgd", "adamw")
#: ``--amp`` values; YAML ``amp: false``/``true`` (older configs) read as off/auto.
AMP_BOOLEANS = {"false": "off", "true": "auto"}
SCHEDULERS = ("cosine", "step")


def parse_device(text: str) -> str:
    if text not in ("auto", "cpu") and not text.startswith("cuda"):
        raise ValueError(f"expected auto, cpu or cuda[:N], got {text!r}")
    return text


def parse_amp(text: str) -> str:
    return AMP_BOOLEANS.get(text.lower(), text)


@dataclass
class TrainConfig:
    out: str = option("runs/detector", "run directory for the bundle")
    arch: str = option(DEFAULT_ARCH, f"one of: {', '.join(ARCHITECTURES)}")
    weights: str = option("coco", "coco | imagenet | none | previous run dir | state_dict file")
    device: str = option("auto", "auto | cpu | cuda[:N]", parse=parse_device)
    epochs: int = option(50, "maximum epochs")
    patience: int = option(10, "stop after this many epochs without val mAP gain; 0 = never")
    batch_size: int = option(4, "images per GPU")
    image_size: int | None = option(None, "shorter side the model resizes to (default: per architecture)")
    max_size: int | None = option(None, "longer-side cap (default: per architecture)")
    scale_jitter: float = option(0.2, "train on shorter sides down to size*(1-J)")
    lr: float | None = option(None, "learning rate (default: 0.02 SGD / 1e-4 AdamW per 16 images)")
    optimizer: str = option("sgd", "optimizer", choices=OPTIMIZERS)
    weight_decay: float | None = option(None, "weight decay (default: 1e-4 SGD / 0.05 AdamW)")
    scheduler: str = option("cosine", "learning-rate schedule after the warm-up", choices=SCHEDULERS)
    warmup_iters: int = option(300, "iterations of linear learning-rate warm-up")
    clip_grad: float = option(10.0, "max gradient norm; 0 disables")
    amp: str = option(
        "auto", "mixed precision on GPU: auto = bf16 on compute capability 8.0+, fp16 on 7.x, else fp32 "
        "(default); bf16/fp16 force one; off = fp32", choices=PRECISION_MODES, parse=parse_amp)
    augment: str = option(
        "microscopy", "microscopy adds vertical flips, 90-degree rotations, colour jitter (default)",
        choices=AUGMENT_PRESETS)
    detections_per_img: int = option(300, "most objects reported per image")
    roi_batch_size: int = option(256, "R-CNN box-head samples per image; lower trains faster")
    trainable_backbone_layers: int | None = option(None, "0-5, for pretrained backbones")
    workers: int | None = option(None, "DataLoader workers (default: min(4, CPUs))")
    cache_images: bool = option(False, "decode every image once, keep in RAM")
    tile_size: int | None = option(None, "serve very large frames in tiles of this size")
    seed: int = option(0, "seed of the split, the sampler and the augmentations")
    resume: bool = option(False, "continue the run in --out from its last epoch")
    overwrite: bool = option(False, "replace an existing run in --out")

    def to_yaml(self, extra: dict[str, Any] | None = None) -> str:
        return yaml.safe_dump({**asdict(self), **(extra or {})}, sort_keys=False)

    def validate(self) -> None:
        get_architecture(self.arch)
        positive = {"epochs": self.epochs, "batch_size": self.batch_size,
                    "detections_per_img": self.detections_per_img}
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise UserError(f"{name}: expected a positive integer, got {value!r}")
        if self.image_size is not None and self.image_size < 32:
            raise UserError(f"image_size: expected at least 32 pixels, got {self.image_size}")
        if self.lr is not None and not self.lr > 0:
            raise UserError(f"lr: expected a positive learning rate, got {self.lr}")
        if not 0 <= self.scale_jitter < 1:
            raise UserError(f"scale_jitter: expected a fraction in [0, 1), got {self.scale_jitter}")
        if self.patience < 0:
            raise UserError(f"patience: expected 0 (off) or more epochs, got {self.patience}")
