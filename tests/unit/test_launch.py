import re
import shlex
import subprocess
import sys
from importlib import import_module
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

import launch.app
import launch.commands
from launch.app import launch as run_launch
from launch.app import split_job_args, world_size
from launch.config import (
    HostfileLauncher,
    LaunchConfig,
    LocalLauncher,
    SlurmLauncher,
    launch_problems,
    to_launch_config,
)

REPO = Path(__file__).resolve().parents[2]
CONFIG_DIR = str(REPO / "configs")
LAUNCHERS = {"local": LocalLauncher, "hostfile": HostfileLauncher, "slurm": SlurmLauncher}
USER_FILES = re.compile(r"(^|[\s'])(/models/|/data/|[A-Z][A-Z0-9.]*_[A-Z0-9_.]+(\s|'|$))")
"""A problem about a documented command's placeholder for the user's own files: a model under
/models, data under /data, or a name in capitals (`OURO_2.6B_INIT`)."""


def compose_launch(overrides: list[str], validate: bool = False) -> LaunchConfig:
    """The launch config; the job's settings are checked only with `validate` (most tests
    here hand made-up job overrides through)."""
    overrides = [*overrides, f"launch.validate={str(validate).lower()}"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return to_launch_config(compose("launch", overrides=overrides))


def dry_run(capsys, overrides: list[str], job_args: list[str] = (), validate=False) -> str:
    cfg = compose_launch([*overrides, "launch.dry_run=true"], validate)
    assert run_launch(cfg, list(job_args)) == 0
    return capsys.readouterr().out


@pytest.fixture
def hostfile(tmp_path) -> Path:
    path = tmp_path / "hostfile"
    path.write_text("# the cluster\nnode-a slots=8\nnode-b slots=8  # spare\n\nnode-c slots=8\n")
    return path


def test_the_launcher_group_ships_one_config_per_schema():
    shipped = sorted(path.stem for path in (REPO / "configs" / "launcher").glob("*.yaml"))
    assert shipped == sorted(LAUNCHERS)


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_every_launcher_config_composes(name, hostfile):
    required = [f"launcher.hostfile={hostfile}"] if name == "hostfile" else []
    cfg = compose_launch([f"launcher={name}", *required])
    assert type(cfg.launcher) is LAUNCHERS[name]
    assert cfg.launch.module == "train.pretrain" and not cfg.launch.dry_run
    assert launch_problems(cfg) == []


@pytest.mark.parametrize(
    "override", ["launcher.nodez=2", "launcher=slurm launcher.nodes=four", "launch.modul=x"]
)
def test_a_typo_or_a_wrong_type_fails_at_compose_time(override):
    with pytest.raises(ConfigCompositionException):
        compose_launch(override.split())


def test_local_dry_run_through_the_command_line_quotes_the_job_overrides(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "launch", "launcher.nproc_per_node=2", "launcher.master_port=29511",
         "launch.dry_run=true", "--", "model=tiny", "run_dir=/runs/with space", "train.beta=0.1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        "torchrun --nproc_per_node 2 --master_port 29511 -m train.pretrain "
        "model=tiny 'run_dir=/runs/with space' train.beta=0.1\n"
    )
    assert list(tmp_path.iterdir()) == [], "the launcher wrote files"


def test_cli_errors_list_every_problem_without_a_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "launch", "launcher=slurm", "launcher.nodes=0",
         "launcher.master_port=80", "launch.dry_run=true"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        "error: invalid launch config:\n"
        "  - launcher.nodes: must be >= 1, got 0\n"
        "  - launcher.master_port: must lie in [1024, 65535], got 80\n"
    )


def test_config_args_come_first_and_the_command_line_ones_win(capsys):
    out = dry_run(
        capsys,
        [
            "launcher.nproc_per_node=1",
            "launch.module=train.sft",
            "launch.args=['model=tiny','x=1']",
        ],
        ["x=2"],
    )
    assert (
        out == "torchrun --nproc_per_node 1 --master_port 29500 -m train.sft model=tiny x=1 x=2\n"
    )


