"""Per-step metrics: ``metrics.jsonl`` in the run directory, a console line, and wandb.

Only rank 0 writes. On resume, lines of steps after the resumed checkpoint (written before
the crash) are dropped, so the file always describes one consistent run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from collections import deque
from pathlib import Path

import torch
from rich.console import Console

from looplm import LoopLMConfig, Objective
from looplm.files import write_atomically

logger = logging.getLogger("looplm.metrics")

# Dense bf16 peak FLOP/s of common accelerators, for MFU.
_PEAK_BF16_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "GH200": 989e12,
    "B200": 2250e12,
}


def training_flops_per_token(config: LoopLMConfig, seq_len: int, num_steps: int) -> float:
    """Forward+backward FLOPs per token of a T-step LoopLM: T times the layer and head matmuls,
    T times causal attention (6 x matmul params, 12 x L x heads x head_dim x seq / 2)."""
    h, q = config.hidden_size, config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    layer = 2 * h * q + 2 * h * kv + 3 * h * config.intermediate_size
    matmul_params = num_steps * (config.num_hidden_layers * layer + config.vocab_size * h + h)
    attention = num_steps * config.num_hidden_layers * 6 * q * seq_len
    return 6.0 * matmul_params + attention


def step_flops_per_token(
    config: LoopLMConfig, seq_len: int, num_steps: int, objective: Objective
) -> float:
    """FLOPs a training step spends per token under ``objective``: forward and backward, except
    in Stage II, where the frozen LM runs forward only (a third; the gate's own work is
    negligible)."""
    flops = training_flops_per_token(config, seq_len, num_steps)
    return flops / 3 if objective.kind == "stage2" else flops


def device_peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in _PEAK_BF16_FLOPS.items() if k in name), None)


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process. Each kind of call (causal or packed
    attention, micro-batch 1 or more) compiles once; a count that keeps growing means
    recompiles, which cost seconds to minutes each."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def truncate_jsonl_after(path: Path, step: int) -> None:
    """Keeps the records of steps up to ``step`` (a resume drops those written after its
    checkpoint, which the resumed run writes again). A torn last line (a crash or a full disk
    in the middle of a write) is dropped with a warning; a damaged line before it is an error
    naming the file and line."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number < len(lines):
                raise ValueError(f"{path}, line {number}: not a JSON record ({e.msg})") from e
            logger.warning("%s: dropping its torn last line (%d characters)", path, len(line))
            continue
        if record["step"] <= step:
            kept.append(line)
    write_atomically(path, "".join(line + "\n" for line in kept))


ETA_WINDOW = 10
"""Progress lines whose pace the ETA extrapolates."""


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class MetricsLogger:
    """Writes one JSON object per optimizer step; rank 0 only."""

    def __init__(
        self, run_dir: str | Path, enabled: bool, resume_step: int, log_every: int, max_steps: int
    ):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled, self.log_every, self.max_steps = enabled, log_every, max_steps
        self.console = Console(stderr=True, soft_wrap=True)
        self.start, self.start_step = time.time(), resume_step
        self.window: list[dict] = []
        """The records since the last progress line, whose losses it averages."""
        self.pace: deque[tuple[float, int]] = deque(maxlen=ETA_WINDOW)
        """(time, step) of the last progress lines, whose pace the ETA extrapolates."""
        self.wandb = None
        self.widest = 0
        """The most recurrent steps a record had: wandb keys up to it are logged each step."""
        if enabled:
            self._truncate_after(resume_step)

    def _truncate_after(self, step: int) -> None:
        truncate_jsonl_after(self.path, step)

    def attach_wandb(self, run_dir: str | Path, project: str, mode: str, config: dict) -> None:
        """Starts (or resumes) the wandb run of this run directory."""
        if not self.enabled:
            return
        import wandb

        if mode == "auto":
            has_key = os.environ.get("WANDB_API_KEY") or (Path.home() / ".netrc").is_file()
            mode = "online" if has_key and os.environ.get("WANDB_MODE") != "offline" else "offline"
        id_file = Path(run_dir) / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        self.wandb = wandb.init(
            project=project, dir=str(run_dir), id=run_id, resume="allow", mode=mode, config=config
        )

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            flat = {k: v for k, v in record.items() if not isinstance(v, list)}
            self.widest = max(self.widest, len(record["loss_per_step"]))
            for key in ("loss_per_step", "exit_pdf_mean"):
                values = record[key] + [math.nan] * (self.widest - len(record[key]))
                # NaN for a step the loop no longer runs (T dropped), not its last value
                flat.update({f"{key}/{i + 1}": v for i, v in enumerate(values)})
            self.wandb.log(flat, step=record["step"])
        step = record["step"]
        self.window.append(record)
        if step % self.log_every == 0 or step == self.max_steps or step == self.start_step + 1:
            self._console_line(record)
            self.window = []

    def log_eval(self, record: dict, values: dict, line: str) -> None:
        """An evaluation's wandb ``values`` (at its step) and console ``line``."""
        if not self.enabled:
            return
        if self.wandb is not None:
            self.wandb.log(values, step=record["step"])
        self.console.print(line)

    def _console_line(self, r: dict) -> None:
        """The step's progress: losses averaged over the steps since the last line (one step's
        loss is noise), and an ETA from the pace of the last few lines, once there are two
        (the first steps include start-up)."""
        now = time.time()
        self.pace.append((now, r["step"]))
        (first_time, first_step), count = self.pace[0], len(self.window)
        if r["step"] > first_step:
            seconds = (now - first_time) / (r["step"] - first_step) * (self.max_steps - r["step"])
            eta = f"eta {_duration(seconds)}"
        else:
            eta = "eta (measuring)"
        losses = [x["loss"] for x in self.window]
        # Per-step losses of the records that ran as many steps as this one (T may change).
        same = [x for x in self.window if len(x["loss_per_step"]) == len(r["loss_per_step"])]
        per_step = [sum(x["loss_per_step"][i] for x in same) / len(same)
                    for i in range(len(r["loss_per_step"]))]  # fmt: skip
        mean = f"loss {sum(losses) / count:.4f}" + (f" (mean of {count})" if count > 1 else "")
        mfu = f" mfu {r['mfu']:.1%}" if r.get("mfu") is not None else ""
        self.console.print(
            f"step {r['step']}/{self.max_steps}  {mean} [{' '.join(f'{x:.3f}' for x in per_step)}]  "
            f"H(exit) {r['exit_entropy']:.3f}  lr {r['lr']:.2e}  gnorm {r['grad_norm']:.3f}  "
            f"{r['tokens_per_s']:,.0f} tok/s{mfu}  {eta}"
        )

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
