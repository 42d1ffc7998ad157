"""The cost of evaluation during training: the tiny experiment with its shipped eval settings
against the same run with evaluation off, in the same invocation.

    python scripts/bench_eval.py [--max-steps 300] [--repeats 1] [--out DIR]

Each run is ``torchrun --nproc_per_node 2 -m train.pretrain experiment=tiny_cpu`` in a fresh
run directory (the data cache is shared and warmed first, so both runs read the same files).
Printed: each run's wall time, the seconds its evaluations took (``eval.jsonl``), the
evaluations' share of the evaluated run's wall time (target: at most 5%), and the ratio of
the two runs' wall times (noisier: it also holds the machine's jitter).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_job(run_dir: Path, cache_dir: Path, max_steps: int, evaluate: bool) -> float:
    """Wall seconds of one tiny-experiment run."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "train.pretrain",
        "experiment=tiny_cpu", f"run_dir={run_dir}", f"data.cache_dir={cache_dir}",
        f"train.max_steps={max_steps}", "logging.wandb=false", "logging.plot_at_end=false",
    ]  # fmt: skip
    if not evaluate:
        command.append("eval=none")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    start = time.time()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"the run failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return time.time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        cache = root / "cache"
        print("warming the data cache and the held-out sets (a 2-step run)", flush=True)
        run_job(root / "warm", cache, 2, evaluate=True)
        for repeat in range(args.repeats):
            print(
                f"run {repeat + 1}: evaluation off, then on ({args.max_steps} steps each)",
                flush=True,
            )
            off = run_job(root / f"off{repeat}", cache, args.max_steps, evaluate=False)
            on_dir = root / f"on{repeat}"
            on = run_job(on_dir, cache, args.max_steps, evaluate=True)
            records = [
                json.loads(line) for line in (on_dir / "eval.jsonl").read_text().splitlines()
            ]
            seconds = sum(r["seconds"] for r in records)
            print(
                f"  off {off:.1f} s, on {on:.1f} s (ratio {on / off:.3f}); {len(records)} "
                f"evaluations took {seconds:.1f} s = {seconds / on:.1%} of the evaluated run "
                f"(target <= 5%)",
                flush=True,
            )


if __name__ == "__main__":
    main()
