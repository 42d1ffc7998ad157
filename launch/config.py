"""Config schemas of the launcher app and their validation.

The primary config `configs/launch.yaml` is `LaunchConfig`: a `launch` node (the job to start
and how) and the `launcher` group, whose options `local`, `hostfile` and `slurm` each start
from their own dataclass (`defaults: [<name>_schema, _self_]`), so a typo'd key or a wrong
type fails at compose time. `launch_problems` runs the value and filesystem checks before any
process starts and reports every problem at once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from launch.hostfile import HostfileError, parse_hostfile

# Slurm's --time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S.
_SLURM_TIME = re.compile(r"^(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+(:\d{1,2}){0,2})$")


@dataclass
class LaunchSettings:
    """The job to start and how; the `launch` node of the primary config."""

    module: str = "train.pretrain"
    """Python module every rank runs (`-m`): the pre-training job, or any other Hydra job
    written for torchrun (gate tuning, SFT)."""
    args: list[str] = field(default_factory=list)
    """Overrides for the job, e.g. `[model=tiny, run_dir=runs/tiny]`; arguments after `--` on
    the command line are appended to them."""
    dry_run: bool = False
    """Print the command (slurm: the batch script) and start nothing."""
    validate: bool = True
    """Compose the job's config from its overrides and run its checks (for the ranks this
    launch starts) before printing, writing or submitting anything; false: skip (e.g. for data
    that only the compute nodes can see)."""


@dataclass
class LocalLauncher:
    """torchrun on this machine."""

    nproc_per_node: int | None = None
    """Worker processes; None: one per visible GPU, or 1 without a GPU."""
    master_port: int = 29500
    """Port of the rendezvous store on this machine."""


@dataclass
class HostfileLauncher:
    """DeepSpeed's multi-node launcher (pdsh over ssh) over a hostfile of `host slots=N` lines."""

    hostfile: str = MISSING
    """Path to the hostfile; its first host is the master unless `master_addr` is set."""
    master_addr: str | None = None
    """Address of the rank-0 node; None: the hostfile's first host."""
    master_port: int = 29500
    """Port of the rendezvous store on the master node."""
    num_nodes: int | None = None
    """Nodes to use, from the top of the hostfile; None: every host."""
    num_gpus: int | None = None
    """GPUs (processes) per node; None: the hosts' slots, which must then all be equal."""


@dataclass
class SlurmLauncher:
    """An sbatch script running one torchrun per node, which meet in a c10d rendezvous."""

    job_name: str = "looplm"
    """Slurm job name; also names the written script."""
    nodes: int = 1
    """Nodes of the allocation."""
    gpus_per_node: int = 8
    """GPUs requested per node, one worker process each (0: a CPU job, one worker per node)."""
    cpus_per_task: int = 64
    """CPUs of the node's single task, shared by its workers."""
    omp_num_threads: int | None = None
    """OMP_NUM_THREADS of each worker; None: cpus_per_task divided among the workers."""
    time: str = "24:00:00"
    """Wall-clock limit in any of Slurm's formats (H:M:S, D-H:M, ...)."""
    partition: str | None = None
    """Partition; None: the cluster's default."""
    account: str | None = None
    """Account charged; None: the user's default."""
    exclusive: bool = True
    """Request whole nodes."""
    log_dir: str = "slurm_logs"
    """Where the script is written and the job's output goes (`%x-%j.out`); created at
    submission, because Slurm does not create it and a job without it fails silently."""
    master_port: int = 29500
    """Port of the c10d rendezvous store on the first node of the allocation."""
    sbatch_args: list[str] = field(default_factory=list)
    """Further `#SBATCH` options, e.g. `[--qos=high, --constraint=h100]`."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run before the job, e.g. `[module load cuda/12.4, source .venv/bin/activate]`."""
    env: dict[str, str] = field(default_factory=dict)
    """Further exported environment variables, e.g. `{NCCL_IB_HCA: mlx5}`."""


@dataclass
class LaunchConfig:
    """The launcher app: `python -m launch`."""

    launch: LaunchSettings = field(default_factory=LaunchSettings)
    launcher: Any = MISSING
    """One of `LocalLauncher`, `HostfileLauncher`, `SlurmLauncher`, chosen by the
    `launcher` group."""


def register_configs() -> None:
    """Register the app's and the `launcher` group's schemas with Hydra's ConfigStore."""
    store = ConfigStore.instance()
    store.store(name="launch_schema", node=LaunchConfig)
    store.store(group="launcher", name="local_schema", node=LocalLauncher)
    store.store(group="launcher", name="hostfile_schema", node=HostfileLauncher)
    store.store(group="launcher", name="slurm_schema", node=SlurmLauncher)


def to_launch_config(raw: DictConfig) -> LaunchConfig:
    """The composed config as dataclasses; raises ValueError naming every missing value."""
    missing = sorted(OmegaConf.missing_keys(raw))
    _raise_if_any([f"{key}: a value is needed" for key in missing])
    return OmegaConf.to_object(raw)


