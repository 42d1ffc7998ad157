"""Stability guards: loss and grad-norm spike detection, and rollback after repeated spikes.

A step whose loss (averaged over micro-batches and ranks) or whose global gradient norm (before
clipping) lies beyond a z-score above its window's mean, or beyond a ratio of that mean, is a
spike: the trainer skips its update on every rank. Accepted steps enter the windows; the
windows are part of every checkpoint, so a resumed run judges exactly as the uninterrupted one
would. A skipped update leaves the weights unchanged, so a grad-norm spike that repeats over
new batches comes from the weights and skipping cannot end it: after ``grad_norm_patience``
such skips in a row the (clipped) update proceeds, and its value enters the window. Updates
skipped ``max_consecutive_skips`` times in a row end the run with an error.

``rollback_after`` spikes (of the loss, non-finite steps, and with ``grad_norm_rollback`` also of
the gradient norm) within ``rollback_within`` steps mean the weights have gone bad: the
trainer restores the weights and optimizer state of the last good checkpoint (one saved with
no spike in its recent past), keeps reading data from where it is (the offending window is
never trained on), and multiplies the LR by ``lr_factor`` for ``lr_factor_steps`` steps (the
conservative-LR guard); before any good checkpoint exists, only the LR is lowered. More than
``max_rollbacks`` rollbacks end the run.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass


@dataclass
class StabilitySettings:
    """Spike guards and rollback."""

    enabled: bool = True
    window: int = 100
    """Accepted steps the statistics are taken over."""
    min_history: int = 20
    """Steps accepted before any step is judged (early training moves fast)."""
    z_threshold: float = 6.0
    """A loss more than this many standard deviations above the window mean is a spike."""
    ratio_threshold: float = 2.0
    """A loss more than this many times the window mean is a spike."""
    grad_norm: bool = True
    """Also judge the global gradient norm (before clipping) of every step."""
    grad_norm_z_threshold: float = 6.0
    grad_norm_ratio_threshold: float = 4.0
    rollback_after: int = 3
    """Spikes within rollback_within steps that trigger a rollback (0: never roll back)."""
    grad_norm_rollback: bool = False
    """Whether grad-norm spikes count toward a rollback. Off by default: clipping already
    bounds the update such a gradient would make, while loss spikes and non-finite steps are
    what signal damaged weights; every spike is skipped either way."""
    rollback_within: int = 50
    max_rollbacks: int = 3
    """Rollbacks allowed in a run; one more ends it with an error."""
    lr_factor: float = 0.5
    """LR multiplier after a rollback (the conservative-LR guard)."""
    lr_factor_steps: int = 500
    """Steps the lowered LR lasts after a rollback."""
    grad_norm_patience: int = 3
    """Grad-norm spikes skipped in a row; from the next one on the (clipped) update proceeds.
    A skipped update leaves the weights unchanged, so a gradient norm that stays high over
    new batches comes from the weights, and skipping could never end it."""
    max_consecutive_skips: int = 20
    """Updates skipped in a row (spikes or non-finite values) that end the run with an error:
    it is not making progress. Applies with the spike guards off too."""


def stability_problems(s: StabilitySettings) -> list[str]:
    p = []
    if s.window < 2 or not 1 <= s.min_history <= s.window:
        p.append("stability.window must be >= 2 and 1 <= stability.min_history <= window")
    if min(s.z_threshold, s.grad_norm_z_threshold) <= 0:
        p.append("stability.z_threshold and stability.grad_norm_z_threshold must be > 0")
    if min(s.ratio_threshold, s.grad_norm_ratio_threshold) <= 1:
        p.append("stability.ratio_threshold and stability.grad_norm_ratio_threshold must be > 1")
    if s.rollback_after < 0 or s.rollback_within < 1 or s.max_rollbacks < 0:
        p.append("stability.rollback_after and max_rollbacks must be >= 0, rollback_within >= 1")
    if not 0 < s.lr_factor <= 1 or s.lr_factor_steps < 0:
        p.append("stability.lr_factor must lie in (0, 1] and lr_factor_steps be >= 0")
    if s.grad_norm_patience < 0:
        p.append(f"stability.grad_norm_patience must be >= 0, got {s.grad_norm_patience}")
    if s.max_consecutive_skips < 1:
        p.append(f"stability.max_consecutive_skips must be >= 1, got {s.max_consecutive_skips}")
    return p


class SpikeDetector:
    """Judges each step's loss (or grad norm) against the window of accepted values."""

    def __init__(self, settings: StabilitySettings, quantity: str = "loss"):
        self.settings, self.quantity = settings, quantity
        self.enabled = settings.enabled and (quantity == "loss" or settings.grad_norm)
        if quantity == "loss":
            self.z_threshold, self.ratio_threshold = settings.z_threshold, settings.ratio_threshold
        else:
            self.z_threshold = settings.grad_norm_z_threshold
            self.ratio_threshold = settings.grad_norm_ratio_threshold
        self.history: deque[float] = deque(maxlen=settings.window)

    def judge(self, value: float) -> str | None:
        """Why ``value`` is a spike, or None when the step may update."""
        if not self.enabled or not math.isfinite(value):
            return None
        if len(self.history) < self.settings.min_history:
            return None
        mean = sum(self.history) / len(self.history)
        std = math.sqrt(sum((x - mean) ** 2 for x in self.history) / (len(self.history) - 1))
        what = f"{self.quantity} {value:.4f}"
        if std > 0 and (value - mean) / std > self.z_threshold:
            return f"{what} is {(value - mean) / std:.1f} sigma above the window mean {mean:.4f}"
        if value > self.ratio_threshold * mean:
            return f"{what} is {value / mean:.2f}x the window mean {mean:.4f}"
        return None

    def accept(self, loss: float) -> None:
        if math.isfinite(loss):
            self.history.append(loss)

    def state_dict(self) -> dict:
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.history = deque(state["history"], maxlen=self.settings.window)


