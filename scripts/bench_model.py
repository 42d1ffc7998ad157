"""Benchmark one Stage I training step of a CPU-sized LoopLM: speed and peak memory.

Two reports, each configuration measured in a fresh subprocess:

1. The model's fused path (``model(ids, labels=..., objective=...)``: chunked LM-head
   cross-entropy, no [T, B, S, V] logits) against a naive implementation of the same math
   (all T full logits, ``F.cross_entropy``, the exit pdf written from OURO.md), on the same
   weights and tokens. Targets: fused tokens/s >= naive, fused peak memory <= naive / 2.
2. The fused step for T = 1, 2, 4, 8 with activation checkpointing off and on. With it on,
   what grows with T should be only the saved layer inputs, B x S x H per (step, layer),
   plus one B x S x H per step: the hidden-state gradient the fused head computes in its
   forward pass (no per-step logits, no attention intermediates).

Peak memory is the resident set size (VmHWM, reset through /proc/self/clear_refs) beyond
the RSS just before the measured steps, i.e. beyond parameters, gradients and AdamW state
(allocated by a warm-up step). ``MALLOC_MMAP_THRESHOLD_`` makes glibc mmap large tensors so
that freeing them returns the memory and RSS tracks live tensors. A measured step is
forward + backward; the optimizer step runs only in the warm-up.

With ``--compile``, one report instead: the layers compiled (``model.compile``) against
eager, on the small preset and on the tiny experiment's shape; compiled peak memory must not
exceed eager's, and the first step's loss must agree within 1e-5 relative. The first step,
which compiles, is reported apart and not timed.

Usage (from the repository root; Linux only, for /proc):
    python scripts/bench_model.py            # spec sizes: small preset, batch 1, seq 1024
    python scripts/bench_model.py --quick    # seq 256
    python scripts/bench_model.py --compile [--checkpointing]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
SPEED_TARGET = 1.0  # fused tokens/s over naive tokens/s, at least
MEMORY_TARGET = 2.0  # naive peak over fused peak, at least
RSS_TOLERANCE = 0.02  # measurement slack on the per-step growth of peak RSS


# ---- worker: one configuration in its own process ---------------------------------------


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def naive_stage1_loss(model, input_ids, labels, beta: float):
    """sum_t p(t) CE_t - beta H(p), averaged over target tokens, from all T full logits."""
    import torch
    import torch.nn.functional as F

    steps = model.config.total_ut_steps
    positions = torch.arange(input_ids.shape[1]).expand_as(input_ids)
    body = model.model(input_ids, positions, steps)
    logits_TBSV = model.lm_head(torch.stack(body.step_hidden))
    # p(t) = lambda_t prod_{j<t} (1 - lambda_j) for t < T; p(T) = prod_{j<T} (1 - lambda_j).
    lam_BST = torch.sigmoid(body.gate_logits)
    survive_BST = torch.cumprod(torch.cat((torch.ones_like(lam_BST[..., :1]), 1 - lam_BST), -1), -1)
    p_BST = torch.cat((lam_BST[..., :-1] * survive_BST[..., :-2], survive_BST[..., -2:-1]), -1)
    targets = labels.expand(steps, *labels.shape).reshape(-1)
    ce_TBS = F.cross_entropy(
        logits_TBSV.flatten(0, 2), targets, reduction="none", ignore_index=-100
    ).view(steps, *labels.shape)
    expected_BS = (p_BST.permute(2, 0, 1) * ce_TBS).sum(0)
    entropy_BS = -torch.special.xlogy(p_BST, p_BST).sum(-1)
    mask = labels != -100
    return (expected_BS - beta * entropy_BS)[mask].sum() / mask.sum()


def run_worker(spec: dict) -> dict:
    """Warm up each of spec["impls"] (recording loss and gradients), allocate AdamW state, then
    time ``timed_steps`` rounds of forward + backward, the impls alternating within a round so
    that they share the machine's load. The peak covers all rounds: one impl per process for
    memory numbers."""
    import torch

    sys.path.insert(0, str(REPO_ROOT))
    from looplm import LoopLMConfig, LoopLMForCausalLM, Objective

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    config = LoopLMConfig.from_preset(spec["preset"], total_ut_steps=spec["steps"])
    model = LoopLMForCausalLM(config)
    model.set_gradient_checkpointing(spec["checkpointing"])
    if spec.get("compile"):
        model.compile_layers()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    generator = torch.Generator().manual_seed(spec["seed"] + 1)
    input_ids = torch.randint(
        0, config.vocab_size, (spec["batch"], spec["seq"]), generator=generator
    )
    labels = input_ids.roll(-1, dims=1)
    labels[:, -1] = -100
    objective = Objective(beta=spec["beta"], chunk_tokens=spec["chunk_tokens"])

    def step(impl: str) -> float:
        if impl == "naive":
            loss = naive_stage1_loss(model, input_ids, labels, spec["beta"])
        else:
            loss = model(input_ids, labels=labels, objective=objective).loss
        loss.backward()
        return loss.item()

    results, grads = {}, {}
    for impl in spec["impls"]:
        start = time.perf_counter()
        loss = step(impl)  # compiles the layers when spec["compile"]
        first_step_s = time.perf_counter() - start
        grads[impl] = torch.cat([p.grad.flatten() for p in model.parameters()])
        results[impl] = {
            "loss": loss,
            "grad_norm": grads[impl].norm().item(),
            "first_step_s": first_step_s,
            "wall": [],
            "cpu": [],
        }
        optimizer.zero_grad(set_to_none=False)
    grad_diff = (grads[spec["impls"][0]] - grads[spec["impls"][-1]]).abs().max().item()
    del grads
    optimizer.step()  # allocates the AdamW state
    optimizer.zero_grad(set_to_none=False)  # gradient buffers stay: they are not step memory
    gc.collect()

    rss_before_kib = _proc_status_kib("VmRSS")
    _reset_peak_rss()
    for _ in range(spec["timed_steps"]):
        for impl in spec["impls"]:
            wall, cpu = time.perf_counter(), time.process_time()
            step(impl)
            results[impl]["wall"].append(time.perf_counter() - wall)
            results[impl]["cpu"].append(time.process_time() - cpu)
    peak_kib = _proc_status_kib("VmHWM")
    state_bytes = sum(
        t.numel() * t.element_size()
        for s in optimizer.state.values()
        for t in s.values()
        if torch.is_tensor(t)
    )
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    for r in results.values():
        r["median_s"] = statistics.median(r["wall"])
        r["median_cpu_s"] = statistics.median(r["cpu"])
    return {
        **spec,
        "results": results,
        "grad_max_abs_diff": grad_diff,
        "peak_beyond_mib": (peak_kib - rss_before_kib) * 1024 / MIB,
        "params_grads_optim_mib": (2 * param_bytes + state_bytes) / MIB,
        "hidden": config.hidden_size,
        "layers": config.num_hidden_layers,
        "vocab": config.vocab_size,
    }


# ---- driver -----------------------------------------------------------------------------


def measure(args, **overrides) -> dict:
    """Runs one configuration in a fresh worker process and returns its JSON result."""
    spec = {
        "impls": ["fused"],
        "steps": args.steps,
        "checkpointing": False,
        "preset": args.preset,
        "batch": args.batch,
        "seq": args.seq,
        "beta": args.beta,
        "threads": args.threads,
        "timed_steps": args.timed_steps,
        "chunk_tokens": args.chunk_tokens,
        "seed": 0,
        **overrides,
    }
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    label = (
        f"{'+'.join(spec['impls'])} {spec['preset']} T={spec['steps']} "
        f"ckpt={'on' if spec['checkpointing'] else 'off'}"
        + (" compiled" if spec.get("compile") else "")
    )
    print(f"  measuring {label} ...", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"worker for {label} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def tokens_per_s(result: dict, seconds: float) -> float:
    return result["batch"] * result["seq"] / seconds


def compare(args, checkpointing: bool) -> bool:
    """Fused vs naive: peak memory from one process each, speed from one process alternating."""
    peak = {
        impl: measure(args, impls=[impl], checkpointing=checkpointing, timed_steps=1)[
            "peak_beyond_mib"
        ]
        for impl in ("naive", "fused")
    }
    timing = measure(args, impls=["naive", "fused"], checkpointing=checkpointing)
    naive, fused = timing["results"]["naive"], timing["results"]["fused"]
    logits_mib = args.steps * args.batch * args.seq * timing["vocab"] * 4 / MIB
    print(
        f"\n== Stage I step, fused vs naive: checkpointing {'on' if checkpointing else 'off'}, "
        f"T={args.steps}, B={args.batch}, S={args.seq}, beta={args.beta} "
        f"(all-T fp32 logits = {logits_mib:.0f} MiB) =="
    )
    print(
        f"{'impl':<6} {'step s':>8} {'cpu s':>8} {'tokens/s':>10} {'peak MiB':>10} "
        f"{'loss':>12} {'grad norm':>12}"
    )
    for name, r in (("naive", naive), ("fused", fused)):
        print(
            f"{name:<6} {r['median_s']:>8.2f} {r['median_cpu_s']:>8.2f} "
            f"{tokens_per_s(timing, r['median_s']):>10.1f} {peak[name]:>10.1f} "
            f"{r['loss']:>12.6f} {r['grad_norm']:>12.6f}"
        )
    loss_diff = abs(fused["loss"] - naive["loss"])
    grad_diff = timing["grad_max_abs_diff"]
    same_math = loss_diff < 1e-4 and grad_diff < 1e-5
    speed = naive["median_s"] / fused["median_s"]
    cpu_speed = naive["median_cpu_s"] / fused["median_cpu_s"]
    memory = peak["naive"] / max(peak["fused"], 1e-9)
    print(
        f"|loss fused - naive| = {loss_diff:.2e}, max |grad fused - naive| = {grad_diff:.2e}  "
        f"{verdict(same_math)} (same math)"
    )
    print(
        f"tokens/s fused/naive = {speed:.2f} (cpu-time ratio {cpu_speed:.2f})  "
        f"(target >= {SPEED_TARGET:.2f})  {verdict(speed >= SPEED_TARGET)}"
    )
    print(
        f"peak mem naive/fused = {memory:.2f}  (target >= {MEMORY_TARGET:.2f})  "
        f"{verdict(memory >= MEMORY_TARGET)}"
    )
    print(
        f"(params + grads + AdamW state, not counted: {timing['params_grads_optim_mib']:.0f} MiB)"
    )
    return same_math and speed >= SPEED_TARGET and memory >= MEMORY_TARGET


def sweep(args) -> bool:
    """The fused step for each T, checkpointing off and on; checks the growth with T."""
    results = {
        (t, ckpt): measure(args, steps=t, checkpointing=ckpt)
        for ckpt in (False, True)
        for t in args.sweep_steps
    }
    sample = next(iter(results.values()))
    per_step_mib = args.batch * args.seq * sample["hidden"] * 4 * sample["layers"] / MIB
    print(
        f"\n== Fused step vs T: B={args.batch}, S={args.seq}, H={sample['hidden']}, "
        f"L={sample['layers']}; saved layer inputs B*S*H*4 bytes*T*L = {per_step_mib:.1f} MiB "
        "per step =="
    )
    print(
        f"{'T':>3} {'ckpt':>5} {'step s':>8} {'cpu s':>8} {'tokens/s':>10} {'peak MiB':>10} "
        f"{'growth vs T1':>13} {'layer inputs':>13} {'inputs vs T1':>13}"
    )
    first, last = args.sweep_steps[0], args.sweep_steps[-1]
    for ckpt in (False, True):
        base = results[(first, ckpt)]["peak_beyond_mib"]
        for t in args.sweep_steps:
            r = results[(t, ckpt)]
            fused = r["results"]["fused"]
            print(
                f"{t:>3} {'on' if ckpt else 'off':>5} {fused['median_s']:>8.2f} "
                f"{fused['median_cpu_s']:>8.2f} {tokens_per_s(r, fused['median_s']):>10.1f} "
                f"{r['peak_beyond_mib']:>10.1f} {r['peak_beyond_mib'] - base:>13.1f} "
                f"{per_step_mib * t:>13.1f} {per_step_mib * (t - first):>13.1f}"
            )
    ok = True
    for ckpt in (False, True):
        growth = (
            results[(last, ckpt)]["peak_beyond_mib"] - results[(first, ckpt)]["peak_beyond_mib"]
        )
        per_step = growth / max(last - first, 1)
        line = (
            f"checkpointing {'on ' if ckpt else 'off'}: peak grows {per_step:.1f} MiB per step "
            f"(T={first}->{last}) = {per_step / per_step_mib:.2f} x the saved layer inputs"
        )
        if ckpt:
            # Besides the L layer inputs, one B x S x H per step may grow: the gradient of the
            # step's hidden state, which the fused head computes in its forward pass. RSS is
            # read in pages and the allocator keeps a little slack: 2% measurement tolerance.
            allowed = (sample["layers"] + 1) / sample["layers"]
            ok = per_step <= allowed * per_step_mib * (1 + RSS_TOLERANCE)
            line += f"  (target <= {allowed:.2f} x, +{RSS_TOLERANCE:.0%})  {verdict(ok)}"
        print(line)
    return ok


COMPILE_SHAPES = {
    "small preset": {},
    "tiny experiment": {"preset": "tiny", "batch": 4, "seq": 256, "steps": 4},
}
"""The shapes of the compile report: the small preset at the script's batch and length, and
the README's tiny experiment (its model, micro-batch and sequence length)."""


