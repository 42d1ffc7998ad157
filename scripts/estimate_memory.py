"""Per-GPU memory of a LoopLM training job, whether it fits, and the largest micro batch.

    python scripts/estimate_memory.py --model ouro-1.4b --seq-len 32768 --zero 2 --dp 128
    python scripts/estimate_memory.py --model ouro-2.6b --seq-len 65536 --sp 4 --dp 32
    python scripts/estimate_memory.py --model path/to/config.json --seq-len 4096 --no-checkpointing
    python scripts/estimate_memory.py --model tiny --seq-len 1024 --precision fp32 --measure

``--model`` is a looplm preset, a ``config.json`` or a directory holding one. The job is
``--dp`` data-parallel groups of ``--sp`` sequence-parallel ranks (``dp x sp`` GPUs; ``--sp``
is the trainer's ``deepspeed.sequence_parallel_size``). A job that cannot fit even one
sequence per rank is an error that names what would make it fit.

The estimate's assumptions are in `train/memory.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from looplm import PRESETS, LoopLMConfig
from train.memory import (
    ATTENTIONS,
    GIB,
    PRECISIONS,
    DoesNotFit,
    Setup,
    check_fits,
    estimate,
    measure_activation_bytes,
)

# ---- the command line --------------------------------------------------------------------


def load_model_config(name: str) -> LoopLMConfig:
    """A preset, a config.json, or a directory holding one."""
    if name in PRESETS:
        return LoopLMConfig.from_preset(name)
    path = Path(name)
    if path.exists():
        return LoopLMConfig.load(path)
    raise ValueError(f"--model {name!r} is neither a preset {sorted(PRESETS)} nor a config.json")


def parse_args(argv: list[str] | None = None) -> tuple[Setup, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="a preset, config.json or model dir")
    parser.add_argument("--seq-len", type=int, required=True)
    parser.add_argument("--steps", type=int, default=None, help="T (default: the model's)")
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--zero", type=int, default=2, help="ZeRO stage 0-3")
    parser.add_argument("--offload-optimizer", action="store_true")
    parser.add_argument("--offload-param", action="store_true")
    parser.add_argument("--dp", type=int, default=1, help="data-parallel size")
    parser.add_argument("--sp", type=int, default=1, help="sequence-parallel (Ulysses) size")
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="bf16")
    parser.add_argument("--attention", choices=ATTENTIONS, default="flash")
    parser.add_argument("--gpu-gib", type=float, default=80.0, help="memory of one GPU")
    parser.add_argument("--reserve-gib", type=float, default=2.0)
    parser.add_argument("--reduce-bucket", type=int, default=50_000_000)
    parser.add_argument("--prefetch-bucket", type=int, default=50_000_000)
    parser.add_argument("--measure", action="store_true", help="measure a CPU forward-backward")
    args = parser.parse_args(argv)
    try:
        config = load_model_config(args.model)
    except (OSError, ValueError) as e:
        parser.error(str(e))
    setup = Setup(
        config=config,
        seq_len=args.seq_len,
        micro_batch_size=args.micro_batch,
        num_recurrent_steps=args.steps,
        zero_stage=args.zero,
        offload_optimizer=args.offload_optimizer,
        offload_param=args.offload_param,
        data_parallel=args.dp,
        sequence_parallel=args.sp,
        gradient_checkpointing=not args.no_checkpointing,
        precision=args.precision,
        attention=args.attention,
        gpu_memory_gib=args.gpu_gib,
        reserve_gib=args.reserve_gib,
        reduce_bucket_size=args.reduce_bucket,
        prefetch_bucket_size=args.prefetch_bucket,
    )
    return setup, args


def main(argv: list[str] | None = None) -> int:
    setup, args = parse_args(argv)
    try:
        result, largest = check_fits(setup)
    except DoesNotFit as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for f in dataclasses.fields(result):
        value = getattr(result, f.name)
        if isinstance(value, int):
            print(f"{f.name:>16}  {value / GIB:9.3f} GiB")
    for name, value in result.activation_terms.items():
        print(f"{'':>16}  {value / GIB:9.3f}   {name}")
    verdict = "fits" if result.total <= setup.gpu_memory_gib * GIB else "does NOT fit"
    print(
        f"{'total':>16}  {result.total / GIB:9.3f} GiB per GPU at micro batch "
        f"{setup.micro_batch_size}: {verdict} in {setup.gpu_memory_gib:g} GiB; "
        f"largest micro batch that fits: {largest}"
    )
    if args.measure:
        measured = measure_activation_bytes(
            dataclasses.replace(setup, attention="sdpa", packed=False)
        )
        expected = estimate(dataclasses.replace(setup, attention="sdpa", packed=False)).activations
        print(
            f"measured activations (CPU, {setup.precision}): {measured / 2**20:.2f} MiB, "
            f"estimated {expected / 2**20:.2f} MiB ({(expected - measured) / measured:+.1%})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
