"""Augmentations on uint8 images with their boxes and masks (torchvision.transforms.v2).

Scale jitter is not here: the detector's own transform resizes, and is given a range of shorter
sides during training (see ``train_size_range``), so images are resized once, on the device.
"""

from __future__ import annotations

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2


class RandomRot90(torch.nn.Module):
    """Rotate by a random multiple of 90 degrees, exactly: pixels, boxes and masks move together.

    Microscope slides have no "up"; unlike an arbitrary-angle rotation this never enlarges boxes.
    """

    def forward(self, image: tv_tensors.Image, target: dict) -> tuple[tv_tensors.Image, dict]:
        k = int(torch.randint(4, ()))
        if k == 0:
            return image, target
        target = dict(target)
        boxes = target["boxes"]
        for _ in range(k):
            width = image.shape[-1]
            x1, y1, x2, y2 = boxes.unbind(-1)
            rotated = torch.stack([y1, width - x2, y2, width - x1], dim=-1)
            image = tv_tensors.wrap(torch.rot90(image, 1, dims=(-2, -1)), like=image)
            boxes = tv_tensors.BoundingBoxes(
                rotated, format="XYXY", canvas_size=tuple(image.shape[-2:])
            )
        target["boxes"] = boxes
        if "masks" in target:
            target["masks"] = tv_tensors.wrap(
                torch.rot90(target["masks"], k, dims=(-2, -1)), like=target["masks"]
            )
        return image, target


def train_transforms(preset: str) -> v2.Compose | None:
    """The augmentation pipeline for a preset; ``None`` means images pass through untouched."""
    if preset == "none":
        return None
    steps: list[torch.nn.Module] = [v2.RandomHorizontalFlip(0.5)]
    if preset == "microscopy":
        steps += [
            v2.RandomVerticalFlip(0.5),
            RandomRot90(),
            v2.RandomApply([v2.ColorJitter(0.2, 0.2, 0.2, 0.02)], p=0.5),
        ]
    steps.append(v2.SanitizeBoundingBoxes(min_size=1.0))
    return v2.Compose(steps)


def train_size_range(size: int, jitter: float, step: int = 32) -> tuple[int, ...]:
    """Shorter sides for multi-scale training: from size*(1-jitter) up to size, in steps."""
    low = max(32, round(size * (1 - jitter)))
    sizes = list(range(size, low - 1, -step))[::-1]
    return tuple(sizes) if sizes else (size,)