def compiled_vs_eager(args) -> bool:
    """Eager and compiled layers, each in its own process: speed, peak memory, and the loss
    and gradient norm of the same first step."""
    print(
        "\n== Compiled decoder layers (torch.compile, dynamic shapes) vs eager, "
        f"checkpointing {'on' if args.checkpointing else 'off'} =="
    )
    print(
        f"{'shape':<16} {'layers':<9} {'first s':>8} {'step s':>8} {'tokens/s':>10} "
        f"{'peak MiB':>10} {'loss':>12} {'grad norm':>12}"
    )
    ok = True
    for name, shape in COMPILE_SHAPES.items():
        runs = {
            mode: measure(
                args, checkpointing=args.checkpointing, compile=mode == "compiled", **shape
            )
            for mode in ("eager", "compiled")
        }
        for mode, r in runs.items():
            fused = r["results"]["fused"]
            print(
                f"{name:<16} {mode:<9} {fused['first_step_s']:>8.1f} {fused['median_s']:>8.3f} "
                f"{tokens_per_s(r, fused['median_s']):>10.1f} {r['peak_beyond_mib']:>10.1f} "
                f"{fused['loss']:>12.6f} {fused['grad_norm']:>12.6f}"
            )
        eager, compiled = (runs[m]["results"]["fused"] for m in ("eager", "compiled"))
        speed = eager["median_s"] / compiled["median_s"]
        memory = runs["compiled"]["peak_beyond_mib"] / max(runs["eager"]["peak_beyond_mib"], 1e-9)
        same = abs(compiled["loss"] - eager["loss"]) <= 1e-5 * abs(eager["loss"])
        fits = memory <= 1 + RSS_TOLERANCE
        print(
            f"{name}: tokens/s compiled/eager = {speed:.2f}; peak memory compiled/eager = "
            f"{memory:.2f} (target <= 1, +{RSS_TOLERANCE:.0%}) {verdict(fits)}; "
            f"loss within 1e-5 relative {verdict(same)}"
        )
        ok &= fits and same
    return ok


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="seq 256")
    parser.add_argument("--preset", default="small", help="LoopLMConfig preset (default: small)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument(
        "--seq", type=int, default=None, help="sequence length (default 1024, quick 256)"
    )
    parser.add_argument("--steps", type=int, default=4, help="T of the fused-vs-naive comparison")
    parser.add_argument("--sweep-steps", default="1,2,4,8", help="comma-separated T values")
    parser.add_argument("--timed-steps", type=int, default=None, help="measured steps (default 2)")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--chunk-tokens", type=int, default=None, help="fused LM-head chunk (default: the model's)"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="only the compiled-vs-eager report (small preset and tiny experiment)",
    )
    parser.add_argument(
        "--checkpointing", action="store_true", help="activation checkpointing in --compile"
    )
    parser.add_argument("--skip-compare", action="store_true")
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.seq = args.seq or (256 if args.quick else 1024)
    args.timed_steps = args.timed_steps or 2
    args.sweep_steps = sorted(int(t) for t in args.sweep_steps.split(","))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return 0
    print(
        f"bench_model: preset {args.preset}, batch {args.batch}, seq {args.seq}, "
        f"{args.threads} threads, median of {args.timed_steps} steps (forward + backward), "
        "peak RSS beyond params/grads/AdamW state"
    )
    start = time.perf_counter()
    ok = True
    if args.compile:
        ok &= compiled_vs_eager(args)
        print(f"\noverall: {verdict(ok)}  ({time.perf_counter() - start:.0f} s)")
        return 0 if ok else 1
    if not args.skip_compare:
        for checkpointing in (False, True):
            ok &= compare(args, checkpointing)
    if not args.skip_sweep:
        ok &= sweep(args)
    print(f"\noverall: {verdict(ok)}  ({time.perf_counter() - start:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
