"""What a training step of the reproduction's quick grid costs on a CPU core, and what each
lever on it saves: the model's own step, without DeepSpeed, the data or a second rank.

The quick grid's model (``scripts/reproduce.py``: hidden 128, 4 heads, MLP 3 x hidden, one
layer looped 3 times, in bf16 as the job runs it on a CPU with bf16 arithmetic; ``float32``
below is the job's precision elsewhere) on one rank's share of its step: 8 rows
of 128 tokens packed with Mano-sized documents (6 or 8 tokens, the answer and EOS the
targets), a Stage I forward and backward, gradient clipping and AdamW. Each variant changes
one thing; all run in one process, one thread by default, the grid's step first and the
compiled one last (its first calls, which compile, are timed apart):

- ``float32``: float32 weights in place of bf16;
- ``MLP 2 x hidden``: a narrower MLP (the grid's is 3 x hidden);
- ``16 x 64 tokens``: the same tokens in rows of 64 (attention over fewer keys);
- ``compiled``: the layers compiled (``model.compile=true``).

Prints the median milliseconds a step with the 10th and 90th percentiles, tokens/s, and the
grid's step over each variant's (above 1: the variant is faster). Through the job a step
costs more than here (DeepSpeed's reduction and optimizer, the other rank): see
scripts/REPRODUCTION.md, "Initialization, width and the job's own time".

``--floor`` times instead the grid's step of each of Mano's quick-grid models (its four
families; the two seeds share a shape) and adds them up over the grid's steps: the minutes
Mano's quick grid would take on 2 cores if the job cost nothing beyond its model's arithmetic
(each of the 2 ranks steps its half of the batch on a core of its own, at the same time), next
to the 30-minute budget of ``--quick``; with ``--levers``, each step with the narrower MLP, rows
of 64 and compiled layers at once.

Usage (from the repository root):
    python scripts/bench_grid_step.py [--layers 3 --loops 1] [--repeats 100] [--skip-compile]
    python scripts/bench_grid_step.py --floor [--levers]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import reproduce  # noqa: E402

from looplm import LoopLMConfig, LoopLMForCausalLM, Objective  # noqa: E402

GRID = reproduce.QUICK
TOKENS = GRID.batch_tokens // GRID.ranks
"""One rank's share of the quick grid's step."""
VOCAB = 21
"""The size of the quick grid's Mano tokenizer."""
BUDGET_MIN = 30
"""What ``reproduce.py --quick`` is asked to take on 2 CPU cores."""


@dataclass(frozen=True)
class Variant:
    """One setting of the step; the defaults are the quick grid's."""

    name: str
    dtype: torch.dtype = torch.bfloat16
    mlp: int | None = None
    """The MLP's width over the hidden size (None: the grid's)."""
    seq_len: int = GRID.seq_len
    compiled: bool = False


VARIANTS = (
    Variant("the grid's step"),
    Variant("float32", dtype=torch.float32),
    Variant("MLP 2 x hidden", mlp=2),
    Variant("16 x 64 tokens", seq_len=64),
    Variant("compiled", compiled=True),
)
LEVERS = Variant("the three levers", mlp=2, seq_len=64, compiled=True)
"""``--floor --levers``: the narrower MLP, rows of 64 and compiled layers at once."""


def packed_batch(rows: int, seq_len: int, seed: int = 0):
    """Token ids, positions and labels of rows packed with 6- and 8-token documents whose last
    two tokens (the answer, EOS) are the targets; a row ends with what fits of its last."""
    rng = random.Random(seed)
    ids = torch.randint(1, VOCAB, (rows, seq_len), generator=torch.Generator().manual_seed(seed))
    positions = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for row in range(rows):
        start = 0
        while start < seq_len:
            length = min(rng.choice((6, 8)), seq_len - start)
            positions[row, start : start + length] = torch.arange(length)
            end = start + length
            labels[row, max(start, end - 3) : end - 1] = ids[row, max(start + 1, end - 2) : end]
            start = end
    return ids, positions, labels


