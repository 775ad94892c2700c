"""Torch dataset and batching for detection training.

Samples are uint8 ``tv_tensors.Image`` with ``BoundingBoxes`` (and ``Mask``) targets, so v2
augmentations move pixels and geometry together; conversion to float happens on the device.
Augmentation randomness is keyed by (seed, epoch, index) rather than by worker state, which makes a
resumed run see exactly the samples an uninterrupted one would.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler
from torchvision import tv_tensors

from serverless.imageio import read_image
from trainer.data.records import ImageRecord


class DetectionDataset(Dataset):
    """ImageRecords as (image, target) pairs; indexed by ``(index, epoch)`` during training."""

    def __init__(
        self,
        records: Sequence[ImageRecord],
        labels: Sequence[str],
        transforms: torch.nn.Module | None = None,
        *,
        masks: bool = False,
        seed: int = 0,
        cache_images: bool = False,
        max_pixels: int | None = None,
    ) -> None:
        self.records = list(records)
        self.max_pixels = max_pixels  # the limit the data was checked against (None: the default)
        self.class_of = {name: i + 1 for i, name in enumerate(labels)}
        self.transforms = transforms
        self.masks = masks
        self.seed = seed
        self._cache: list[np.ndarray] | None = None
        if cache_images:  # decoded before workers fork, so they share the pages
            with ThreadPoolExecutor(4) as pool:
                self._cache = list(pool.map(lambda r: read_image(r.path, max_pixels), self.records))

    def __len__(self) -> int:
        return len(self.records)

    def aspect_ratios(self) -> list[float]:
        return [r.width / max(r.height, 1) for r in self.records]

    def image(self, index: int) -> np.ndarray:
        if self._cache is not None:
            return self._cache[index]
        return read_image(self.records[index].path, self.max_pixels)

    def target(self, index: int) -> dict[str, torch.Tensor]:
        record = self.records[index]
        shapes = [s for s in record.shapes if s.label in self.class_of]
        boxes = torch.tensor([s.box for s in shapes], dtype=torch.float32).reshape(-1, 4)
        target = {
            "boxes": tv_tensors.BoundingBoxes(
                boxes, format="XYXY", canvas_size=(record.height, record.width)
            ),
            "labels": torch.tensor([self.class_of[s.label] for s in shapes], dtype=torch.int64),
        }
        if self.masks:
            stack = [s.to_mask(record.width, record.height) for s in shapes]
            array = np.stack(stack) if stack else np.zeros((0, record.height, record.width), bool)
            target["masks"] = tv_tensors.Mask(torch.from_numpy(array.astype(np.uint8)))
        return target

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, dict]:
        index, epoch = key if isinstance(key, tuple) else (key, -1)
        pixels = torch.from_numpy(self.image(index)).permute(2, 0, 1)
        image, target = tv_tensors.Image(pixels), self.target(index)
        if self.transforms is not None and epoch >= 0:
            with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream untouched
                torch.manual_seed(hash((self.seed, epoch, index)) & 0x7FFF_FFFF)
                image, target = self.transforms(image, target)
        target["image_id"] = index
        return image.as_subclass(torch.Tensor), target


def collate(batch: list) -> tuple[list, list]:
    images, targets = zip(*batch, strict=False)
    return list(images), list(targets)


class GroupedBatchSampler(Sampler):
    """Seeded batches of images with similar aspect ratio (less padding), split across ranks.

    Yields lists of ``(index, epoch)`` keys; ``set_epoch`` must be called before each epoch.
    """

    def __init__(
        self,
        aspect_ratios: Sequence[float],
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> None:
        self.groups = [0 if ratio >= 1 else 1 for ratio in aspect_ratios]
        self.batch_size = batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(len(self.groups), generator=generator).tolist()
        batches, pending = [], {0: [], 1: []}
        for index in order:
            group = pending[self.groups[index]]
            group.append(index)
            if len(group) == self.batch_size:
                batches.append(group.copy())
                group.clear()
        if not self.drop_last:
            batches += [g for g in pending.values() if g]
        # equal batch counts on every rank, as DDP needs
        per_rank = math.ceil(len(batches) / self.world_size)
        batches += batches[: per_rank * self.world_size - len(batches)]
        return batches[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self._batches():
            yield [(index, self.epoch) for index in batch]

    def __len__(self) -> int:
        return len(self._batches())
