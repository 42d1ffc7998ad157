"""The golden-loss regression: the first 10 steps of the README's tiny experiment on CPU in
float32, on 1 and on 2 ranks, whose per-step losses a refactor of the training side must
leave unchanged.

    python -m tests.distributed.golden --write   # records tests/assets/golden_losses.json

Precision is float32 on every machine: ``auto`` would take bf16 where the CPU computes it
natively, as on the recording's machine, and float32 elsewhere.

The 10 steps fall inside the experiment's 30 warm-up steps, so the LR schedule is that of the
full 300-step run (the losses of a 10-step run are the first 10 of a 20-step one, bit for
bit). A machine with the recording's torch version, CPU model and CPU kernels
(`cpu_capability`) must reproduce the losses bit for bit. Another gets a relative tolerance of
5e-3: torch, oneDNN and MKL pick their kernels per instruction set, and the AVX2 kernels on the
recording's machine (ATEN_CPU_CAPABILITY=avx2, DNNL_MAX_CPU_ISA=AVX2,
MKL_ENABLE_INSTRUCTIONS=AVX2) moved the losses by up to 6.4e-4 relative over 20 steps.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import torch

from tests.distributed.launch import REPO, metrics, run

GOLDEN = REPO / "tests" / "assets" / "golden_losses.json"
SETTINGS = [
    "experiment=tiny_cpu",
    "deepspeed.precision=fp32",
    "train.max_steps=10",
    "train.deterministic=true",
    "eval.enabled=false",
    "logging.wandb=false",
    "logging.plot_at_end=false",
    "checkpoint.every_steps=1000",
]
RANKS = (1, 2)
TOLERANCE = 5e-3


def machine() -> dict:
    return {
        "torch": torch.__version__,
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def cpu_model() -> str:
    """The processor's model name (Linux), else what the platform reports."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def losses(ranks: int, root: Path, cache_dir: Path) -> dict[str, list]:
    """Per-step loss and loss per recurrent step of the golden run on ``ranks`` ranks."""
    run_dir = root / f"ranks_{ranks}"
    args = [*SETTINGS, f"run_dir={run_dir}", f"data.cache_dir={cache_dir}"]
    code, out = run("train.pretrain", args, root / f"ranks_{ranks}.log", nproc=ranks)
    assert code == 0, out[-3000:]
    records = metrics(run_dir)
    return {
        "loss": [r["loss"] for r in records],
        "loss_per_step": [r["loss_per_step"] for r in records],
    }


def differences(
    expected: dict, actual: dict, exact: bool, tolerance: float | None = None
) -> list[str]:
    """Where ``actual`` leaves the recorded losses (bit for bit, or within ``tolerance``
    relative, by default TOLERANCE)."""
    tolerance = TOLERANCE if tolerance is None else tolerance
    found = []
    if len(actual["loss"]) != len(expected["loss"]):
        return [f"{len(actual['loss'])} steps logged, {len(expected['loss'])} recorded"]

    def moved(a: float, e: float) -> bool:
        return a != e if exact else abs(a - e) > tolerance * abs(e)

    pairs = zip(expected["loss"], actual["loss"], strict=True)
    for step, (e, a) in enumerate(pairs, 1):
        if moved(a, e):
            found.append(f"step {step}: loss {a!r}, recorded {e!r}")
    pairs = zip(expected["loss_per_step"], actual["loss_per_step"], strict=True)
    for step, (e, a) in enumerate(pairs, 1):
        if len(a) != len(e) or any(moved(x, y) for x, y in zip(a, e, strict=True)):
            found.append(f"step {step}: loss per recurrent step {a}, recorded {e}")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"record {GOLDEN}")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        recorded = {str(r): losses(r, root, root / "cache") for r in RANKS}
    if args.write:
        GOLDEN.write_text(
            json.dumps({"settings": SETTINGS, **machine(), "ranks": recorded}, indent=1) + "\n"
        )
        print(f"wrote {GOLDEN}")
    else:
        print(json.dumps(recorded, indent=1))


if __name__ == "__main__":
    main()