def trainer(variant: Variant, args: argparse.Namespace, grid_model=None):
    """A step function of the variant's model (``grid_model``, a ``reproduce.Model``; by
    default ``--layers`` x ``--loops`` looped), and its parameter count."""
    scale = replace(GRID, hidden_size=args.hidden, heads=args.heads)
    if grid_model is None:
        grid_model = reproduce.Model("mano", "looped", args.layers, args.loops, seed=0)
    settings = reproduce.model_settings(grid_model, scale, VOCAB)
    if variant.mlp is not None:
        settings["intermediate_size"] = variant.mlp * args.hidden
    config = LoopLMConfig.from_preset("tiny", **settings)
    torch.manual_seed(0)
    model = LoopLMForCausalLM(config, "sdpa").to(variant.dtype)
    if variant.compiled:
        model.compile_layers()
    optimizer = torch.optim.AdamW(model.parameters(), lr=GRID.lr, betas=(0.9, 0.95))
    ids, positions, labels = packed_batch(TOKENS // variant.seq_len, variant.seq_len)
    kind, beta = reproduce.training_objective(grid_model, GRID)
    objective = Objective(kind=kind, beta=beta)

    def step() -> None:
        loss = model(ids, position_ids=positions, labels=labels, objective=objective).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, config.num_parameters()


def measure(step, warmup: int, repeats: int) -> dict:
    """Milliseconds a step over ``repeats`` steps (median, 10th and 90th percentiles, within
    the measured times), after ``warmup`` steps whose total seconds are reported apart."""
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    warm = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(1e3 * (time.perf_counter() - start))
    deciles = statistics.quantiles(times, n=10, method="inclusive") if repeats > 1 else times * 9
    return {
        "median": statistics.median(times),
        "p10": deciles[0],
        "p90": deciles[-1],
        "warmup_s": warm,
    }


def floor(args: argparse.Namespace) -> int:
    """The ``--floor`` table: each of Mano's quick-grid models at its step's median."""
    models = reproduce.grid(GRID, ["mano"])
    steps = GRID.steps_of("mano")
    shapes: dict[tuple, list] = {}  # the seeds of a shape share its step
    for model in models:
        shapes.setdefault((model.family, model.layers, model.loops), []).append(model)
    variant = LEVERS if args.levers else VARIANTS[0]
    print(f"torch {torch.__version__}, {args.threads} thread(s): Mano's quick grid, "
          f"{len(models)} models ({len(GRID.seeds)} seeds), {steps} steps of "
          f"{GRID.batch_tokens} tokens on {GRID.ranks} ranks, {TOKENS} tokens a rank a step; "
          f"the model's bf16 step alone{' with ' + variant.name if args.levers else ''}, "
          f"{args.repeats} timed steps a model after {args.warmup}\n")  # fmt: skip
    print(f"{'model':<22} {'median ms':>9} {'p10':>6} {'p90':>6} {'models':>6} {'minutes':>8}")
    total = 0.0
    for (family, layers, loops), seeds in shapes.items():
        step, _ = trainer(variant, args, seeds[0])
        result = measure(step, args.warmup, args.repeats)
        count = len(seeds)
        minutes = count * steps * result["median"] / 60e3
        total += minutes
        print(f"{f'{family} {layers} x {loops}':<22} {result['median']:9.1f} "
              f"{result['p10']:6.1f} {result['p90']:6.1f} {count:>6} {minutes:8.1f}",
              flush=True)  # fmt: skip
    print(f"\nthe model's arithmetic alone: {total:.1f} min, {total / BUDGET_MIN:.2f}x the "
          f"{BUDGET_MIN}-minute budget of --quick (no start-up, DeepSpeed, data or "
          f"evaluation counted)")  # fmt: skip
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--loops", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=GRID.hidden_size)
    parser.add_argument("--heads", type=int, default=GRID.heads)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--warmup",
        type=int,
        default=10,
        help="steps before each variant's timed ones (the compiled variant's first compile)",
    )
    parser.add_argument("--repeats", type=int, default=100, help="timed steps of each variant")
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument(
        "--floor",
        action="store_true",
        help="time each of Mano's quick-grid models (their own shapes: --layers and --loops "
        "do not apply) and sum them over the grid's steps",
    )
    parser.add_argument(
        "--levers", action="store_true", help="with --floor: every model with the three levers"
    )
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 1:
        parser.error("--repeats and --warmup must be at least 1")
    torch.set_num_threads(args.threads)
    if args.levers and not args.floor:
        parser.error("--levers goes with --floor")
    if args.levers and args.skip_compile:
        parser.error("--levers compiles the layers: leave out --skip-compile")
    if args.floor:
        return floor(args)
    variants = [v for v in VARIANTS if not (v.compiled and args.skip_compile)]
    print(f"torch {torch.__version__}, {args.threads} thread(s): {args.layers} layer(s) of "
          f"{args.hidden} x {args.loops} step(s), {TOKENS} tokens a step, Stage I + AdamW; "
          f"{args.repeats} timed steps a variant after {args.warmup}\n")  # fmt: skip
    print(f"{'variant':<16} {'params':>8} {'median ms':>9} {'p10':>6} {'p90':>6} "
          f"{'tokens/s':>9} {'speed-up':>8}")  # fmt: skip
    base = None
    for variant in variants:
        step, params = trainer(variant, args)
        result = measure(step, args.warmup, args.repeats)
        base = base or result["median"]
        extra = f"  (first {args.warmup} steps, compiling: {result['warmup_s']:.1f} s)"
        print(f"{variant.name:<16} {params:>8,} {result['median']:9.1f} {result['p10']:6.1f} "
              f"{result['p90']:6.1f} {TOKENS / result['median'] * 1e3:9,.0f} "
              f"{base / result['median']:7.2f}x{extra if variant.compiled else ''}",
              flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
