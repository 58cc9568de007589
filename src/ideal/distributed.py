"""Several processes (`torchrun`, `accelerate launch`): who we are, and sums across processes.

With one process every function here is the identity, so the numerical code calls them always.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_from_env() -> None:
    """Join the process group that `torchrun` / `accelerate launch` describe in the environment."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def all_reduce_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over processes, in place (a float64 CPU tensor travels as is with gloo)."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_float(value: float) -> float:
    if world_size() == 1:
        return value
    return float(all_reduce_(torch.tensor([value], dtype=torch.float64))[0])


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()
