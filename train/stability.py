"""Stability guards: loss and grad-norm spike detection, and rollback after repeated spikes.

A step whose loss (averaged over micro-batches and ranks) or whose global gradient norm (before
clipping) lies beyond a z-score above its window's mean (and at least a minimum fraction above
it), or beyond a ratio of that mean, is a spike: the trainer skips its update on every rank.
Accepted steps enter the windows; the windows are part of every checkpoint, so a resumed run
judges exactly as the uninterrupted one would. A skipped update leaves the weights unchanged,
so a grad-norm spike that repeats over new batches comes from the weights and skipping cannot
end it: after ``grad_norm_patience`` such skips in a row the (clipped) update proceeds, and its
value enters the window. Updates skipped ``max_consecutive_skips`` times in a row end the run
with an error.

``rollback_after`` spikes (of the loss, non-finite steps, and with ``grad_norm_rollback`` also of
the gradient norm) within ``rollback_within`` steps mean the weights have gone bad: the
trainer restores the weights and optimizer state of the last good checkpoint (one saved with
no spike in its recent past), keeps reading data from where it is (the offending window is
never trained on), and multiplies the LR by ``lr_factor`` for ``lr_factor_steps`` steps (the
conservative-LR guard); before any good checkpoint exists, only the LR is lowered and the
windows start over at the weights' new level. More than ``max_rollbacks`` rollbacks end the
run.
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
    """A loss more than this many standard deviations above the window mean is a spike (when
    it is also min_rise above the mean)."""
    min_rise: float = 0.05
    """The z-score rule judges only a loss at least this fraction above the window mean. On a
    plateau the window's spread is tiny: a 2.9% rise (1.108 over a mean of 1.077) measured 9
    sigma, and a healthy run was rolled back four times and stopped."""
    ratio_threshold: float = 2.0
    """A loss more than this many times the window mean is a spike."""
    grad_norm: bool = True
    """Also judge the global gradient norm (before clipping) of every step."""
    grad_norm_z_threshold: float = 6.0
    grad_norm_min_rise: float = 0.5
    """As min_rise, for the gradient norm (which varies far more from step to step)."""
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
    if min(s.min_rise, s.grad_norm_min_rise) < 0:
        p.append("stability.min_rise and stability.grad_norm_min_rise must be >= 0")
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
            self.min_rise = settings.min_rise
        else:
            self.z_threshold = settings.grad_norm_z_threshold
            self.ratio_threshold = settings.grad_norm_ratio_threshold
            self.min_rise = settings.grad_norm_min_rise
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
        material = value >= mean * (1.0 + self.min_rise)
        if std > 0 and material and (value - mean) / std > self.z_threshold:
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


class TrainingStalled(RuntimeError):
    """Every recent update was skipped: the run cannot make progress."""


@dataclass(frozen=True)
class Verdict:
    """The guards' judgement of one step, before its update."""

    spike: str | None = None
    """Why the update is skipped (a loss or grad-norm spike); None: it may update."""
    loss_spike: bool = False
    """The spike is the loss's (a grad-norm spike counts toward a rollback only with
    ``grad_norm_rollback``)."""
    let_through: str | None = None
    """A grad-norm spike whose patience has run out: the (clipped) update proceeds."""


class StabilityGuard:
    """The spike detectors, the rollback rule and their checkpointed state.

    Each step: ``judge`` its loss and gradient norm before the update, then ``settle`` what the
    update did (skipped or not), which feeds the windows, counts skips and says whether the
    spikes now call for a rollback."""

    def __init__(self, settings: StabilitySettings):
        self.settings = settings
        self.loss = SpikeDetector(settings, "loss")
        self.grad_norm = SpikeDetector(settings, "grad_norm")
        self.rollback_rule = RollbackGuard(settings)
        self.grad_spike_run = 0
        """Steps in a row judged grad-norm spikes."""
        self.consecutive_skips = 0
        """Updates skipped in a row."""

    def judge(self, loss: float, grad_norm: float) -> Verdict:
        loss_spike = self.loss.judge(loss)
        if loss_spike:
            self.grad_spike_run = 0
            return Verdict(spike=loss_spike, loss_spike=True)
        grad_spike = self.grad_norm.judge(grad_norm)
        self.grad_spike_run = self.grad_spike_run + 1 if grad_spike else 0
        if grad_spike and self.grad_spike_run > self.settings.grad_norm_patience:
            # Skipped updates leave the weights as they are: a gradient norm still high on new
            # batches at unchanged weights comes from the weights, which skipping never changes.
            return Verdict(let_through=grad_spike)
        return Verdict(spike=grad_spike)

    def settle(
        self, step: int, verdict: Verdict, loss: float, grad_norm: float, skipped: bool
    ) -> tuple[str | None, bool]:
        """Records step ``step``'s outcome: why its update was skipped (None: it was not) and
        whether a rollback is now due. Raises ``TrainingStalled`` after too many skips in a
        row."""
        if not skipped:  # a lasting grad-norm level enters once its patience has run out
            self.loss.accept(loss)
            self.grad_norm.accept(grad_norm)
        reason = verdict.spike if verdict.spike is not None else ("non-finite" if skipped else None)
        self.consecutive_skips = self.consecutive_skips + 1 if reason else 0
        if self.consecutive_skips >= self.settings.max_consecutive_skips:
            raise TrainingStalled(
                f"the last {self.consecutive_skips} updates (to step {step}) were all skipped, "
                f"the last for: {reason}. The run is not making progress and stops without "
                "saving: check optim (lr, eps), the data and the stability settings, then "
                "resume from the last checkpoint."
            )
        if reason is None:
            return None, False
        counts = verdict.loss_spike or verdict.spike is None or self.settings.grad_norm_rollback
        return reason, counts and self.rollback_rule.record_spike(step)

    @property
    def rollbacks(self) -> list[dict]:
        return self.rollback_rule.rollbacks

    def lr_factor(self, step: int) -> float:
        return self.rollback_rule.lr_factor(step)

    def good(self, step: int) -> bool:
        """No spike in the recent past: a checkpoint saved now is one a rollback may return to."""
        return not self.rollback_rule.recent_spikes(step)

    def keep_weights(self, step: int) -> None:
        """A rollback at ``step`` with no good checkpoint to return to: the weights stay, the LR
        is lowered, and the windows start over (judged against the level the weights have
        left, every later loss would be a spike, nothing would train, and the next rollbacks
        would stop the run; a 3-layer p-hop model whose loss rose from 0.64 to 1.05 at step
        406 was stopped so at step 418)."""
        self.rollback_rule.rolled_back(step, None, 0)
        self.restore_windows({"loss_window": [], "grad_norm_window": []})

    def restore_windows(self, saved: dict) -> None:
        """The accepted values of a checkpoint's trainer state (after a rollback to it)."""
        self.loss.load_state_dict({"history": saved["loss_window"]})
        self.grad_norm.load_state_dict({"history": saved.get("grad_norm_window", [])})

    def state_dict(self) -> dict:
        """Keyed as the fields of the trainer state that hold it."""
        return {
            "loss_window": self.loss.state_dict()["history"],
            "grad_norm_window": self.grad_norm.state_dict()["history"],
            "guard": self.rollback_rule.state_dict(),
            "consecutive_skips": self.consecutive_skips,
            "grad_spike_run": self.grad_spike_run,
        }

    def load_state_dict(self, state: dict) -> None:
        self.restore_windows(state)
        if state.get("guard"):
            self.rollback_rule.load_state_dict(state["guard"])
        self.consecutive_skips = state.get("consecutive_skips", 0)
        self.grad_spike_run = state.get("grad_spike_run", 0)
