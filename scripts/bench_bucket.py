"""The gradient bucket capped at the model's size against DeepSpeed's setting as given, on
2 gloo ranks, in the same run.

    python scripts/bench_bucket.py [--steps 40] [--bucket 50000000]

Each rank builds the model of the tests' jobs (tiny preset, hidden 64, vocabulary 8192:
1.1M parameters), then two ZeRO engines from the job's own ``deepspeed_config``: one given the
bucket setting as it is (what the job did before it capped it) and one capped at the
parameter count (``train.memory.reduce_bucket_elements``, what the job does). Each trains
``--steps`` optimizer steps of 2 micro-batches of 2 x 64 random tokens, the two engines in
turn, twice, under deterministic algorithms (``train.deterministic=true``, the tests' jobs) and
without; the median seconds per step and the process's system CPU time are printed with their
ratio. ZeRO-1/2 allocate a bucket of the setting's size at every micro-step: 100 MB of bf16 for
the default, for a model whose gradients take 2 MB. Under deterministic algorithms PyTorch
fills every new tensor (``torch.utils.deterministic.fill_uninitialized_memory``), so each
micro-step writes the whole bucket, page fault by page fault.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per timing")
    parser.add_argument("--bucket", type=int, default=50_000_000, help="the bucket setting")
    parser.add_argument("--zero", type=int, default=2, choices=[1, 2])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def engine_of(model, settings, params: int):
    import deepspeed
    import torch

    from train.engine import deepspeed_config, resolve_precision

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    precision = resolve_precision("auto")
    config = deepspeed_config(settings, 2, precision, params)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine, config["zero_optimization"]["reduce_bucket_size"]


def timed_steps(engine, steps: int, vocab: int) -> list[float]:
    import torch

    from looplm import Objective

    objective, generator = Objective(beta=0.1), torch.Generator().manual_seed(0)
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        for _ in range(2):
            ids = torch.randint(0, vocab, (2, 64), generator=generator)
            positions = torch.arange(64).expand(2, 64)
            engine.backward(engine(ids, positions, ids, objective=objective).loss)
        engine.step()
        seconds.append(time.perf_counter() - start)
    return seconds


def worker(args) -> None:
    import deepspeed
    import torch
    from hydra import compose, initialize_config_dir

    from looplm import LoopLMForCausalLM
    from train.config import register_configs, to_object

    deepspeed.init_distributed(dist_backend="gloo")
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        overrides = [
            "model=tiny", "model.hidden_size=64", "model.intermediate_size=128",
            "model.num_attention_heads=4", "model.num_key_value_heads=2", "run_dir=unused",
            f"deepspeed.zero_stage={args.zero}", f"deepspeed.reduce_bucket_size={args.bucket}",
        ]  # fmt: skip
        settings = to_object(compose(config_name="pretrain", overrides=overrides))
    config = settings.model.build_config()
    engines = {}
    for name, capped in (("as given", False), ("capped", True)):
        torch.manual_seed(0)
        model = LoopLMForCausalLM(config, attn_implementation="sdpa")
        params = model.num_parameters()
        # a count no smaller than the setting leaves the bucket as given (the job before)
        engines[name] = engine_of(model, settings, params if capped else args.bucket)
    rank0 = torch.distributed.get_rank() == 0
    if rank0:
        print(
            f"{params:,} parameters, ZeRO-{args.zero}, 2 ranks, {args.steps} steps x 2 per engine"
        )
    for deterministic in (True, False):
        torch.use_deterministic_algorithms(deterministic)
        seconds = {name: [] for name in engines}
        system = dict.fromkeys(engines, 0.0)
        for _ in range(2):
            for name, (engine, _) in engines.items():
                before = resource.getrusage(resource.RUSAGE_SELF).ru_stime
                seconds[name] += timed_steps(engine, args.steps, config.vocab_size)[2:]
                system[name] += resource.getrusage(resource.RUSAGE_SELF).ru_stime - before
        if rank0:
            print("deterministic algorithms" if deterministic else "default algorithms")
            for name, (_, bucket) in engines.items():
                median = statistics.median(seconds[name])
                print(f"  bucket {name:9} {bucket:>12,} elements: {1000 * median:7.1f} ms a step, "
                      f"system CPU {system[name]:5.1f} s (rank 0)")  # fmt: skip
            ratio = statistics.median(seconds["as given"]) / statistics.median(seconds["capped"])
            print(f"  capped / as given, steps per second: {ratio:.2f}x")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29741",
        __file__, "--worker", f"--steps={args.steps}", f"--bucket={args.bucket}",
        f"--zero={args.zero}",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    sys.exit(subprocess.call(command, cwd=REPO, env=env))


if __name__ == "__main__":
    main()
