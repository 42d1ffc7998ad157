"""Runs the training jobs as users do: torchrun with 2 gloo ranks on this machine."""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]

# A CPU-sized model and batch that a 2-core machine steps through in well under a second.
FAST = [
    "model=tiny",
    "model.hidden_size=64",
    "model.intermediate_size=128",
    "model.num_attention_heads=4",
    "model.num_key_value_heads=2",
    "data=embedded",
    "data.seq_len=64",
    "data.num_workers=1",
    "train.micro_batch_size=2",
    "train.global_batch_tokens=512",
    "train.deterministic=true",
    "train.log_every=1",
    "schedule.warmup_steps=2",
    "optim.lr=1e-3",
    "logging.wandb=false",
    "logging.plot_at_end=false",
]


def free_port() -> int:
    """A free port for a job's rendezvous. Under pytest-xdist each worker draws from a range of
    its own, below the kernel's ephemeral ports, so two workers never hand out the same port
    between the check here and the job's bind."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    candidates = [0]  # any: the kernel picks
    if worker.startswith("gw") and int(worker[2:]) < 12:
        low = 20_000 + 1_000 * int(worker[2:])
        candidates = random.Random().sample(range(low, low + 1_000), 1_000)
    for port in candidates:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:  # in use
                continue
            return s.getsockname()[1]
    raise RuntimeError(f"no free port in the range of pytest worker {worker}")


def torchrun_command(module: str, overrides: list[str], nproc: int = 2) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        "-m",
        module,
        *overrides,
    ]


def environment() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", PYTHONPATH=str(REPO))


def start(
    module: str, overrides: list[str], log: Path, nproc: int = 2, max_file_bytes: int | None = None
):
    """Starts a job in its own process group; its output goes to ``log``. ``max_file_bytes``
    caps the size of any file the job writes, as a full disk would (writes fail with EFBIG)."""

    def limit_file_size():
        if max_file_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    return subprocess.Popen(
        torchrun_command(module, overrides, nproc),
        cwd=REPO,
        env=environment(),
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=limit_file_size,
    )


def run(
    module: str,
    overrides: list[str],
    log: Path,
    nproc: int = 2,
    timeout: int = 300,
    max_file_bytes: int | None = None,
):
    """Runs a job to its end; returns (exit code, output)."""
    process = start(module, overrides, log, nproc, max_file_bytes)
    try:
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"the job did not end in {timeout} s; {hung_job_report(process, log)}"
        ) from None
    return code, log.read_text()


def dump_stacks(process, settle_s: float = 0.5) -> None:
    """Asks every process of a job but its launcher (the ranks, their data workers) for every
    thread's stack: they print it to the job's log (train.trainer.STACK_DUMP_SIGNAL) and go
    on. One at a time, ``settle_s`` apart: written at once, the stacks would interleave."""
    import psutil

    from train.trainer import STACK_DUMP_SIGNAL

    try:
        tree = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    for child in tree:
        try:
            os.kill(child.pid, STACK_DUMP_SIGNAL)
        except ProcessLookupError:
            continue
        time.sleep(settle_s)


def hung_job_report(process, log: Path, chars: int = 20_000) -> str:
    """Kills a job that hangs, after its stacks are in its log; returns the end of the log."""
    dump_stacks(process)
    kill_job(process)
    return f"the end of its log, with the stack of each process:\n{log.read_text()[-chars:]}"


def kill_job(process, sig: int = signal.SIGKILL) -> None:
    """Sends ``sig`` to a job's launcher and every process under it. torchrun starts each
    rank in a session of its own, so signalling the launcher's process group alone would
    leave the ranks running as orphans."""
    import psutil

    try:
        tree = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    for pid in [process.pid, *(p.pid for p in tree)]:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    if sig == signal.SIGKILL:
        process.wait()
        _, alive = psutil.wait_procs(tree, timeout=30)
        assert not alive, f"processes of the job outlived its SIGKILL: {alive}"


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for(
    predicate, process, timeout: float = 240.0, poll: float = 0.2, log: Path | None = None
) -> None:
    """Waits until ``predicate()``; a job that ends first fails, and one that hangs is killed,
    its stacks in the error when its ``log`` is given."""
    deadline = time.time() + timeout
    while not predicate():
        if process.poll() is not None:
            raise AssertionError(
                f"the job ended (code {process.returncode}) before the awaited state"
            )
        if time.time() > deadline:
            if log is None:
                kill_job(process)
                raise TimeoutError("the awaited state did not come")
            report = hung_job_report(process, log)
            raise TimeoutError(f"the awaited state did not come in {timeout} s; {report}")
        time.sleep(poll)


def wait_paused(log: Path, process, ranks: int = 2) -> None:
    """Waits until ``ranks`` ranks of the job logging to ``log`` have paused on a
    ``faults.*`` setting (train.faults): a SIGKILL then lands at that moment, not near it."""
    from train.faults import PAUSED

    wait_for(lambda: log.read_text().count(PAUSED) >= ranks, process, log=log)


def job(run_dir, cache_dir, *extra) -> list[str]:
    """The overrides of a FAST job writing into run_dir."""
    return [*FAST, f"run_dir={run_dir}", f"data.cache_dir={cache_dir}", *extra]


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    """A run directory of a test's own, copied from a shared one (a run dir can be moved: its
    checkpoints name no absolute path)."""
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


def completed(run_dir: Path) -> list[str]:
    """Names of the complete checkpoints of a run, oldest first."""
    root = run_dir / "checkpoints"
    return sorted(p.name for p in root.glob("step_*") if (p / "COMPLETE").is_file())


def tensors(tree, prefix=""):
    """Every tensor of a nested checkpoint structure, by path."""
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    items = (
        tree.items()
        if isinstance(tree, dict)
        else enumerate(tree)
        if isinstance(tree, list | tuple)
        else ()
    )
    found = {}
    for key, value in items:
        found.update(tensors(value, f"{prefix}/{key}"))
    return found


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Identical bits (a NaN in ZeRO-3's partition padding equals itself)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.detach().view(bits), b.detach().view(bits))
    return torch.equal(a, b)


def optimizer_tensors(checkpoint: Path) -> dict:
    """Every tensor of every rank's DeepSpeed optimizer state of a checkpoint."""
    files = sorted((checkpoint / "deepspeed").glob("*optim_states.pt"))
    assert files
    return {
        f.name + path: t
        for f in files
        for path, t in tensors(torch.load(f, weights_only=False)).items()
    }