@pytest.mark.parametrize(("gpus", "nproc"), [(0, 1), (4, 4)])
def test_local_defaults_to_one_worker_per_visible_gpu(capsys, monkeypatch, gpus, nproc):
    monkeypatch.setattr(launch.commands, "visible_gpus", lambda: gpus)
    assert dry_run(capsys, []).startswith(f"torchrun --nproc_per_node {nproc} --master_port 29500 ")


def test_hostfile_dry_run_derives_nodes_gpus_and_master_from_the_hostfile(capsys, hostfile):
    out = dry_run(capsys, ["launcher=hostfile", f"launcher.hostfile={hostfile}"], ["run_dir=/a b"])
    assert out == (
        f"deepspeed --hostfile {hostfile} --master_addr node-a --master_port 29500 "
        "--num_nodes 3 --num_gpus 8 --no_local_rank --module train.pretrain 'run_dir=/a b'\n"
    )


def test_hostfile_dry_run_with_explicit_settings(capsys, hostfile):
    overrides = [
        "launcher=hostfile",
        f"launcher.hostfile={hostfile}",
        "launcher.num_nodes=2",
        "launcher.num_gpus=4",
        "launcher.master_addr=10.0.0.1",
        "launcher.master_port=3000",
    ]
    assert dry_run(capsys, overrides) == (
        f"deepspeed --hostfile {hostfile} --master_addr 10.0.0.1 --master_port 3000 "
        "--num_nodes 2 --num_gpus 4 --no_local_rank --module train.pretrain\n"
    )


def test_slurm_dry_run_prints_the_whole_batch_script(capsys):
    settings = {
        "nodes": "4",
        "gpus_per_node": "8",
        "cpus_per_task": "96",
        "time": "2-00:00:00",
        "partition": "gpu",
        "account": "lm",
        "job_name": "ouro-1.4b",
        "master_port": "29600",
        "log_dir": "/scratch/logs",
        "sbatch_args": "['--qos=high']",
        "setup": "['source .venv/bin/activate']",
    }
    overrides = ["launcher=slurm", "+launcher.env.NCCL_IB_HCA=mlx5"]
    overrides += [f"launcher.{key}={value}" for key, value in settings.items()]
    out = dry_run(capsys, overrides, ["model=ouro-1.4b", "run_dir=/scratch/run 1"])
    assert (
        out
        == """\
#!/bin/bash
#SBATCH --job-name=ouro-1.4b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --time=2-00:00:00
#SBATCH --partition=gpu
#SBATCH --account=lm
#SBATCH --output=/scratch/logs/%x-%j.out
#SBATCH --exclusive
#SBATCH --qos=high

set -euo pipefail
source .venv/bin/activate

export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"
export MASTER_PORT=29600
export NCCL_ASYNC_ERROR_HANDLING=1
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export NCCL_DEBUG=WARN
export OMP_NUM_THREADS=12
export NCCL_IB_HCA=mlx5

srun --cpus-per-task=96 --kill-on-bad-exit=1 torchrun \\
    --nnodes "$SLURM_NNODES" \\
    --nproc_per_node 8 \\
    --rdzv_id "$SLURM_JOB_ID" \\
    --rdzv_backend c10d \\
    --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" \\
    -m train.pretrain \\
    model=ouro-1.4b 'run_dir=/scratch/run 1'
"""
    )


def test_slurm_leaves_out_unset_options(capsys):
    overrides = ["launcher=slurm", "launcher.gpus_per_node=0", "launcher.cpus_per_task=16",
                 "launcher.exclusive=false", "launcher.omp_num_threads=4"]  # fmt: skip
    out = dry_run(capsys, overrides)
    for absent in ("--gpus-per-node", "--partition", "--account", "--exclusive"):
        assert absent not in out
    assert "export OMP_NUM_THREADS=4\n" in out
    assert "--nproc_per_node 1 \\\n    --rdzv_id" in out
    assert out.endswith("    -m train.pretrain\n")


