"""Training throughput: ``trainer``'s loop against one written the way torchvision's references train.

Both sides train the same model on the same generated images with the same batch size for the same
number of iterations, in this process, one after the other. The baseline follows
``references/detection``: PIL decode → float32 tensor in the DataLoader, plain shuffled batches,
fp32 forward/backward, ``.to(device)`` of float images. ``trainer`` keeps images uint8 until the
device, groups batches by aspect ratio, pins memory, keeps workers alive, and autocasts on GPU in the
dtype serverless.precision chooses. Prints images/s for each and the ratio.

    python benchmarks/bench_train.py                # CPU, small network
    python benchmarks/bench_train.py --device cuda --arch fasterrcnn_resnet50_fpn_v2 --size 800
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as F

from serverless.architectures import build_model
from trainer.data.readers import load_dataset
from trainer.data.records import DetectionData
from trainer.data.synth import generate
from trainer.training.config import TrainConfig
from trainer.training.dataset import DetectionDataset, GroupedBatchSampler, collate
from trainer.training.engine import Precision, train_one_epoch
from trainer.training.run import make_scheduler


class ReferenceDataset(Dataset):
    """As in torchvision's references: PIL image → float tensor in the worker."""

    def __init__(self, records, labels):
        self.records, self.class_of = records, {n: i + 1 for i, n in enumerate(labels)}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i):
        r = self.records[i]
        image = F.to_dtype(F.pil_to_tensor(Image.open(r.path).convert("RGB")), torch.float32, scale=True)
        boxes = torch.tensor([s.box for s in r.shapes], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([self.class_of[s.label] for s in r.shapes], dtype=torch.int64)
        return image, {"boxes": boxes, "labels": labels}


def reference_epoch(model, loader, optimizer, device) -> tuple[int, float]:
    """torchvision references/detection/engine.py train_one_epoch, fp32, without logging."""
    model.train()
    seen, start = 0, time.perf_counter()
    for images, targets in loader:
        images = [im.to(device) for im in images]
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        losses = sum(model(images, targets).values())
        optimizer.zero_grad()
        losses.backward()
        optimizer.step()
        seen += len(images)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--arch", default="fasterrcnn_mobilenet_v3_large_fpn")
    p.add_argument("--size", type=int, default=320, help="shorter side the model trains at")
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2, help="timed epochs per side (after one warm-up)")
    args = p.parse_args()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(Path(tmp), args.images)
        print(f"{args.arch} at {args.size}px, {len(data.images)} images 640x480, batch {args.batch_size}, "
              f"{args.workers} workers, device {device}"
              + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
        ref = run_reference(args, data, device)
        ours = run_trainer(args, data, device)
    print(f"reference loop (fp32, float images) : {ref:8.2f} images/s")
    print(f"trainer loop                        : {ours:8.2f} images/s")
    print(f"ratio trainer / reference           : {ours / ref:8.2f}x")


def make_data(folder: Path, images: int, size: tuple[int, int] = (640, 480)) -> DetectionData:
    """``images`` generated annotated images, read as training reads a CVAT export."""
    export = generate(folder, seed=0, train=images, val=0, empty=0, size=size, formats=("cvat",))["cvat"]
    return load_dataset([export], cache_dir=folder / "cache")


def _model(args, data, device):
    torch.manual_seed(0)
    model = build_model(args.arch, len(data.labels), min_size=args.size, max_size=args.size * 2)
    return model.to(device)


def run_reference(args, data, device) -> float:
    model = _model(args, data, device)
    loader = DataLoader(ReferenceDataset(data.images, data.labels), batch_size=args.batch_size, shuffle=True,
                        num_workers=args.workers, collate_fn=collate)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9, weight_decay=1e-4)
    reference_epoch(model, loader, optimizer, device)  # warm-up
    runs = [reference_epoch(model, loader, optimizer, device) for _ in range(args.epochs)]
    return sum(n for n, _ in runs) / sum(t for _, t in runs)


def run_trainer(args, data, device) -> float:
    model = _model(args, data, device)
    dataset = DetectionDataset(data.images, data.labels, None)
    sampler = GroupedBatchSampler(dataset.aspect_ratios(), args.batch_size)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=args.workers,
                        pin_memory=device.type == "cuda", persistent_workers=args.workers > 0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9, weight_decay=1e-4)
    scheduler = make_scheduler(TrainConfig(epochs=args.epochs + 1), optimizer, len(loader))
    precision = Precision(device)
    rates = []
    for epoch in range(args.epochs + 1):
        sampler.set_epoch(epoch)
        stats = train_one_epoch(model, loader, optimizer, scheduler, precision, clip_grad=0.0,
                                epoch=epoch, epochs=args.epochs + 1, show_progress=False)
        if epoch:  # the first epoch is the warm-up
            rates.append(stats["images_per_s"])
    return sum(rates) / len(rates)


if __name__ == "__main__":
    main()
