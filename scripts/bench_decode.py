"""Decoding speed with early exit against running every recurrent step, in the same run.

For each exit rule, ``generate`` decodes the same prompts with ``early_exit`` on and off, the
two alternating within every round so that they share the machine's load; the median round
counts. The prefill (the prompt's forward, which runs every step either way) is timed on its
own, as ``generate`` with one new token, and subtracted: decode tokens/s is
batch x (new tokens - 1) over the time of the decode forwards.

Reported per rule: the recurrent steps a decode forward ran (counted by a hook on the first
layer; the all-steps path runs T), the mean depth a token needed (exit step + 1; below the
steps run when rows of a batch exit at different steps), both tokens/s, their ratio, and
whether both paths decoded the same tokens (they may part after the first early exit, whose
filled K/V later tokens attend to; in ``full`` mode a fixed ``exit_at_step`` never does).

Weights are random (seeded). An untrained gate gives lambda ~ 0.5 at every step, so the
Q-exit CDF is ~0.5, 0.75, 0.875, 1 after steps 1..4 and a sweep over q sweeps the depth.

Usage (from the repository root):
    python scripts/bench_decode.py                         # small preset, batch 1
    python scripts/bench_decode.py --batch 4 --kv-sharing last
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from looplm import LoopLMConfig, LoopLMForCausalLM  # noqa: E402

RULES = (
    {"exit_at_step": 1},
    {"exit_at_step": 2},
    {"exit_at_step": 3},
    {"exit_threshold": 0.3},
    {"exit_threshold": 0.6},
    {"exit_threshold": 0.8},
    {"exit_threshold": 0.9},
    {"exit_threshold": 1.0},
)


class StepCounter:
    """Counts recurrent steps (calls of the first layer) and the decode tokens' exit steps."""

    def __init__(self, model: LoopLMForCausalLM):
        self.steps, self.exit_steps = 0, []
        model.model.layers[0].register_forward_hook(self._on_step)
        model.register_forward_hook(self._on_forward)

    def _on_step(self, *_):
        self.steps += 1

    def _on_forward(self, _module, args, output):
        if args[0].shape[1] == 1:  # a decode forward; prompts are longer
            self.exit_steps.append(output.exit_steps)

    def reset(self) -> None:
        self.steps, self.exit_steps = 0, []


def timed(fn) -> tuple[dict[str, float], torch.Tensor]:
    """Wall seconds (GPU work included) and this process's CPU seconds of ``fn()``, and its
    result. On a shared CPU the CPU seconds are the steadier measure of the work done."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}, out


def measure_rule(model, prompt, args, rule: dict, counter: StepCounter, prefill: dict):
    """Median decode tokens/s (wall and CPU) of both paths under one exit rule, and the depths."""
    seconds = {(early, clock): [] for early in (False, True) for clock in ("wall", "cpu")}
    tokens = {}
    for _ in range(args.rounds):
        for early in (False, True):
            counter.reset()
            elapsed, tokens[early] = timed(
                lambda early=early: model.generate(
                    prompt,
                    args.new_tokens,
                    eos_token_id=[],
                    kv_sharing=args.kv_sharing,
                    early_exit=early,
                    **rule,
                )
            )
            for clock, s in elapsed.items():
                seconds[(early, clock)].append(s - prefill[clock])
    steps_T = model.config.total_ut_steps
    decode_forwards = args.new_tokens - 1
    exit_steps = torch.cat(counter.exit_steps)  # of the last early-exit run
    decoded = prompt.shape[0] * decode_forwards
    rate = {key: decoded / statistics.median(s) for key, s in seconds.items()}
    return {
        "steps_per_forward": (counter.steps - steps_T) / decode_forwards,
        "token_depth": float((exit_steps + 1).float().mean()),
        **{f"all_steps_{clock}": rate[(False, clock)] for clock in ("wall", "cpu")},
        **{f"early_{clock}": rate[(True, clock)] for clock in ("wall", "cpu")},
        **{f"speed_up_{c}": rate[(True, c)] / rate[(False, c)] for c in ("wall", "cpu")},
        "same_tokens": bool(torch.equal(tokens[False], tokens[True])),
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="small", help="LoopLMConfig preset (default: small)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--kv-sharing", default="full", choices=("full", "last", "average"))
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per rule (median)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error("--new-tokens must be >= 2: the first token comes from the prefill")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = LoopLMConfig.from_preset(args.preset)
    dtype = getattr(torch, args.dtype)
    model = LoopLMForCausalLM(config).to(device=args.device, dtype=dtype).eval()
    prompt = torch.randint(0, config.vocab_size, (args.batch, args.prompt_len), device=args.device)
    counter = StepCounter(model)
    with torch.no_grad():
        model.generate(prompt, 4, eos_token_id=[], early_exit=True)  # warm-up
        prefills = [timed(lambda: model.generate(prompt, 1, eos_token_id=[]))[0] for _ in range(5)]
        prefill = {clock: statistics.median(p[clock] for p in prefills) for clock in prefills[0]}
        print(
            f"bench_decode: preset {args.preset} (hidden {config.hidden_size}, "
            f"{config.num_hidden_layers} layers, T={config.total_ut_steps}), {args.dtype} on "
            f"{args.device}, {args.threads} threads; batch {args.batch}, prompt "
            f"{args.prompt_len}, {args.new_tokens} new tokens, kv {args.kv_sharing}; "
            f"median of {args.rounds} rounds; prefill {prefill['wall'] * 1e3:.1f} ms wall, "
            f"{prefill['cpu'] * 1e3:.1f} ms CPU subtracted"
        )
        print(f"{'':<18}{'':>10}{'':>7}  {'decode tok/s (wall)':^28}  {'decode tok/s (CPU)':^28}")
        print(
            f"{'rule':<18}{'steps/fwd':>10}{'depth':>7}"
            + f"  {'all':>8}{'early':>8}{'speed-up':>12}" * 2
            + f"{'same tokens':>13}"
        )
        for rule in RULES:
            r = measure_rule(model, prompt, args, rule, counter, prefill)
            name = ",".join(f"{k}={v}" for k, v in rule.items()).replace("exit_threshold", "q")
            rates = "".join(
                f"  {r[f'all_steps_{c}']:>8.1f}{r[f'early_{c}']:>8.1f}{r[f'speed_up_{c}']:>11.2f}x"
                for c in ("wall", "cpu")
            )
            same = str(r["same_tokens"])
            print(
                f"{name:<18}{r['steps_per_forward']:>10.2f}{r['token_depth']:>7.2f}{rates}{same:>13}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