def test_every_problem_is_reported_at_once():
    cfg = compose_launch(
        [
            "launcher=slurm",
            "launcher.nodes=0",
            "launcher.gpus_per_node=-1",
            "launcher.time=tomorrow",
            "launcher.job_name=my job",
            "launcher.sbatch_args=['qos=high']",
            "launch.module=train/pretrain",
            "+launcher.env.BAD-NAME=1",
        ]
    )
    assert launch_problems(cfg) == [
        "launch.module: 'train/pretrain' is not a dotted Python module name",
        "launcher.job_name: use letters, digits, '.', '_' or '-', got 'my job'",
        "launcher.nodes: must be >= 1, got 0",
        "launcher.gpus_per_node: must be >= 0, got -1",
        "launcher.time: 'tomorrow' is not a Slurm time (M, H:M:S, D-H, D-H:M:S, ...)",
        "launcher.sbatch_args: 'qos=high' is not a long option (--name=value)",
        "launcher.env: 'BAD-NAME' is not a shell variable name",
    ]
    with pytest.raises(ValueError, match="launcher.nodes: must be >= 1, got 0"):
        run_launch(cfg, [])


def test_hostfile_problems_are_clear(tmp_path, hostfile):
    def problems(*overrides: str) -> list[str]:
        return launch_problems(compose_launch(["launcher=hostfile", *overrides]))

    with pytest.raises(ValueError, match="launcher.hostfile: a value is needed"):
        compose_launch(["launcher=hostfile"])
    assert problems(f"launcher.hostfile={tmp_path}/absent") == [
        f"launcher.hostfile: no hostfile at {tmp_path}/absent"
    ]
    bad = tmp_path / "bad"
    bad.write_text("node-a slots=8\nnode-b\nnode-a slots=4\nnode-c slots=0\n")
    assert problems(f"launcher.hostfile={bad}", "launcher.master_port=70000") == [
        "launcher.master_port: must lie in [1024, 65535], got 70000",
        f"launcher.hostfile: {bad}:2: expected 'hostname slots=N', got 'node-b'",
        f"launcher.hostfile: {bad}:3: host node-a is listed twice",
        f"launcher.hostfile: {bad}:4: host node-c has no slots",
    ]
    (tmp_path / "empty").write_text("# nothing yet\n")
    assert problems(f"launcher.hostfile={tmp_path / 'empty'}") == [
        f"launcher.hostfile: {tmp_path / 'empty'}: lists no hosts"
    ]
    assert problems(f"launcher.hostfile={hostfile}", "launcher.num_nodes=4") == [
        f"launcher.num_nodes: 4 nodes asked, {hostfile} lists 3"
    ]
    assert problems(f"launcher.hostfile={hostfile}", "launcher.num_gpus=16") == [
        "launcher.num_gpus: 16 asked, a host has 8 slots"
    ]
    mixed = tmp_path / "mixed"
    mixed.write_text("node-a slots=8\nnode-b slots=4\n")
    assert problems(f"launcher.hostfile={mixed}") == [
        "launcher.num_gpus: the hosts' slots differ ([8, 4]); set it explicitly"
    ]
    assert problems(f"launcher.hostfile={mixed}", "launcher.num_gpus=4") == []


