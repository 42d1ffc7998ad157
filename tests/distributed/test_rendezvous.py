"""Two torchrun "nodes" on this host meet exactly as the nodes of a Slurm job do.

Each node runs the torchrun command of the generated batch script (the c10d rendezvous on
`$MASTER_ADDR:$MASTER_PORT`), with the Slurm variables set by hand, and its worker does a gloo
all_reduce across the two nodes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from launch.commands import rendezvous_torchrun
from tests.distributed.launch import free_port

TIMEOUT_S = 50

PROBE = """
import json, os, sys
from pathlib import Path

import torch
import torch.distributed as dist

dist.init_process_group("gloo")
rank, world_size = dist.get_rank(), dist.get_world_size()
value = torch.tensor([float(rank + 1)])
dist.all_reduce(value)
record = {"rank": rank, "world_size": world_size, "reduced": value.item(),
          "node_rank": int(os.environ["GROUP_RANK"])}
(Path(sys.argv[1]) / f"rank{rank}.json").write_text(json.dumps(record))
dist.barrier()
dist.destroy_process_group()
"""


def _node_env(tmp_path, port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        SLURM_NNODES="2",
        SLURM_JOB_ID="4242",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
        PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),
        PYTHONPATH=str(tmp_path) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    return env


def _finish(nodes: list[subprocess.Popen]) -> list[str]:
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
    return outputs


def test_two_nodes_meet_in_the_slurm_scripts_c10d_rendezvous(tmp_path):
    (tmp_path / "rendezvous_probe.py").write_text(PROBE)
    out_dir = tmp_path / "probe output"
    out_dir.mkdir()
    command = rendezvous_torchrun(1, "rendezvous_probe", [str(out_dir)])
    env = _node_env(tmp_path, free_port())
    nodes = [
        subprocess.Popen(
            ["bash", "-c", command],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for _ in range(2)
    ]
    outputs = _finish(nodes)
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(outputs)
    records = [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [record["world_size"] for record in records] == [2, 2]
    assert [record["reduced"] for record in records] == [3.0, 3.0]
    assert sorted(record["node_rank"] for record in records) == [0, 1]
