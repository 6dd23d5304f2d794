"""Rank, world size and the few collectives the project uses, in one place; every helper also works without a
process group (one process: rank 0 of 1, collectives return their input).

The lowest layer of the package (imports only torch), so data, milora, train and cli code can all call it.
Process-group *setup* for training lives in milora_vlm.train.distributed.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    """A torch.distributed process group exists (under the deepspeed / torchrun launchers, after setup)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def launcher_rank_and_world() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) as the launcher set them in the environment, for code that runs before (or without) a
    process group; (0, 1) when not launched."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def local_cuda_device() -> torch.device:
    """This process's GPU. apply_milora may run before the Trainer calls torch.cuda.set_device, when every rank's
    current device is still cuda:0, so the launcher's LOCAL_RANK decides."""
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is not None:
        return torch.device("cuda", int(local_rank) % torch.cuda.device_count())
    return torch.device("cuda", torch.cuda.current_device())


def comm_device() -> torch.device:
    """Where collectives' tensors must live: NCCL moves CUDA tensors only; gloo (CPU runs, tests) CPU tensors."""
    return local_cuda_device() if dist.get_backend() == "nccl" else torch.device("cpu")


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def gather_object(obj) -> list:
    """obj from every rank, in rank order (a collective: every rank must call it at the same point)."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool, device=None) -> bool:
    """True on every rank when `flag` is true on any rank (a collective). `device`: where the backend moves
    tensors (default: comm_device())."""
    if world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device or comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_ranks(flag: bool, device=None) -> bool:
    """True on every rank when `flag` is true on every rank (a collective)."""
    if world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0], device=device or comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def mean_over_ranks(value: float, device=None) -> float:
    """The mean of `value` over all ranks (a collective), in float64."""
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device or comm_device())
    dist.all_reduce(t)
    return t.item() / world_size()
