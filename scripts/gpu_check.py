"""One prepared validation of the GPU path: at most 9.5 minutes on one H100 or H200.

    bash scripts/gpu_check.sh [--out gpu_check.json] [--wheels DIR]   # on the GPU machine
    bash scripts/gpu_check.sh --dry-run                                # anywhere, in minutes

Five checks. Each one's figures go into one JSON report and a printed summary; a check that
fails or runs out of its time is reported as such and the next one still runs.

1. tests: ``pytest tests/gpu`` (bf16, SDPA, flash-attn, the Liger kernels and the compiled
   layers on CUDA).
2. job: ``train.pretrain`` for 50 steps on one GPU in bf16 under ZeRO-2 (the small preset at
   sequence 2048, packed documents), with flash-attn, with SDPA, and with SDPA and
   ``model.compile=true``: tokens/s, MFU, first and last loss; the compiled job's graph count
   after its first step (at most one more: the other attention kind) and its loss against the
   eager SDPA job's.
3. mfu: the training step (forward, backward, AdamW) of an Ouro-1.4B-shaped model at sequence
   4096, T=4, in bf16: eager and compiled layers, activation checkpointing off (micro-batch 1)
   and on (the largest micro-batch the memory estimator lets fit, at most 8), and, where they
   can run, eager layers with the Liger kernels: tokens/s, MFU counting the loops (against the
   50% target, reported, not a failure), peak memory (``torch.cuda.max_memory_allocated``).
4. memory: each step-3 activation peak against what ``train.memory.estimate`` predicts for it.
5. reproduce: ``scripts/reproduce.py`` trains the full grid's deepest looped model (2 layers
   looped 6 times, hidden 256, 8,192 tokens a step, one rank per GPU) for 60 steps: its
   tokens/s, and the hours that puts on one model of depth 12 and, at that rate, on the grid's
   40 (an estimate: 28 of them have depth 12, of which the 12-layer ones have 6 times the
   parameters, and 12 are shallower).

``--dry-run`` runs the same code on the CPU at toy sizes (the tiny preset, sequence 128, a few
steps, float32), so that the check cannot have rotted by the time a GPU is lent; its figures
mean nothing. ``--wheels DIR`` installs the wheels in DIR first (``pip install --no-index``),
for a GPU machine without a package index: ``bash scripts/offline_wheels.sh DIR`` makes them
on a machine with one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUDGET_S = {"tests": 40, "job": 70, "compiled_job": 100, "mfu": 200, "reproduce": 90}
"""Each check's time limit ("job" for the flash-attn and the SDPA job each): 570 s in all."""
MFU_TARGET = 0.5


