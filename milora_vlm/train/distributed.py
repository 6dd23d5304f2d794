"""Process-group setup for `deepspeed scripts/train_vlm.py` (any number of GPUs, or CPU processes with gloo)."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(use_deepspeed: bool) -> None:
    """Initialise torch.distributed before TrainingArguments exist (DeepSpeed's engine and ZeRO-3's partitioned
    loading both need it): under the deepspeed / torchrun launchers (WORLD_SIZE set), or for a single process
    with a DeepSpeed config (a one-process group is made up). NCCL on GPUs, gloo on CPU."""
    if dist.is_available() and dist.is_initialized():
        return
    launched = "WORLD_SIZE" in os.environ
    if not launched and not use_deepspeed:
        return
    if not launched:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if use_deepspeed:
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend)
    else:
        dist.init_process_group(backend=backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()
