"""Two DeepSpeed "nodes" on one machine (loopback only): `deepspeed --hostfile H --no_ssh --node_rank 0|1
--master_addr 127.0.0.1`, one process per node, against a one-node run of the same world size and seed.

- ZeRO-3 on one shared output_dir: the same adapter and loss curve as one node with two processes.
- ZeRO-2 on node-local disks (each node's launcher runs in its own mount namespace, where output_dir is a bind
  mount of that node's own directory): every node saves its own copy of each checkpoint (save_on_each_node),
  node 1 is SIGKILLed mid-run (then node 0, which would wait on it), both restart with `auto` and end with the
  one-node adapter. MiLoRA's initialisation is split over both nodes, each node's copy of the factors is
  bit-identical, and each node keeps its own factors cache (the resumed run hits it).
- eval/generate.py under torchrun --nnodes 2 on node-local disks: rank 0 merges every node's answers.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from milora_vlm.train.checkpoint import MANIFEST, STAGING_DIR, missing_parts
from tests.train.test_fault_tolerance import (REPO, SCRIPT, ZERO2, ZERO3, adapter, command, deepspeed_launcher, environment, free_port,
                                         losses)

pytestmark = pytest.mark.slow
NODES = 2


def can_unshare() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "true"], capture_output=True).returncode == 0


def node_command(args: list[str], hostfile: Path, node: int, port: int, disk: Path | None, out: Path) -> list[str]:
    cmd = [*deepspeed_launcher(), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node), "--master_addr",
           "127.0.0.1", "--master_port", str(port), SCRIPT, *args]
    if disk is None:  # shared disk
        return cmd
    # this node sees its own directory at output_dir, as a node-local disk mounted at the same path would be
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount --bind "$0" "$1" && shift && exec "$@"', str(disk), str(out), *cmd]


def start_nodes(work: Path, args: list[str], out: Path, disks: list[Path] | None, tag: str) -> list[tuple[subprocess.Popen, Path]]:
    hostfile = work / "hostfile"
    hostfile.write_text("".join(f"node{n} slots=1\n" for n in range(NODES)))
    port = free_port()
    out.mkdir(parents=True, exist_ok=True)
    procs = []
    for n in range(NODES):
        log = work / f"{tag}.node{n}.log"
        with open(log, "w") as f:
            procs.append((subprocess.Popen(node_command(args, hostfile, n, port, disks and disks[n], out), cwd=REPO,
                                           env=environment(), stdout=f, stderr=subprocess.STDOUT,
                                           start_new_session=True), log))
    return procs


def run_nodes(work, args, out, disks, tag, timeout=600) -> list[str]:
    procs = start_nodes(work, args, out, disks, tag)
    try:
        for p, _ in procs:
            p.wait(timeout=timeout)
    finally:
        for p, _ in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    logs = [log.read_text() for _, log in procs]
    for (p, _), text in zip(procs, logs):
        assert p.returncode == 0, text[-5000:]
    return logs


def run_one_node(args: list[str]) -> None:
    proc = subprocess.run(command(args, 2), cwd=REPO, env=environment(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from milora_vlm.config import load_recipe
    from milora_vlm.train.bootstrap import bootstrap_tiny

    root = tmp_path_factory.mktemp("multinode")
    bootstrap_tiny(load_recipe(REPO / ZERO2, [
        ("model.path", str(root / "llava")), ("data.train_file", str(root / "shapes.jsonl")),
        ("data.image_folder", str(root / "images")), ("output_dir", str(root / "unused"))]))
    return root


def recipe_args(work: Path, config: str, out: Path, steps: int, *extra: str) -> list[str]:
    return ["--config", config, "--model.path", str(work / "llava"), "--data.image_folder", str(work / "images"),
            "--data.train_file", str(work / "shapes.jsonl"), "--output_dir", str(out), "--seed", "0",
            "--max_steps", str(steps), "--save_steps", "2", "--save_total_limit", "10", *extra]


def same_run(reference: Path, out: Path, steps: int) -> None:
    a, b = adapter(reference), adapter(out)
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() == 0 for k in a), \
        max(float((a[k] - b[k]).abs().max()) for k in a)
    assert losses(out) == losses(reference) and sorted(losses(out)) == list(range(1, steps + 1))


def assert_init_split(node0_log: str) -> None:
    """MiLoRA's init ran across both nodes: node 0's rank (the one that logs) decomposed some matrices, not all; the
    plan gives every matrix to exactly one rank of the world (test_milora_distributed), so node 1 did the rest."""
    m = re.search(r"MiLoRA init: (\d+) matrices decomposed \((\d+) on this rank of 2\)", node0_log)
    assert m, node0_log[-3000:]
    assert 0 < int(m.group(2)) < int(m.group(1))


def test_two_nodes_zero3_on_a_shared_disk_train_like_one_node(work):
    run_one_node(recipe_args(work, ZERO3, work / "z3_one", 4))
    logs = run_nodes(work, recipe_args(work, ZERO3, work / "z3_two", 4), work / "z3_two", None, "z3_two")
    same_run(work / "z3_one", work / "z3_two", 4)
    assert_init_split(logs[0])
    for step in (2, 4):  # one copy, published by global rank 0, with every rank's parts
        assert missing_parts(str(work / "z3_two" / f"checkpoint-{step}")) == []
    assert not list((work / "z3_two").glob(".storage-probe-*"))


@pytest.mark.skipif(not can_unshare(), reason="needs `unshare --mount` (root) to give each node its own disk")
def test_two_nodes_on_node_local_disks_killed_and_resumed_end_like_one_node(work):
    steps = 6
    run_one_node(recipe_args(work, ZERO2, work / "z2_one", steps))
    out = work / "z2_two"  # the path both nodes use; each sees its own disk there
    disks = [work / f"z2_two.disk{n}" for n in range(NODES)]
    for d in disks:
        d.mkdir()
    args = recipe_args(work, ZERO2, out, steps, "--save_on_each_node", "true", "--adapter.cache_dir", str(out / "cache"))
    procs = start_nodes(work, args, out, disks, "z2_two")
    try:  # node 1 dies once its copy of checkpoint-4 is in place; node 0, left waiting on it, is stopped after
        deadline = time.time() + 600
        while not (disks[1] / "checkpoint-4").exists():
            assert all(p.poll() is None for p, _ in procs) and time.time() < deadline, procs[1][1].read_text()[-3000:]
            time.sleep(0.05)
        os.killpg(procs[1][0].pid, signal.SIGKILL)
        time.sleep(1.0)
    finally:
        for p, _ in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    first = [log.read_text() for _, log in procs]
    assert_init_split(first[0])
    # each node's disk holds only its own node's rank parts
    assert (disks[1] / "checkpoint-4" / "rng_state_1.pth").exists() and not (disks[1] / "checkpoint-4" / "rng_state_0.pth").exists()
    assert (disks[0] / "checkpoint-2" / "rng_state_0.pth").exists() and not (disks[0] / "checkpoint-2" / "rng_state_1.pth").exists()
    assert not (disks[0] / "adapter_model.safetensors").exists()  # the run did not finish

    logs = run_nodes(work, [*args, "--resume_from_checkpoint", "auto"], out, disks, "z2_two_resumed")
    assert "MiLoRA init: cache hit" in logs[0]  # every node kept its own copy of the factors cache
    resumed = {re.search(r"continuing from (\S+)", text).group(1) for text in logs if "continuing from" in text}
    assert len(resumed) == 1 and resumed.pop() in (str(out / "checkpoint-2"), str(out / "checkpoint-4")), logs[0][-3000:]
    same_run(work / "z2_one", disks[0], steps)  # adapter and loss curve (trainer_state.json: global rank 0's disk)
    reference = adapter(work / "z2_one")
    for d in disks:  # every node keeps the final adapter, the same factors and complete checkpoints of its own
        assert all((adapter(d)[k] - reference[k]).abs().max() == 0 for k in reference)
        assert (d / "milora_init.safetensors").read_bytes() == (work / "z2_one" / "milora_init.safetensors").read_bytes()
        for step in (2, 4, 6):
            assert missing_parts(str(d / f"checkpoint-{step}")) == [] and (d / f"checkpoint-{step}" / MANIFEST).exists()
        assert not (d / STAGING_DIR).exists() or not any((d / STAGING_DIR).iterdir())
        assert len(list((d / "cache").glob("milora-*.safetensors"))) == 1
    assert not any(out.iterdir())  # nothing was written to the path outside the nodes' mounts


@pytest.mark.skipif(not can_unshare(), reason="needs `unshare --mount` (root) to give each node its own disk")
def test_eval_generate_on_node_local_disks_merges_every_nodes_answers(tiny_causal_lm_dir, tmp_path):
    """eval/generate.py under torchrun --nnodes 2: each node writes its chunk on its own disk; rank 0's disk ends
    with every answer merged, and no node keeps a part file."""
    import json

    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"instruction": f"Say {k}."}) + "\n" for k in range(5)))
    out = tmp_path / "answers"
    disks = [tmp_path / f"disk{n}" for n in range(NODES)]
    for d in (out, *disks):
        d.mkdir()
    port = free_port()
    procs = []
    for n in range(NODES):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(NODES), "--nproc_per_node", "1",
               "--node_rank", str(n), "--master_addr", "127.0.0.1", "--master_port", str(port),
               str(REPO / "eval" / "generate.py"), "--model", str(tiny_causal_lm_dir), "--question-file", str(questions),
               "--answers-file", str(out / "answers.jsonl"), "--template", "alpaca", "--max-new-tokens", "4",
               "--no-progress"]
        procs.append(subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", 'mount --bind "$0" "$1" && shift && exec "$@"',
             str(disks[n]), str(out), *cmd], cwd=REPO, env=environment(), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    answers = [json.loads(line) for line in (disks[0] / "answers.jsonl").read_text().splitlines()]
    assert sorted(a["question_id"] for a in answers) == [0, 1, 2, 3, 4]
    assert os.listdir(disks[0]) == ["answers.jsonl"] and os.listdir(disks[1]) == []
    assert "merged 5 answers from 2 ranks" in logs[0]


def _layout_worker(rank: int, port: int, root: str, cases: list[tuple[bool, bool]]) -> None:
    import json

    import torch.distributed as dist

    from milora_vlm.train.distributed import storage_layout

    os.environ.update(RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE="2")  # two nodes of one process each
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    outcomes = []
    for i, (node_local, save_on_each_node) in enumerate(cases):
        output_dir = os.path.join(root, str(i), f"disk{rank}" if node_local else "shared")
        try:
            layout = storage_layout(output_dir, save_on_each_node, settle_s=0.2)
            outcomes.append({"ranks": list(layout.ranks), "node_local": layout.node_local, "publisher": layout.publisher})
        except Exception as e:  # noqa: BLE001 - the test reads the message
            outcomes.append({"error": f"{type(e).__name__}: {e}"})
    Path(root, f"{rank}.json").write_text(json.dumps(outcomes))
    dist.destroy_process_group()


def test_storage_layout_finds_node_local_disks_and_checks_save_on_each_node(tmp_path):
    """Each rank of a 2-"node" gloo group is given output_dir: the same folder (a shared disk) or a folder of its
    own (node-local disks at one path, as each node would see them)."""
    import json

    import torch.multiprocessing as mp

    cases = [(False, False), (True, True), (True, False), (False, True)]  # (node-local disks, save_on_each_node)
    mp.spawn(_layout_worker, args=(free_port(), str(tmp_path), cases), nprocs=2)
    by_rank = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    shared, local, local_unflagged, shared_flagged = zip(*by_rank)
    assert [o["ranks"] for o in shared] == [[0, 1], [0, 1]] and [o["publisher"] for o in shared] == [True, False]
    assert [o["ranks"] for o in local] == [[0], [1]] and all(o["publisher"] and o["node_local"] for o in local)
    for o in local_unflagged:
        assert "ConfigError" in o["error"] and ("is not one shared disk: ranks [0] | ranks [1] each see only their own "
                                                "node's files. Set training.save_on_each_node: true") in o["error"]
    for o in shared_flagged:
        assert "is one disk shared by all nodes, and training.save_on_each_node is true" in o["error"]
    assert not [f for f in tmp_path.rglob("*") if f.is_file() and not f.name.endswith(".json")]  # probes removed