def log(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(command: list[str], timeout: float, env: dict | None = None) -> tuple[int, str]:
    """A command's exit code and output (stdout and stderr); 124 when it ran out of time. The
    command runs in a process group of its own, ended whole at the timeout: torchrun's ranks
    would otherwise outlive it and hold the GPU and the port."""
    process = subprocess.Popen(
        command,
        cwd=REPO,
        env=env or os.environ.copy(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = process.communicate(timeout=timeout)
        return process.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            out, _ = process.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            out, _ = process.communicate()
        return 124, (out or "") + f"\n(timed out after {timeout:.0f} s)"


# ---- 1. tests/gpu ------------------------------------------------------------------------


def check_tests(dry_run: bool) -> dict:
    code, out = run([sys.executable, "-m", "pytest", "-q", "tests/gpu"], BUDGET_S["tests"])
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", out)}
    ok = code == 0 or (dry_run and code == 5)  # 5: every test skipped or none collected
    return {"ok": ok and not counts.get("failed"), "exit_code": code, **counts, "tail": out[-1500:]}


# ---- 2. the training job -----------------------------------------------------------------


def job_overrides(attention: str, run_dir: str, dry_run: bool, compiled: bool = False) -> list[str]:
    if dry_run:
        shape = ["model=tiny", "data.seq_len=128", "train.micro_batch_size=2",
                 "train.global_batch_tokens=256", "train.max_steps=3",
                 "deepspeed.precision=fp32"]  # fmt: skip
    else:
        shape = ["model=small", "data.seq_len=2048", "train.micro_batch_size=8",
                 "train.global_batch_tokens=16384", "train.max_steps=50",
                 "deepspeed.precision=bf16"]  # fmt: skip
    return [*shape, "data=embedded", "deepspeed=zero2", f"model.attn_implementation={attention}",
            f"run_dir={run_dir}", "eval.enabled=false", "logging.wandb=false",
            "logging.plot_at_end=false", "checkpoint.every_steps=100000",
            "schedule.warmup_steps=5", "train.log_every=10",
            f"model.compile={str(compiled).lower()}"]  # fmt: skip


def check_job(attention: str, dry_run: bool, compiled: bool = False) -> dict:
    if attention == "flash" and not _flash():
        return {"ok": None, "skipped": "flash-attn is not installed or there is no CUDA"}
    with tempfile.TemporaryDirectory() as run_dir:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1",
                   "--master_port=29741", "-m", "train.pretrain",
                   *job_overrides(attention, run_dir, dry_run, compiled)]  # fmt: skip
        start = time.time()
        budget = BUDGET_S["compiled_job" if compiled else "job"]
        code, out = run(command, budget, dict(os.environ, WANDB_MODE="disabled"))
        metrics = Path(run_dir) / "metrics.jsonl"
        records = (
            [json.loads(line) for line in metrics.read_text().splitlines()]
            if metrics.is_file()
            else []
        )
    result = {"exit_code": code, "seconds": round(time.time() - start, 1), "steps": len(records)}
    if code != 0 or not records:
        return {**result, "ok": False, "tail": out[-2000:]}
    later = records[len(records) // 5 :]  # the first fifth warms up (and compiles)
    mfu = [r["mfu"] for r in later if r.get("mfu") is not None]
    return {
        **result,
        # Finite losses; over 50 steps they must also fall (3 dry-run steps need not).
        "ok": all(math.isfinite(r["loss"]) for r in records)
        and (dry_run or records[-1]["loss"] < records[0]["loss"]),
        "first_loss": records[0]["loss"],
        "last_loss": records[-1]["loss"],
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in later),
        "mfu": statistics.median(mfu) if mfu else None,
        "losses": [r["loss"] for r in records],
        **({"compiled_graphs": [r["compiled_graphs"] for r in records]} if compiled else {}),
    }


def compare_compiled(compiled: dict, eager: dict) -> dict:
    """The compiled job against the eager one: at most one graph compiled after the first step
    (the attention kind that step did not meet), and the mean loss of the last ten steps within
    2% (bf16: Inductor rounds its fused intermediates differently)."""
    if "losses" not in compiled or "losses" not in eager:
        return compiled
    graphs = compiled["compiled_graphs"]
    late = statistics.mean(compiled["losses"][-10:])
    reference = statistics.mean(eager["losses"][-10:])
    compiled["recompiles_after_step_1"] = graphs[-1] - graphs[0]
    compiled["loss_vs_eager"] = (late - reference) / reference
    compiled["ok"] = (
        compiled["ok"]
        and compiled["recompiles_after_step_1"] <= 1
        and abs(compiled["loss_vs_eager"]) <= 0.02
    )
    return compiled


# ---- 3 and 4. MFU and memory, in a worker process ----------------------------------------


def mfu_variants(largest: int, liger: bool) -> list[dict]:
    """Eager and compiled, checkpointing off and on; then, where the Liger kernels can run,
    eager layers with them at checkpointing on (what they add over plain eager; compiled
    layers fuse the same operations themselves)."""
    variants = [
        {"compile": compiled, "checkpointing": ckpt, "micro_batch": largest if ckpt else 1}
        for ckpt in (False, True)
        for compiled in (False, True)
    ]
    if liger:
        variants.append({**variants[2], "kernels": "liger"})
    return variants


def mfu_worker(dry_run: bool) -> dict:
    """Runs in its own process: every variant of check 3 on one model, and check 4's figures."""
    import dataclasses

    import torch

    sys.path.insert(0, str(REPO))
    from looplm import LoopLMConfig, LoopLMForCausalLM, Objective
    from looplm.kernels import kernels_problem
    from train.memory import Setup, estimate, max_micro_batch
    from train.metrics import device_peak_flops, training_flops_per_token

    cuda = torch.cuda.is_available() and not dry_run
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    preset, seq, steps = ("ouro-1.4b", 4096, 4) if not dry_run else ("tiny", 128, 4)
    config = LoopLMConfig.from_preset(preset, total_ut_steps=steps)
    attention = "flash" if cuda and _flash() else "sdpa"
    gpu_gib = torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else 80.0
    setup = Setup(config, seq, precision="bf16" if cuda else "fp32", attention=attention,
                  packed=False, gpu_memory_gib=gpu_gib)  # fmt: skip
    largest = min(max_micro_batch(setup), 8) if cuda else 2
    torch.manual_seed(0)
    with torch.device(device):  # built where it runs: 1.4B parameters initialize in seconds
        model = LoopLMForCausalLM(config, attn_implementation=attention)
    model = model.to(dtype).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    peak_flops = device_peak_flops() if cuda else None
    flops_per_token = training_flops_per_token(config, seq, steps)
    timed, warmup = (5, 2) if cuda else (2, 1)
    results = []
    for variant in mfu_variants(largest, liger=cuda and kernels_problem("liger") is None):
        model.model.compiled_layers = None
        model.set_kernels(variant.get("kernels", "torch"))
        if variant["compile"]:
            model.compile_layers()
        model.set_gradient_checkpointing(variant["checkpointing"])
        batch = variant["micro_batch"]
        ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)

        def step(ids=ids) -> float:
            loss = model(ids, labels=ids.roll(-1, 1), objective=Objective(beta=0.05)).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)
            return loss.item()

        record = dict(variant)
        try:
            start = time.perf_counter()
            for _ in range(warmup):
                step()
            record["warmup_s"] = round(time.perf_counter() - start, 1)
            if cuda:
                torch.cuda.synchronize()
                resting = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            times = []
            for _ in range(timed):
                start = time.perf_counter()
                record["loss"] = step()  # .item() synchronizes
                times.append(time.perf_counter() - start)
            rate = batch * seq / statistics.median(times)
            record["tokens_per_s"] = rate
            record["mfu"] = rate * flops_per_token / peak_flops if peak_flops else None
            predicted = estimate(
                dataclasses.replace(setup, micro_batch_size=batch,
                                    gradient_checkpointing=variant["checkpointing"])
            ).activations  # fmt: skip
            record["estimated_activations_gib"] = predicted / 2**30
            if cuda:
                measured = torch.cuda.max_memory_allocated() - resting
                record["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
                record["activations_gib"] = measured / 2**30
                record["estimate_error"] = (predicted - measured) / measured
        except Exception as e:  # noqa: BLE001 - one variant's failure must not lose the others
            first_line = (str(e).splitlines() or [""])[0]
            record["error"] = f"{type(e).__name__}: {first_line}"[:500]
            optimizer.zero_grad(set_to_none=False)
            if cuda:
                torch.cuda.empty_cache()
        results.append(record)
        print(VARIANT_PREFIX + json.dumps(record), flush=True)
    return {"preset": preset, "seq_len": seq, "steps": steps, "attention": attention,
            "device": device, "variants": results}  # fmt: skip


def _flash() -> bool:
    from looplm.attention import flash_attn_available

    return flash_attn_available()


VARIANT_PREFIX = "mfu variant: "


def check_mfu(dry_run: bool) -> dict:
    """Runs the worker; keeps every variant it finished, also when it died or timed out."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker"]
    if dry_run:
        command.append("--dry-run")
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    code, out = run(command, BUDGET_S["mfu"], dict(os.environ, PYTHONPATH=path))
    lines = out.splitlines()
    finished = [json.loads(x[len(VARIANT_PREFIX) :]) for x in lines if x.startswith(VARIANT_PREFIX)]
    results = [json.loads(x) for x in lines if x.startswith("{")]
    result = results[-1] if results else {"variants": finished}
    ran = [v for v in result["variants"] if "error" not in v]
    result["ok"] = code == 0 and bool(results) and len(ran) == len(result["variants"])
    best = max((v["mfu"] for v in ran if v.get("mfu") is not None), default=None)
    result["best_mfu"] = best
    result["mfu_target_met"] = None if best is None else best >= MFU_TARGET
    if not result["ok"]:
        result.update(exit_code=code, tail=out[-2000:])
    return result


# ---- 5. the reproduction's full grid, per step ----------------------------------------------


def check_reproduce(dry_run: bool) -> dict:
    """The full grid's deepest looped model, trained by the reproduction driver on a smaller
    source of the same questions (made in seconds; the steps are the grid's shape)."""
    import reproduce  # beside this script, whose directory Python puts first on the path

    full = reproduce.FULL
    uri = full.tasks["mano"].replace("num_docs=400000&shards=8", "num_docs=20000&shards=1")
    assert uri != full.tasks["mano"], "the full grid's Mano source changed: resize it here"
    steps = 3 if dry_run else 60
    toy = ["--set", "hidden_size=32", "--set", "heads=2", "--set", "batch_tokens=1024",
           "--set", "seq_len=128", "--set", "eval_items=8"] if dry_run else []  # fmt: skip
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "scripts/reproduce.py", "--task", "mano", "--families",
                   "looped", "--seeds", "0", "--steps", str(steps), "--set", "blocks=2",
                   "--source", f"mano={uri}", *toy, "--out", out]  # fmt: skip
        start = time.time()
        code, output = run(command, BUDGET_S["reproduce"])
        runs = list(Path(out, "runs").glob("*/metrics.jsonl"))
        records = [json.loads(line) for line in runs[0].read_text().splitlines()] if runs else []
        ranks = re.search(r"; (\d+) ranks a job", output)
    result = {"exit_code": code, "seconds": round(time.time() - start, 1), "steps": len(records)}
    if code != 0 or len(records) != steps or ranks is None:
        return {**result, "ok": False, "tail": output[-2000:]}
    later = records[len(records) // 5 :]
    tokens_per_s = statistics.median(r["tokens_per_s"] for r in later)
    model_hours = full.steps * full.batch_tokens / tokens_per_s / 3600
    return {
        **result,
        "ok": all(math.isfinite(r["loss"]) for r in records),
        "ranks": int(ranks.group(1)),
        "tokens_per_s": tokens_per_s,
        "hours_per_depth12_model": model_hours,
        "grid_hours_estimate": len(reproduce.grid(full, list(full.tasks))) * model_hours,
    }


# ---- report ------------------------------------------------------------------------------


CHECKS = ("tests", "job_flash", "job_sdpa", "job_compiled", "mfu", "reproduce")


def summary(report: dict) -> list[str]:
    mode = "dry run" if report["dry_run"] else "full"
    lines = [f"gpu_check on {report['device']} ({mode}), {report['seconds']:.0f} s"]
    t = report["tests"]
    lines.append(
        f"tests/gpu: {t.get('passed', 0)} passed, {t.get('failed', 0)} failed, "
        f"{t.get('skipped', 0)} skipped"
    )
    for name in ("job_flash", "job_sdpa", "job_compiled"):
        j = report[name]
        if j.get("skipped"):
            lines.append(f"{name}: skipped: {j['skipped']}")
        elif "tokens_per_s" in j:
            mfu = f"{j['mfu']:.1%}" if j.get("mfu") is not None else "n/a"
            line = (
                f"{name}: {j['steps']} steps, loss {j['first_loss']:.3f} -> "
                f"{j['last_loss']:.3f}, {j['tokens_per_s']:,.0f} tokens/s, MFU {mfu}"
            )
            if "loss_vs_eager" in j:
                line += (
                    f", {j['recompiles_after_step_1']} graphs after step 1, last-10 loss "
                    f"{j['loss_vs_eager']:+.2%} vs eager"
                )
            lines.append(line)
        else:
            lines.append(f"{name}: FAILED (exit {j.get('exit_code')})")
    m = report["mfu"]
    for v in m.get("variants", []):
        ckpt = "on " if v["checkpointing"] else "off"
        name = f"{'compiled' if v['compile'] else 'eager':<8} checkpointing {ckpt}"
        name += f" micro-batch {v['micro_batch']}"
        name += f" kernels {v['kernels']}" if "kernels" in v else ""
        if "error" in v:
            lines.append(f"mfu {name}: {v['error']}")
            continue
        mfu = f"{v['mfu']:.1%}" if v.get("mfu") is not None else "n/a"
        memory = ""
        if "peak_gib" in v:
            memory = (
                f", peak {v['peak_gib']:.1f} GiB, activations {v['activations_gib']:.1f} GiB vs "
                f"estimate {v['estimated_activations_gib']:.1f} ({v['estimate_error']:+.0%})"
            )
        lines.append(f"mfu {name}: {v['tokens_per_s']:,.0f} tokens/s, MFU {mfu}{memory}")
    if m.get("mfu_target_met") is not None:
        met = "met" if m["mfu_target_met"] else "not met"
        lines.append(f"best MFU {m['best_mfu']:.1%}: the {MFU_TARGET:.0%} target is {met}")
    r = report["reproduce"]
    if "tokens_per_s" in r:
        lines.append(
            f"reproduce, the full grid's looped 2 x 6 on {r['ranks']} rank(s): "
            f"{r['tokens_per_s']:,.0f} tokens/s, {r['hours_per_depth12_model']:.2f} h a model "
            f"of depth 12, the grid's 40 about {r['grid_hours_estimate']:.1f} h"
        )
    else:
        lines.append(f"reproduce: FAILED (exit {r.get('exit_code')})")
    verdicts = {k: report[k].get("ok") for k in CHECKS}
    lines.append(
        "verdicts: "
        + ", ".join(
            f"{k} {'-' if v is None else 'PASS' if v else 'FAIL'}" for k, v in verdicts.items()
        )
    )
    return lines


def install_wheels(directory: Path) -> None:
    """Installs the wheels in ``directory`` (scripts/offline_wheels.sh makes them) into a
    folder of their own, first on the path of this process and of every check it starts."""
    wheels = sorted(str(p) for p in directory.glob("*.whl"))
    if not wheels:
        sys.exit(f"--wheels: no .whl files in {directory}")
    target = Path(tempfile.gettempdir()) / "looplm_wheels"
    log(f"installing {len(wheels)} wheels from {directory} into {target} ...")
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
               "--upgrade", "--target", str(target), *wheels]  # fmt: skip
    subprocess.run(command, check=True)
    sys.path.insert(0, str(target))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(target), os.environ.get("PYTHONPATH")) if p
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, toy sizes: the plumbing only")
    parser.add_argument("--out", type=Path, default=REPO / "gpu_check.json")
    parser.add_argument("--wheels", type=Path, help="install these wheels first (no index)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(mfu_worker(args.dry_run)))
        return 0
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device here: run with --dry-run to check the plumbing on a CPU")
    if args.wheels:
        install_wheels(args.wheels)
    start = time.time()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    report = {"device": device, "dry_run": args.dry_run, "torch": torch.__version__}
    log("1/5 tests/gpu ...")
    report["tests"] = check_tests(args.dry_run)
    for attention in ("flash", "sdpa"):
        log(f"2/5 the training job with {attention} attention ...")
        report[f"job_{attention}"] = check_job(attention, args.dry_run)
    log("2/5 the training job with sdpa attention and compiled layers ...")
    compiled = check_job("sdpa", args.dry_run, compiled=True)
    report["job_compiled"] = compare_compiled(compiled, report["job_sdpa"])
    log("3-4/5 MFU and memory of the Ouro-1.4B shape, eager and compiled ...")
    report["mfu"] = check_mfu(args.dry_run)
    log("5/5 the reproduction's full grid: its deepest looped model for a few steps ...")
    report["reproduce"] = check_reproduce(args.dry_run)
    report["seconds"] = time.time() - start
    lines = summary(report)
    report["summary"] = lines
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print("\n".join(["-" * 72, *lines, f"report: {args.out}", "-" * 72]))
    failed = [k for k in CHECKS if report[k].get("ok") is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