def test_local_launch_replaces_this_process_with_torchrun(monkeypatch):
    executed = []
    monkeypatch.setattr(launch.app.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(launch.app.os, "execvp", lambda file, args: executed.append((file, args)))
    cfg = compose_launch(["launcher.nproc_per_node=2"])
    run_launch(cfg, ["model=tiny"])
    command = ["torchrun", "--nproc_per_node", "2", "--master_port", "29500", "-m",
               "train.pretrain", "model=tiny"]  # fmt: skip
    assert executed == [("torchrun", command)]


def test_slurm_launch_writes_the_script_into_the_log_dir_and_submits_it(tmp_path, monkeypatch):
    submitted = []
    monkeypatch.setattr(launch.app.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(
        launch.app.subprocess,
        "run",
        lambda args, check: submitted.append(args) or subprocess.CompletedProcess(args, 0),
    )
    cfg = compose_launch(["launcher=slurm", f"launcher.log_dir={tmp_path}/logs"])
    assert run_launch(cfg, ["run_dir=/x"]) == 0
    [script] = (tmp_path / "logs").glob("looplm-*.sbatch")
    assert submitted == [["sbatch", str(script)]]
    assert script.read_text().endswith("-m train.pretrain \\\n    run_dir=/x\n")


def test_a_missing_program_is_reported(monkeypatch, capsys):
    monkeypatch.setattr(launch.app.shutil, "which", lambda name: None)
    assert run_launch(compose_launch(["launcher=slurm"]), []) == 127
    assert "sbatch is not on PATH" in capsys.readouterr().err
    assert run_launch(compose_launch(["launcher.nproc_per_node=1"]), []) == 127
    assert "torchrun is not on PATH" in capsys.readouterr().err


def test_job_args_follow_the_first_separator():
    assert split_job_args(["launcher=slurm", "--", "a=1", "--", "b"]) == (
        ["launcher=slurm"],
        ["a=1", "--", "b"],
    )
    assert split_job_args(["launcher=slurm"]) == (["launcher=slurm"], [])


def test_a_job_typo_is_refused_before_anything_is_written_or_submitted(tmp_path, monkeypatch):
    submitted = []
    monkeypatch.setattr(launch.app.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(launch.app.subprocess, "run", lambda *a, **k: submitted.append(a))
    cfg = compose_launch(["launcher=slurm", f"launcher.log_dir={tmp_path}/logs"], validate=True)
    with pytest.raises(ValueError, match="Could not override 'trian.max_steps'"):
        run_launch(cfg, ["run_dir=/x", "trian.max_steps=5"])
    assert submitted == [] and not (tmp_path / "logs").exists()


def test_the_job_is_checked_for_the_ranks_the_launch_starts(capsys):
    job = ["experiment=tiny_cpu", "run_dir=/x"]  # 4 x 256 tokens per pass and rank
    assert "torchrun" in dry_run(capsys, ["launcher.nproc_per_node=2"], job, validate=True)
    cfg = compose_launch(["launcher=slurm", "launcher.nodes=4", "launch.dry_run=true"], True)
    with pytest.raises(ValueError, match=r"global_batch_tokens \(2048\) must be a positive"):
        run_launch(cfg, job)  # 32 ranks: 32768 tokens a pass


def test_help_says_which_settings_go_before_and_after_the_separator():
    result = subprocess.run(
        [sys.executable, "-m", "launch", "--help"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "== Before `--`: the launcher ==" in result.stdout
    assert "== After `--`: the job ==" in result.stdout
    assert "experiment=" in result.stdout.split("== After")[1]


def readme_launch_commands() -> list[list[str]]:
    """Every `python -m launch ...` command of the README, continuation lines joined."""
    text = (REPO / "README.md").read_text().replace("\\\n", " ")
    return [
        shlex.split(line.split("#")[0])[3:]
        for line in text.splitlines()
        if line.strip().startswith("python -m launch ")
    ]


@pytest.mark.parametrize("args", readme_launch_commands(), ids=lambda args: " ".join(args)[:60])
def test_every_readme_launch_command_runs_as_a_dry_run(args, tmp_path):
    launcher, job = split_job_args(args)
    dry = [] if "launch.dry_run=true" in launcher else ["launch.dry_run=true"]
    result = subprocess.run(
        [sys.executable, "-m", "launch", *launcher, *dry, "--", *job],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "-m train." in result.stdout


def documented_launch_commands() -> list[tuple[str, list[str]]]:
    """(where, words) of every `python -m launch ...` written in the README, the configs'
    comments and the modules' docstrings, continuation lines joined."""
    files = [REPO / "README.md", *sorted((REPO / "configs").rglob("*.yaml"))]
    files += [p for d in ("launch", "train", "scripts") for p in sorted((REPO / d).glob("*.py"))]
    found = []
    for path in files:
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines):
            if "python -m launch " not in line or "[" in line:  # `[OVERRIDES...]`: a usage line
                continue
            text, more = line[line.index("python -m launch ") :], number
            while text.rstrip().endswith("\\") and more + 1 < len(lines):
                more += 1
                text = text.rstrip().rstrip("\\") + " " + lines[more].lstrip("#").strip()
            words = text.replace("`", " ").split()[3:]
            found.append((f"{path.relative_to(REPO)}:{number + 1}", words))
    return found


def job_settings_before_the_separator(words: list[str]) -> list[str]:
    launcher = words[: words.index("--")] if "--" in words else words
    return [
        word
        for word in launcher
        if "=" in word and word.split("=")[0].split(".")[0] not in ("launcher", "launch", "hydra")
    ]


def test_every_documented_launch_command_puts_the_job_settings_after_the_separator():
    commands = documented_launch_commands()
    assert len(commands) >= 8
    wrong = {
        where: bad for where, words in commands if (bad := job_settings_before_the_separator(words))
    }
    assert wrong == {}


def test_every_documented_launch_command_composes_its_job():
    """The job's overrides compose (known groups, options and keys); sft needs init_from."""
    from launch.job_check import JOBS

    wrong = {}
    for where, words in documented_launch_commands():
        launcher, job = launch_and_job(words)
        module = next((w.split("=")[1] for w in launcher if w.startswith("launch.module=")), None)
        config_name = JOBS[module or "train.pretrain"][0]
        import_module(module or "train.pretrain")  # registers the job's schemas
        try:
            with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
                compose(config_name, overrides=job)
        except Exception as error:  # noqa: BLE001 - any failure to compose is the finding
            wrong[where] = str(error).splitlines()[0]
    assert wrong == {}


def launch_and_job(words: list[str]) -> tuple[list[str], list[str]]:
    launcher = words[: words.index("--")] if "--" in words else words
    job = words[words.index("--") + 1 :] if "--" in words else []
    return launcher, job[: job.index(">")] if ">" in job else job


def test_every_documented_launch_command_passes_its_jobs_checks_at_the_ranks_it_starts():
    """What the launcher itself checks before it starts anything (nodes x workers ranks); only
    problems about placeholders for the user's own files may remain."""
    from launch.job_check import job_problems

    checked, wrong = [], {}
    for where, words in documented_launch_commands():
        launcher, job = launch_and_job(words)
        if any(word.startswith("-") for word in launcher):  # `--help`
            continue
        cfg = compose_launch(launcher, True)
        if isinstance(cfg.launcher, HostfileLauncher) and not Path(cfg.launcher.hostfile).exists():
            continue  # its ranks are its hostfile's slots
        problems = job_problems(cfg.launch.module, job, world_size(cfg.launcher))
        checked.append(where)
        if real := [p for p in problems if not USER_FILES.search(p)]:
            wrong[where] = real
    assert len(checked) >= 7
    assert wrong == {}


def test_a_placeholder_is_told_from_a_real_problem():
    assert USER_FILES.search("init_from: no Ouro-format directory at OURO_2.6B_INIT")
    assert USER_FILES.search("data.tokenizer: no tokenizer file at '/models/Ouro-1.4B/tok.json'")
    assert not USER_FILES.search("train.global_batch_tokens (2048) must be a positive multiple")
    assert not USER_FILES.search("init_from: no Ouro-format directory at runs/tiny")


def test_a_job_setting_before_the_separator_is_found():
    words = "launcher=slurm launch.nodes=16 experiment=ouro_1.4b run_dir=/x".split()
    assert job_settings_before_the_separator(words) == ["experiment=ouro_1.4b", "run_dir=/x"]
    assert job_settings_before_the_separator([*words[:2], "--", *words[2:]]) == []
