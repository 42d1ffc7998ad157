"""Schedules of the learning rate (warmup-stable-decay, cosine, constant, with linear warmup)
and of the exit regularizer's weight beta (the entropy-prior annealer).

A schedule is a pure function of the optimizer step, so a resumed run needs no state for it.
"""

from __future__ import annotations

from train.config import ScheduleSettings, TrainSettings
from train.curriculum import ramp


def learning_rate(step: int, peak: float, total_steps: int, s: ScheduleSettings) -> float:
    """LR for optimizer step ``step`` (0-based) of ``total_steps``."""
    if s.warmup_steps and step < s.warmup_steps:
        return peak * (step + 1) / s.warmup_steps
    final = peak * s.min_lr_ratio
    if s.kind in ("constant", "cosine"):
        span = max(total_steps - s.warmup_steps, 1)
        return ramp(peak, final, (step - s.warmup_steps) / span, s.kind)
    if s.kind == "wsd":
        decay_steps = round(total_steps * s.decay_fraction)
        decay_start = total_steps - decay_steps
        if step < decay_start or decay_steps == 0:
            return peak
        return ramp(peak, final, (step - decay_start + 1) / decay_steps, "linear")
    raise ValueError(f"unknown schedule kind {s.kind!r}")


def exit_beta(step: int, total_steps: int, t: TrainSettings) -> float:
    """beta for optimizer step ``step`` (0-based): from train.beta to train.beta_final."""
    final = t.beta if t.beta_final is None else t.beta_final
    if t.beta_schedule not in ("constant", "linear", "cosine"):
        raise ValueError(f"unknown beta schedule {t.beta_schedule!r}")
    return ramp(t.beta, final, step / max(total_steps - 1, 1), t.beta_schedule)
