"""Schedules of the learning rate (warmup-stable-decay, cosine, constant, with linear warmup)
and of the exit regularizer's weight beta (the entropy-prior annealer).

A schedule is a pure function of the optimizer step, so a resumed run needs no state for it.
"""

from __future__ import annotations

import math

from train.config import ScheduleSettings, TrainSettings


def learning_rate(step: int, peak: float, total_steps: int, s: ScheduleSettings) -> float:
    """LR for optimizer step ``step`` (0-based) of ``total_steps``."""
    if s.warmup_steps and step < s.warmup_steps:
        return peak * (step + 1) / s.warmup_steps
    final = peak * s.min_lr_ratio
    if s.kind == "constant":
        return peak
    if s.kind == "cosine":
        span = max(total_steps - s.warmup_steps, 1)
        progress = min((step - s.warmup_steps) / span, 1.0)
        return final + (peak - final) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if s.kind == "wsd":
        decay_steps = round(total_steps * s.decay_fraction)
        decay_start = total_steps - decay_steps
        if step < decay_start or decay_steps == 0:
            return peak
        progress = min((step - decay_start + 1) / decay_steps, 1.0)
        return peak + (final - peak) * progress
    raise ValueError(f"unknown schedule kind {s.kind!r}")


def exit_beta(step: int, total_steps: int, t: TrainSettings) -> float:
    """beta for optimizer step ``step`` (0-based): from train.beta to train.beta_final."""
    final = t.beta if t.beta_final is None else t.beta_final
    progress = min(step / max(total_steps - 1, 1), 1.0)
    if t.beta_schedule == "constant" or final == t.beta:
        return t.beta
    if t.beta_schedule == "linear":
        return t.beta + (final - t.beta) * progress
    if t.beta_schedule == "cosine":
        return final + (t.beta - final) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown beta schedule {t.beta_schedule!r}")
