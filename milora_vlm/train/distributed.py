"""Process-group setup for `deepspeed scripts/train_vlm.py` (any number of GPUs, or CPU processes with gloo)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist

# rank / world size / barrier have one home (milora_vlm.dist); imported here too for this module's callers
from milora_vlm.dist import barrier, is_initialized, rank, world_size  # noqa: F401


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(use_deepspeed: bool) -> None:
    """Initialise torch.distributed before TrainingArguments exist (DeepSpeed's engine and ZeRO-3's partitioned
    loading both need it): under the deepspeed / torchrun launchers (WORLD_SIZE set), or for a single process
    with a DeepSpeed config (a one-process group is made up). NCCL on GPUs, gloo on CPU."""
    if is_initialized():
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
        release_deepspeed_shm()
    else:
        dist.init_process_group(backend=backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


def release_deepspeed_shm() -> None:
    """Unlink this rank's DeepSpeed CPU all-reduce buffer from /dev/shm, once every rank has mapped it.

    Hand-written because DeepSpeed (0.19) creates a 66 MB POSIX shared-memory segment per rank, named by
    MASTER_ADDR and MASTER_PORT, when all ranks of a CPU run are local, and never unlinks it: every run on a
    new port leaves 66 MB x ranks in RAM-backed /dev/shm until the machine fills. The ranks keep their
    mappings after the unlink, so training is unaffected and the memory goes back when the processes end,
    killed ones included."""
    if torch.cuda.is_available():
        return
    barrier()  # deepspeed.init_distributed returns once this rank has mapped its peers; wait for all
    env = os.environ
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{env.get('MASTER_ADDR', '')}_{env.get('MASTER_PORT', '')}_{rank()}"
    Path("/dev/shm", name).unlink(missing_ok=True)