def launch_problems(cfg: LaunchConfig) -> list[str]:
    """Return every problem of `cfg` (empty when it can be launched)."""
    problems = _settings_problems(cfg.launch)
    launcher = cfg.launcher
    if isinstance(launcher, LocalLauncher):
        problems += _local_problems(launcher)
    elif isinstance(launcher, HostfileLauncher):
        problems += _hostfile_problems(launcher)
    elif isinstance(launcher, SlurmLauncher):
        problems += _slurm_problems(launcher)
    else:
        problems.append(f"launcher: unknown launcher {type(launcher).__name__}")
    return problems


def validate(cfg: LaunchConfig) -> None:
    """Raise one ValueError listing every problem of `cfg`."""
    _raise_if_any(launch_problems(cfg))


def _raise_if_any(problems: list[str]) -> None:
    if problems:
        raise ValueError("invalid launch config:\n  - " + "\n  - ".join(problems))


def _settings_problems(settings: LaunchSettings) -> list[str]:
    parts = settings.module.split(".")
    if not all(part.isidentifier() for part in parts):
        return [f"launch.module: {settings.module!r} is not a dotted Python module name"]
    return []


def _port_problem(where: str, port: int) -> list[str]:
    if 1024 <= port <= 65535:
        return []
    return [f"{where}: must lie in [1024, 65535], got {port}"]


def _local_problems(launcher: LocalLauncher) -> list[str]:
    problems = _port_problem("launcher.master_port", launcher.master_port)
    if launcher.nproc_per_node is not None and launcher.nproc_per_node < 1:
        problems.append(f"launcher.nproc_per_node: must be >= 1, got {launcher.nproc_per_node}")
    return problems


def _hostfile_problems(launcher: HostfileLauncher) -> list[str]:
    problems = _port_problem("launcher.master_port", launcher.master_port)
    if launcher.num_nodes is not None and launcher.num_nodes < 1:
        problems.append(f"launcher.num_nodes: must be >= 1, got {launcher.num_nodes}")
    if launcher.num_gpus is not None and launcher.num_gpus < 1:
        problems.append(f"launcher.num_gpus: must be >= 1, got {launcher.num_gpus}")
    if launcher.master_addr == "":
        problems.append("launcher.master_addr: empty; leave it null to use the first host")
    try:
        hosts = parse_hostfile(launcher.hostfile)
    except HostfileError as error:
        return problems + [f"launcher.hostfile: {message}" for message in error.problems]
    return problems + _hosts_problems(launcher, hosts)


def _hosts_problems(launcher: HostfileLauncher, hosts: dict[str, int]) -> list[str]:
    num_nodes = launcher.num_nodes or len(hosts)
    if num_nodes > len(hosts):
        return [
            f"launcher.num_nodes: {num_nodes} nodes asked, {launcher.hostfile} lists {len(hosts)}"
        ]
    slots = list(hosts.values())[:num_nodes]
    if launcher.num_gpus is None and len(set(slots)) > 1:
        return [f"launcher.num_gpus: the hosts' slots differ ({slots}); set it explicitly"]
    if launcher.num_gpus is not None and launcher.num_gpus > min(slots):
        return [f"launcher.num_gpus: {launcher.num_gpus} asked, a host has {min(slots)} slots"]
    return []


def _slurm_problems(launcher: SlurmLauncher) -> list[str]:
    checks = [
        (
            not re.fullmatch(r"[\w.-]+", launcher.job_name),
            f"launcher.job_name: use letters, digits, '.', '_' or '-', got {launcher.job_name!r}",
        ),
        (launcher.nodes < 1, f"launcher.nodes: must be >= 1, got {launcher.nodes}"),
        (
            launcher.gpus_per_node < 0,
            f"launcher.gpus_per_node: must be >= 0, got {launcher.gpus_per_node}",
        ),
        (
            launcher.cpus_per_task < 1,
            f"launcher.cpus_per_task: must be >= 1, got {launcher.cpus_per_task}",
        ),
        (
            launcher.omp_num_threads is not None and launcher.omp_num_threads < 1,
            f"launcher.omp_num_threads: must be >= 1, got {launcher.omp_num_threads}",
        ),
        (
            not _SLURM_TIME.match(launcher.time),
            f"launcher.time: {launcher.time!r} is not a Slurm time (M, H:M:S, D-H, D-H:M:S, ...)",
        ),
        (launcher.partition == "", "launcher.partition: empty; leave it null for the default"),
        (launcher.account == "", "launcher.account: empty; leave it null for the default"),
        (
            not re.fullmatch(r"\S+", launcher.log_dir),
            f"launcher.log_dir: a path without whitespace is needed, got {launcher.log_dir!r}",
        ),
    ]
    problems = [message for failed, message in checks if failed]
    problems += _port_problem("launcher.master_port", launcher.master_port)
    problems += [
        f"launcher.sbatch_args: {arg!r} is not a long option (--name=value)"
        for arg in launcher.sbatch_args
        if not arg.startswith("--") or "\n" in arg
    ]
    problems += [
        f"launcher.env: {name!r} is not a shell variable name"
        for name in launcher.env
        if not re.fullmatch(r"[A-Za-z_]\w*", name)
    ]
    return problems


register_configs()
