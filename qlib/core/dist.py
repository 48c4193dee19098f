"""Which process this is under `accelerate launch` or `torchrun`, and gathering small results to rank 0: what a
data-parallel run needs so that it writes its files once and reports every rank."""
from __future__ import annotations

import os
from typing import Any

import torch


def world_size() -> int:
    """Processes in the launch (1 when not launched)."""
    return int(os.environ.get("WORLD_SIZE", 1))


def rank() -> int:
    """This process's global rank (0 when not launched)."""
    return int(os.environ.get("RANK", 0))


def local_rank() -> int:
    """This process's rank on its machine: the GPU it drives."""
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    """The process that writes files and prints results."""
    return rank() == 0


def gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (a list of one when not distributed); every rank must call it."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def uses_fsdp() -> bool:
    """Whether `accelerate launch` was told to shard with FSDP (its config or `--use_fsdp`)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")


def finish() -> None:
    """Leave the process group, if one was started (NCCL warns of leaked resources otherwise)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
