"""torchrun support: each rank is one client of the host's daemon; DDP does the rest.

STORM changes only where activations live; gradients are averaged by PyTorch's own
DistributedDataParallel (gloo on CPU, NCCL on CUDA). torchrun sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT; ``StormSystem`` sends RANK and WORLD_SIZE
when it registers, so ``stormctl status`` shows which rank holds what.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["Rank", "init_from_env", "shutdown", "wrap"]


@dataclass(frozen=True)
class Rank:
    rank: int
    world_size: int
    local_rank: int


def init_from_env(device: torch.device) -> Rank | None:
    """Join the process group torchrun described, or return None outside torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return None
    rank = Rank(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(rank.local_rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    device_ids = [device.index] if device.type == "cuda" and device.index is not None else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
