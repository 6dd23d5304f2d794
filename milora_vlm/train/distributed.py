"""Process-group setup for `deepspeed scripts/train_vlm.py` (any number of GPUs, or CPU processes with gloo)."""

from __future__ import annotations

import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

# rank / world size / barrier / gather have one home (milora_vlm.dist); imported here too for this module's callers
from milora_vlm.config import ConfigError
from milora_vlm.dist import barrier, gather_object, is_initialized, rank, world_size  # noqa: F401


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

        if not torch.cuda.is_available():
            skip_deepspeed_shm_op()
        deepspeed.init_distributed(dist_backend=backend)
    else:
        dist.init_process_group(backend=backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


SHM_OP = "deepspeed_shm_comm"


def skip_deepspeed_shm_op() -> None:
    """Keep DeepSpeed (0.19) from JIT-building and starting its CPU shared-memory all-reduce op in a training run.

    On CPU DeepSpeed's comm backend compiles that op with g++ at its first start (32-37 s on a 2-core box; again
    whenever another Python environment built it last) and maps a 66 MB /dev/shm segment per rank that it never
    unlinks. Only inference_all_reduce (AutoTP inference) uses the op; training reduces through torch.distributed
    (gloo) either way. DeepSpeed builds it only when deepspeed.ops.__compatible_ops__ says it can, a dict it keeps
    and lets callers edit (deepspeed/ops/__init__.py), so marking the op incompatible there is the whole switch."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[SHM_OP] = False


@dataclass(frozen=True)
class Storage:
    """How output_dir is laid out across the run's processes (storage_layout)."""

    ranks: tuple[int, ...]  # the ranks whose files land on this rank's disk (this rank's included)
    node_local: bool  # some ranks cannot see what others write: each node has its own disk at that path

    @property
    def publisher(self) -> bool:
        """The one process per disk that clears its staging folder, writes the manifest and renames a save."""
        return rank() == min(self.ranks)


def storage_layout(output_dir: str, save_on_each_node: bool, settle_s: float = 3.0) -> Storage:
    """Which ranks share this rank's disk at output_dir: every rank writes a marker file there and looks, by
    name, for the others' (after a barrier; a rank that misses some looks again for up to `settle_s`, for network
    filesystems whose lookups lag). Hand-written: neither DeepSpeed nor the Trainer finds out, they take
    `checkpoint.use_node_local_storage` / `save_on_each_node` on trust.

    Raises ConfigError naming the setting when the disks do not match it: with node-local disks and
    save_on_each_node false, node 1 would lack the files only node 0 writes (adapter, trainer state, DeepSpeed's
    model states); with one shared disk and save_on_each_node true, every node would write and rename the same
    files. The disks must also follow the nodes (each disk's lowest rank a local rank 0)."""
    if world_size() == 1:
        return Storage((0,), False)
    nonce = gather_object(uuid.uuid4().hex if rank() == 0 else None)[0]
    probe = os.path.join(output_dir, f".storage-probe-{nonce}")
    os.makedirs(probe, exist_ok=True)
    Path(probe, str(rank())).touch()
    barrier()
    deadline = time.monotonic() + settle_s
    while True:
        seen = tuple(r for r in range(world_size()) if os.path.exists(os.path.join(probe, str(r))))
        if len(seen) == world_size() or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    views = gather_object((seen, int(os.environ.get("LOCAL_RANK", 0))))
    if rank() == min(seen):
        shutil.rmtree(probe, ignore_errors=True)
    sets = [v[0] for v in views]
    if any(r not in sets[r] or any(sets[o] != sets[r] for o in sets[r]) for r in range(world_size())):
        raise ConfigError(f"output_dir {output_dir}: the ranks disagree on who shares a disk there (rank: ranks seen "
                          f"{dict(enumerate(sets))}); give every node either the same shared directory or its own disk")
    groups = sorted(set(sets))
    named = " | ".join(f"ranks {list(g)}" for g in groups)
    node_local = len(groups) > 1
    if node_local and not save_on_each_node:
        raise ConfigError(
            f"output_dir {output_dir} is not one shared disk: {named} each see only their own node's files. "
            "Set training.save_on_each_node: true (--save_on_each_node true) so that every node keeps a full "
            "checkpoint, or give all nodes one shared output_dir")
    if not node_local and save_on_each_node and [v[1] for v in views].count(0) > 1:
        raise ConfigError(
            f"output_dir {output_dir} is one disk shared by all nodes, and training.save_on_each_node is true: every "
            "node would write and rename the same files. Set it false (the default) on a shared disk")
    if node_local and any([views[r][1] for r in group].count(0) != 1 or views[min(group)][1] != 0 for group in groups):
        raise ConfigError(f"output_dir {output_dir}: the disks there ({named}) do not follow the nodes (each disk "
                          "must hold one node, whose local rank 0 saves on it)")
    return Storage(seen, node_local)
