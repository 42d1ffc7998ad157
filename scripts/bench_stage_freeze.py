"""What freezing buys in a curriculum stage: tokens/s of a stage that trains only the exit gate
against the stage before it, which trains everything, in the same run.

    python scripts/bench_stage_freeze.py [--tokens 8192] [--layers 4] [--hidden 128]

``train.pretrain`` on 2 gloo ranks (ZeRO-2, float32) over the embedded corpus, two stages of
``--tokens`` each: ``all``, then ``gate`` with ``trainable: [model.early_exit_gate.*]``. The
frozen parameters get no gradient (``requires_grad``), so the gate stage's backward is only
the gate's. Prints the median tokens/s of each stage (its first 3 steps left out) and the
ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STAGES = (
    "curriculum.stages=[{{name: all, tokens: {tokens}}},"
    "{{name: gate, tokens: {tokens}, trainable: ['model.early_exit_gate.*']}}]"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=8192, help="tokens of each stage")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m",
            "train.pretrain", "model=tiny", f"model.num_hidden_layers={args.layers}",
            f"model.hidden_size={args.hidden}", f"model.intermediate_size={4 * args.hidden}",
            "data=embedded", "data.seq_len=64", "train.micro_batch_size=2",
            "train.global_batch_tokens=512", "train.log_every=1", "train.max_steps=null",
            STAGES.format(tokens=args.tokens), "checkpoint.every_steps=100000",
            "logging.wandb=false", "logging.plot_at_end=false", f"run_dir={run_dir}",
            f"data.cache_dir={Path(tmp) / 'cache'}",
        ]  # fmt: skip
        print("running two stages of", args.tokens, "tokens on 2 ranks ...", flush=True)
        env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline")
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(done.stdout[-3000:] + done.stderr[-3000:])
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    speed = {}
    for stage in ("all", "gate"):
        per_step = [r["tokens_per_s"] for r in records if r["stage"] == stage][3:]
        speed[stage] = statistics.median(per_step)
        print(f"stage {stage:4s}: {speed[stage]:8,.0f} tokens/s (median of {len(per_step)} steps)")
    print(f"gate-only stage / full stage: {speed['gate'] / speed['all']:.2f}x")


if __name__ == "__main__":
    main()
