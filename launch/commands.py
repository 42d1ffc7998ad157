"""What each launcher runs: argument lists for torchrun and deepspeed, and the sbatch script.

Pure functions of a validated config; nothing here starts a process.
"""

from __future__ import annotations

import shlex

from launch.config import HostfileLauncher, LocalLauncher, SlurmLauncher
from launch.hostfile import parse_hostfile

NCCL_ENV = {
    "NCCL_ASYNC_ERROR_HANDLING": "1",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    "NCCL_DEBUG": "WARN",
}
"""Exported by the batch script: a hung collective raises instead of blocking forever, and
NCCL reports only warnings."""

_CONTINUATION = " \\\n    "


def visible_gpus() -> int:
    """GPUs this process can use (honours CUDA_VISIBLE_DEVICES)."""
    import torch

    return torch.cuda.device_count()


def local_command(launcher: LocalLauncher, module: str, job_args: list[str]) -> list[str]:
    """torchrun on this machine, one worker per GPU (or `nproc_per_node`)."""
    nproc = launcher.nproc_per_node or max(visible_gpus(), 1)
    return [
        "torchrun",
        "--nproc_per_node", str(nproc),
        "--master_port", str(launcher.master_port),
        "-m", module,
        *job_args,
    ]  # fmt: skip


def hostfile_command(launcher: HostfileLauncher, module: str, job_args: list[str]) -> list[str]:
    """DeepSpeed's launcher over the hostfile. `--no_local_rank` because the job is a Hydra
    app, which takes the local rank from the environment, not a `--local_rank` argument."""
    hosts = parse_hostfile(launcher.hostfile)
    num_nodes = launcher.num_nodes or len(hosts)
    num_gpus = launcher.num_gpus or min(list(hosts.values())[:num_nodes])
    return [
        "deepspeed",
        "--hostfile", launcher.hostfile,
        "--master_addr", launcher.master_addr or next(iter(hosts)),
        "--master_port", str(launcher.master_port),
        "--num_nodes", str(num_nodes),
        "--num_gpus", str(num_gpus),
        "--no_local_rank",
        "--module", module,
        *job_args,
    ]  # fmt: skip


def rendezvous_torchrun(nproc_per_node: int, module: str, job_args: list[str]) -> str:
    """The shell command each node of a Slurm job runs: torchrun joining a c10d rendezvous at
    `$MASTER_ADDR:$MASTER_PORT` with `$SLURM_NNODES` nodes, keyed by `$SLURM_JOB_ID`."""
    words = [
        "torchrun",
        '--nnodes "$SLURM_NNODES"',
        f"--nproc_per_node {nproc_per_node}",
        '--rdzv_id "$SLURM_JOB_ID"',
        "--rdzv_backend c10d",
        '--rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT"',
        f"-m {shlex.quote(module)}",
    ]
    if job_args:
        words.append(shlex.join(job_args))
    return _CONTINUATION.join(words)


def sbatch_script(launcher: SlurmLauncher, module: str, job_args: list[str]) -> str:
    """The batch script: resources, environment, then one torchrun per node through srun."""
    nproc = max(launcher.gpus_per_node, 1)
    lines = ["#!/bin/bash", *_sbatch_lines(launcher), "", "set -euo pipefail", *launcher.setup]
    lines += ["", *_export_lines(launcher, nproc), ""]
    # srun does not pass sbatch's --cpus-per-task on to its tasks (Slurm >= 22.05).
    srun = f"srun --cpus-per-task={launcher.cpus_per_task} --kill-on-bad-exit=1"
    lines.append(f"{srun} {rendezvous_torchrun(nproc, module, job_args)}")
    return "\n".join(lines) + "\n"


def _sbatch_lines(launcher: SlurmLauncher) -> list[str]:
    options = [
        f"--job-name={launcher.job_name}",
        f"--nodes={launcher.nodes}",
        "--ntasks-per-node=1",
    ]
    if launcher.gpus_per_node:
        options.append(f"--gpus-per-node={launcher.gpus_per_node}")
    options += [f"--cpus-per-task={launcher.cpus_per_task}", f"--time={launcher.time}"]
    if launcher.partition is not None:
        options.append(f"--partition={launcher.partition}")
    if launcher.account is not None:
        options.append(f"--account={launcher.account}")
    options.append(f"--output={launcher.log_dir}/%x-%j.out")
    if launcher.exclusive:
        options.append("--exclusive")
    options += launcher.sbatch_args
    return [f"#SBATCH {option}" for option in options]


def _export_lines(launcher: SlurmLauncher, nproc: int) -> list[str]:
    omp_threads = launcher.omp_num_threads or max(launcher.cpus_per_task // nproc, 1)
    env = {
        "MASTER_PORT": str(launcher.master_port),
        **NCCL_ENV,
        "OMP_NUM_THREADS": str(omp_threads),
        **launcher.env,
    }
    master = 'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"'
    return [master, *(f"export {name}={shlex.quote(value)}" for name, value in env.items())]
