"""Turns a composed launch config into the command it stands for, then prints or runs it."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from launch.commands import hostfile_command, local_command, sbatch_script, visible_gpus
from launch.config import HostfileLauncher, LaunchConfig, LocalLauncher, SlurmLauncher, validate
from launch.hostfile import parse_hostfile
from launch.job_check import job_problems

JOB_ARGS_SEPARATOR = "--"


def split_job_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """Split the command line at the first `--`: the launcher's Hydra overrides before it,
    the job's overrides after it."""
    if JOB_ARGS_SEPARATOR not in argv:
        return list(argv), []
    index = argv.index(JOB_ARGS_SEPARATOR)
    return argv[:index], argv[index + 1 :]


def launch(cfg: LaunchConfig, cli_job_args: list[str]) -> int:
    """Validate `cfg`, then print (dry run) or run what its launcher stands for.

    Local and hostfile launches replace this process with torchrun or deepspeed, so signals
    reach them directly; a Slurm launch writes the batch script and returns sbatch's status.
    """
    validate(cfg)
    job_args = [*cfg.launch.args, *cli_job_args]
    launcher, module = cfg.launcher, cfg.launch.module
    if cfg.launch.validate:
        problems = job_problems(module, job_args, world_size(launcher))
        if problems is None:
            print(
                f"note: {module} has no checks here; its settings are not validated",
                file=sys.stderr,
            )
        elif problems:
            raise ValueError(
                f"the job's settings ({module} {shlex.join(job_args)}) have problems:\n  - "
                + "\n  - ".join(problems)
                + "\n(launch.validate=false skips this check)"
            )
    if isinstance(launcher, SlurmLauncher):
        script = sbatch_script(launcher, module, job_args)
        if cfg.launch.dry_run:
            print(script, end="")
            return 0
        return submit(launcher, script)
    if isinstance(launcher, LocalLauncher):
        command = local_command(launcher, module, job_args)
    else:
        assert isinstance(launcher, HostfileLauncher)
        command = hostfile_command(launcher, module, job_args)
    if cfg.launch.dry_run:
        print(shlex.join(command))
        return 0
    return execute(command)


def world_size(launcher) -> int:
    """The ranks the launch starts: nodes times workers per node."""
    if isinstance(launcher, SlurmLauncher):
        return launcher.nodes * max(launcher.gpus_per_node, 1)
    if isinstance(launcher, LocalLauncher):
        return launcher.nproc_per_node or max(visible_gpus(), 1)
    hosts = parse_hostfile(launcher.hostfile)
    nodes = launcher.num_nodes or len(hosts)
    return nodes * (launcher.num_gpus or min(list(hosts.values())[:nodes]))


def execute(command: list[str]) -> int:
    """Replace this process with `command`; returns only when the program is not installed."""
    if shutil.which(command[0]) is None:
        print(f"error: {command[0]} is not on PATH", file=sys.stderr)
        return 127
    print(f"launching: {shlex.join(command)}", file=sys.stderr, flush=True)
    os.execvp(command[0], command)


def submit(launcher: SlurmLauncher, script: str) -> int:
    """Write the script into the log directory (created here: Slurm does not) and sbatch it."""
    if shutil.which("sbatch") is None:
        print(
            "error: sbatch is not on PATH; use launch.dry_run=true to see the script",
            file=sys.stderr,
        )
        return 127
    log_dir = Path(launcher.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"{launcher.job_name}-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
    path.write_text(script)
    print(f"wrote {path}", file=sys.stderr)
    return subprocess.run(["sbatch", str(path)], check=False).returncode
