"""Stability guards: loss-spike detection over a rolling window.

A step whose loss (averaged over micro-batches and ranks, before its update) lies beyond
``z_threshold`` standard deviations above the window's mean, or beyond ``ratio_threshold``
times the window's mean, is a spike: the trainer skips its update on every rank. Accepted
steps enter the window; the window is part of every checkpoint, so a resumed run judges
exactly as the uninterrupted one would.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass


@dataclass
class StabilitySettings:
    """Loss-spike guard."""

    enabled: bool = True
    window: int = 100
    """Accepted steps the statistics are taken over."""
    min_history: int = 20
    """Steps accepted before any step is judged (early training moves fast)."""
    z_threshold: float = 6.0
    """A loss more than this many standard deviations above the window mean is a spike."""
    ratio_threshold: float = 2.0
    """A loss more than this many times the window mean is a spike."""


def stability_problems(s: StabilitySettings) -> list[str]:
    p = []
    if s.window < 2 or not 1 <= s.min_history <= s.window:
        p.append("stability.window must be >= 2 and 1 <= stability.min_history <= window")
    if s.z_threshold <= 0 or s.ratio_threshold <= 1:
        p.append("stability.z_threshold must be > 0 and stability.ratio_threshold > 1")
    return p


class SpikeDetector:
    """Judges each step's loss against the window of accepted losses."""

    def __init__(self, settings: StabilitySettings):
        self.settings = settings
        self.history: deque[float] = deque(maxlen=settings.window)

    def judge(self, loss: float) -> str | None:
        """Why ``loss`` is a spike, or None when the step may update."""
        s = self.settings
        if not s.enabled or not math.isfinite(loss) or len(self.history) < s.min_history:
            return None
        mean = sum(self.history) / len(self.history)
        std = math.sqrt(sum((x - mean) ** 2 for x in self.history) / (len(self.history) - 1))
        if std > 0 and (loss - mean) / std > s.z_threshold:
            return f"loss {loss:.4f} is {(loss - mean) / std:.1f} sigma above the window mean {mean:.4f}"
        if loss > s.ratio_threshold * mean:
            return f"loss {loss:.4f} is {loss / mean:.2f}x the window mean {mean:.4f}"
        return None

    def accept(self, loss: float) -> None:
        if math.isfinite(loss):
            self.history.append(loss)

    def state_dict(self) -> dict:
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.history = deque(state["history"], maxlen=self.settings.window)