class RollbackGuard:
    """Counts spikes; says when they call for a rollback, and what LR factor is in force."""

    def __init__(self, settings: StabilitySettings):
        self.settings = settings
        self.spike_steps: list[int] = []
        self.rollbacks: list[dict] = []
        self.lowered_until = 0

    def record_spike(self, step: int) -> bool:
        """Notes a spike at ``step``; True when the spikes now call for a rollback."""
        s = self.settings
        self.spike_steps = [x for x in self.spike_steps if x > step - s.rollback_within] + [step]
        return s.enabled and s.rollback_after > 0 and len(self.spike_steps) >= s.rollback_after

    def recent_spikes(self, step: int) -> bool:
        """Whether a spike happened within rollback_within steps before ``step``."""
        return any(x > step - self.settings.rollback_within for x in self.spike_steps)

    def rolled_back(self, step: int, to_step: int | None, skipped_tokens: int) -> None:
        """Records a rollback at ``step`` (``to_step`` None: no checkpoint to return to, only
        the LR is lowered); raises once the run has used up its rollbacks."""
        s = self.settings
        self.rollbacks.append({"step": step, "to_step": to_step, "skipped_tokens": skipped_tokens})
        self.spike_steps = []
        self.lowered_until = step + s.lr_factor_steps
        if len(self.rollbacks) > s.max_rollbacks:
            raise RuntimeError(
                f"stopping: {len(self.rollbacks)} rollbacks, more than stability.max_rollbacks "
                f"({s.max_rollbacks}); the loss keeps spiking (rollbacks: {self.rollbacks}). "
                "Lower the LR, raise the batch or lower T, and resume from the last checkpoint"
            )

    def lr_factor(self, step: int) -> float:
        """LR multiplier for the step after ``step`` optimizer steps."""
        return self.settings.lr_factor if step < self.lowered_until else 1.0

    def state_dict(self) -> dict:
        return {
            "spike_steps": list(self.spike_steps),
            "rollbacks": list(self.rollbacks),
            "lowered_until": self.lowered_until,
        }

    def load_state_dict(self, state: dict) -> None:
        self.spike_steps = list(state["spike_steps"])
        self.rollbacks = list(state["rollbacks"])
        self.lowered_until = state["lowered_until"]
