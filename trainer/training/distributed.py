"""Multi-GPU / multi-node training through ``torchrun`` (DDP); a no-op for a single process."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def init(device: torch.device) -> tuple[int, int, torch.device]:
    """Join the process group torchrun set up; returns (rank, world_size, this rank's device)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (only meaningful on rank 0)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (e.g. the early-stopping decision)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
