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
    """Whether this is the main process; before the process group exists (while the command line
    is parsed, say), the launcher's RANK says."""
    if dist.is_initialized():
        return rank() == 0
    return os.environ.get("RANK", "0") == "0"


def _through_backend(tensor: torch.Tensor, op) -> torch.Tensor:
    """Run a collective on `tensor` in place; NCCL only takes device tensors, so a CPU tensor (the
    influence factors kept on CPU) makes a round trip through the device."""
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        moved = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        op(moved)
        tensor.copy_(moved.cpu())
    else:
        op(tensor)
    return tensor


def all_reduce_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over processes, in place (a float64 CPU tensor travels as is with gloo)."""
    if world_size() > 1:
        _through_backend(tensor, lambda t: dist.all_reduce(t, op=dist.ReduceOp.SUM))
    return tensor


def broadcast_(tensor: torch.Tensor, source: int) -> torch.Tensor:
    """Overwrite `tensor` on every process with process `source`'s, in place (contiguous only)."""
    if not tensor.is_contiguous():
        raise ValueError("broadcast_ needs a contiguous tensor")
    if world_size() > 1:
        _through_backend(tensor, lambda t: dist.broadcast(t, src=source))
    return tensor


def owners(costs: list[float], world: int) -> list[int]:
    """Which process computes each job: largest first, each to the least loaded (deterministic)."""
    load = [0.0] * world
    owner = [0] * len(costs)
    for job in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        chosen = min(range(world), key=lambda r: (load[r], r))
        owner[job] = chosen
        load[chosen] += costs[job]
    return owner


def all_reduce_float(value: float) -> float:
    if world_size() == 1:
        return value
    return float(all_reduce_(torch.tensor([value], dtype=torch.float64))[0])


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()
