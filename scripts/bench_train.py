"""The training job's overhead: the whole job (data pipeline plus DeepSpeed step) against the
model's training step alone, in the same run.

    python scripts/bench_train.py [--steps 30] [--seq-len 256] [--micro-batch 8]
    python scripts/bench_train.py --mfu --micro-batch 1   # one GPU: Ouro-1.4B, seq 4096, bf16

(a) ``train.pretrain`` on one rank (torchrun, gloo, ZeRO-2, float32) reading the embedded
corpus; its per-step tokens/s come from metrics.jsonl. (b) The same model and objective stepped
by a bare loop (forward, backward, clip, AdamW) on the same packed batches, read beforehand. Each runs
in its own process; peak memory is that process tree's maximum resident set. Target: the
job's overhead (1 - a/b tokens/s) at most 10%.

``--mfu`` (one GPU) trains an Ouro-1.4B-shaped model (T=4) at sequence 4096 in bf16 and prints
the model FLOPs utilization the job logs, counting the loops (``train.metrics``); target 50%.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def bare_step_worker(args) -> None:
    """Runs in a subprocess: the model step alone, on the same packed batches the job reads
    (taken from the loader before the clock starts); prints tokens/s of each step as JSON."""
    import torch

    from data_pipelines.config import load_data_config
    from data_pipelines.loader import build_data_loader
    from looplm import LoopLMConfig, LoopLMForCausalLM, Objective

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    data = load_data_config(
        str(REPO / "configs/data/embedded.yaml"), [f"seq_len={args.seq_len}", "num_workers=0"]
    )
    loader = iter(build_data_loader(data, rank=0, world_size=1, micro_batch_size=args.micro_batch))
    batches = [next(loader) for _ in range(args.steps)]
    model = LoopLMForCausalLM(LoopLMConfig.from_preset("tiny"), attn_implementation="sdpa")
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
        lr=1e-3,
        betas=(0.9, 0.95),
    )
    objective = Objective(beta=0.1)
    rates = []
    for batch in batches:
        start = time.perf_counter()
        out = model(batch["input_ids"], batch["position_ids"], batch["labels"], objective=objective)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        rates.append(args.micro_batch * args.seq_len / (time.perf_counter() - start))
    print(json.dumps(rates))


# Runs a command and reports the peak RSS of its process tree (only its own descendants).
_PEAK_WRAPPER = (
    "import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
    "print('PEAK_RSS_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
    "sys.exit(code)"
)


def _run(command: list[str], env: dict) -> tuple[str, float]:
    """Runs a command; returns its stdout and the peak RSS (GiB) of its process tree."""
    wrapped = [sys.executable, "-c", _PEAK_WRAPPER, *command]
    result = subprocess.run(wrapped, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:6])} ... failed:\n{result.stderr[-3000:]}")
    peak_kib = int(result.stderr.strip().splitlines()[-1].split()[-1])
    return result.stdout, peak_kib / 2**20


def run_job(args, env: dict) -> tuple[list[float], float]:
    with tempfile.TemporaryDirectory() as run_dir:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_port=29731",
            "-m", "train.pretrain", "model=tiny", "data=embedded", "deepspeed=zero2",
            "deepspeed.precision=fp32", f"run_dir={run_dir}", f"train.max_steps={args.steps}",
            f"data.seq_len={args.seq_len}", f"train.micro_batch_size={args.micro_batch}",
            f"train.global_batch_tokens={args.micro_batch * args.seq_len}", "data.num_workers=1",
            "checkpoint.every_steps=100000", "logging.wandb=false", "logging.plot_at_end=false",
            "model.attn_implementation=sdpa", "optim.lr=1e-3", "train.log_every=100000",
        ]  # fmt: skip
        _, peak = _run(command, env)
        records = [
            json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
        ]
    return [r["tokens_per_s"] for r in records], peak


def run_bare(args, env: dict) -> tuple[list[float], float]:
    command = [sys.executable, __file__, "--worker", f"--steps={args.steps}", f"--seq-len={args.seq_len}",
               f"--micro-batch={args.micro_batch}", f"--threads={args.threads}"]  # fmt: skip
    out, peak = _run(command, env)
    return json.loads(out.strip().splitlines()[-1]), peak


def run_mfu(args, env: dict) -> None:
    """The job's logged MFU for an Ouro-1.4B-shaped model on one GPU."""
    with tempfile.TemporaryDirectory() as run_dir:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_port=29733",
            "-m", "train.pretrain", "model=ouro_1.4b", "data=embedded", "deepspeed=zero2",
            "deepspeed.precision=bf16", f"run_dir={run_dir}", f"train.max_steps={args.steps}",
            "data.seq_len=4096", f"train.micro_batch_size={args.micro_batch}",
            f"train.global_batch_tokens={args.micro_batch * 4096 * args.accumulation}",
            "checkpoint.every_steps=100000", "logging.wandb=false", "logging.plot_at_end=false",
            "schedule.warmup_steps=1",
        ]  # fmt: skip
        _run(command, env)
        records = [
            json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
        ]
    mfu = statistics.median(r["mfu"] for r in records[args.warmup :])
    rate = statistics.median(r["tokens_per_s"] for r in records[args.warmup :])
    print(f"Ouro-1.4B shape, T=4, seq 4096, bf16, micro batch {args.micro_batch}: {rate:,.0f} tokens/s, "
          f"MFU {mfu:.1%} ({'PASS' if mfu >= 0.5 else 'FAIL'}: target >= 50%)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument(
        "--warmup", type=int, default=5, help="leading steps left out of the medians"
    )
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (torchrun sets 1 per rank)"
    )
    parser.add_argument("--mfu", action="store_true", help="one GPU: MFU of Ouro-1.4B's shape")
    parser.add_argument("--accumulation", type=int, default=4, help="--mfu: micro-batches a step")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        bare_step_worker(args)
        return
    env = dict(
        os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(REPO), WANDB_MODE="disabled"
    )
    if args.mfu:
        run_mfu(args, env)
        return
    bare, bare_peak = run_bare(args, env)
    job, job_peak = run_job(args, env)
    bare_rate = statistics.median(bare[args.warmup :])
    job_rate = statistics.median(job[args.warmup :])
    overhead = 1.0 - job_rate / bare_rate
    print(
        f"tiny LoopLM (T=4), micro batch {args.micro_batch} x seq {args.seq_len}, {args.steps} steps, fp32, CPU"
    )
    print(f"{'':28}{'tokens/s':>12}{'peak RSS GiB':>14}")
    print(f"{'model step alone':28}{bare_rate:>12,.0f}{bare_peak:>14.2f}")
    print(f"{'whole job (data+DeepSpeed)':28}{job_rate:>12,.0f}{job_peak:>14.2f}")
    print(f"job / model tokens/s: {job_rate / bare_rate:.3f}  overhead {overhead:.1%}  "
          f"({'PASS' if overhead <= 0.10 else 'FAIL'}: target <= 10%)")  # fmt: skip


if __name__ == "__main__":
    main()
