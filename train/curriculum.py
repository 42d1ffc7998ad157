"""The curriculum: a run as a list of stages, each with a token budget and its own settings.

A stage may set the data mixture, the sequence length, the global batch (with a linear ramp),
an LR segment (warmup, then constant, linear or cosine from ``lr`` to ``lr_final``), a beta
segment, the loop depth T, the RoPE base and which parameters train. A setting a stage leaves
out carries over from the stage before (the first stage takes the run's own settings); a
stage's ``lr`` and ``beta`` default to where the previous stage ended.

Every optimizer step takes ``accumulation x micro_batch x seq_len x data-parallel size``
tokens. A stage ends at its cumulative token budget exactly when the budget is a multiple of
``micro_batch x seq_len x data-parallel size`` (the stage's last step takes only the
micro-batches left), and otherwise at the next such multiple. Everything here is a pure
function of the tokens consumed, so the checkpointed token count is the curriculum's whole
state: a resumed run, in mid-stage or exactly at a boundary, continues as the uninterrupted
one would.

A run without stages is one stage of ``train.max_steps x train.global_batch_tokens`` tokens
whose LR follows the ``schedule`` group (``one_stage``): every run has the same plan, and every
schedule (warmup, then constant, linear, cosine or warmup-stable-decay) is a function of the
tokens consumed, in ``stage_lr``.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field

from omegaconf import MISSING

LR_SCHEDULES = ("constant", "linear", "cosine")
"""How a configured stage's LR goes from lr to lr_final; a run without stages may also take
``wsd`` (the ``schedule`` group's warmup-stable-decay)."""


@dataclass
class StageSettings:
    """One stage of a curriculum; fields left None carry over from the stage before."""

    name: str = MISSING
    tokens: int = MISSING
    """Token budget of the stage, over all data-parallel ranks (YAML: 3_000_000_000_000)."""
    weights: dict[str, float] | None = None
    """Mixture weights by data source name (sources left out get 0); renormalised."""
    seq_len: int | None = None
    global_batch_tokens: int | None = None
    """Tokens per optimizer step at the end of the batch ramp."""
    batch_ramp_from: int | None = None
    """Global batch in tokens at the stage's start, growing linearly to global_batch_tokens
    over batch_ramp_tokens (None: no ramp)."""
    batch_ramp_tokens: int = 0
    lr: float | None = None
    """LR after warmup (default: where the previous stage ended; optim.lr for the first)."""
    lr_final: float | None = None
    """LR at the stage's end (default: lr)."""
    lr_schedule: str = "constant"
    """How the LR goes from lr to lr_final: constant (stays at lr), linear or cosine."""
    warmup_tokens: int = 0
    """Linear warmup from 0 to lr over the stage's first tokens."""
    beta: float | None = None
    """Exit-regularizer weight at the stage's start (default: where the previous stage ended;
    train.beta for the first)."""
    beta_final: float | None = None
    """Weight at the stage's end (default: beta)."""
    beta_schedule: str = "constant"
    """How beta goes from beta to beta_final: constant, linear or cosine."""
    num_recurrent_steps: int | None = None
    """Loop depth T; also written to the checkpoint's total_ut_steps."""
    rope_theta: float | None = None
    """RoPE base; also written to the checkpoint's rope_theta."""
    trainable: list[str] | None = None
    """Parameter-name patterns (fnmatch) that train; the others keep their weights
    bit-identical (their gradients count as zero and their LR is 0). None: all parameters."""


@dataclass
class CurriculumSettings:
    """The stages of a run; empty: one stage under the ``schedule`` group."""

    stages: list[StageSettings] = field(default_factory=list)


@dataclass(frozen=True)
class Stage:
    """A stage with every setting resolved and its place in the run, in tokens."""

    index: int
    name: str
    start: int
    end: int
    weights: dict[str, float] | None
    seq_len: int
    global_batch_tokens: int
    batch_ramp_from: int
    batch_ramp_tokens: int
    lr: float
    lr_final: float
    lr_schedule: str
    warmup_tokens: int
    beta: float
    beta_final: float
    beta_schedule: str
    num_recurrent_steps: int
    rope_theta: float
    trainable: tuple[str, ...] | None
    decay_tokens: int = 0
    """wsd: the LR decays linearly to lr_final over the stage's last tokens."""


@dataclass(frozen=True)
class StepPlan:
    """What one optimizer step does."""

    stage: Stage
    accumulation: int
    """Micro-batches per rank."""
    tokens: int
    """Tokens the step consumes over all ranks."""
    lr: float
    beta: float


def ramp(start: float, end: float, progress: float, kind: str) -> float:
    """``start`` -> ``end`` at ``progress`` in [0, 1]: constant (stays at start), linear or
    cosine."""
    progress = min(max(progress, 0.0), 1.0)
    if kind == "constant" or start == end:
        return start
    if kind == "linear":
        return start + (end - start) * progress
    if kind == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {kind!r}")


def stage_lr(stage: Stage, into: int, step_tokens: int) -> float:
    """The LR of the step that starts ``into`` tokens into ``stage`` and consumes
    ``step_tokens``: linear warmup to ``lr`` over ``warmup_tokens`` (the step's value is the
    one at its end), then ``lr`` -> ``lr_final`` by ``lr_schedule`` over the rest of the stage
    (at the step's start), or for ``wsd`` ``lr`` until the last ``decay_tokens``, which
    decay linearly (at the step's end).

    With a batch of 2^k tokens a step, a run without stages gets bit for bit the LR the
    step-based formulas give (``lr (s + 1) / W`` in warmup, cosine at ``(s - W) / (N - W)``,
    decay at ``(s - D0 + 1) / D``): scaling by a power of two rounds nothing."""
    if stage.warmup_tokens and into < stage.warmup_tokens:
        return min(stage.lr * (into + step_tokens) / stage.warmup_tokens, stage.lr)
    length = stage.end - stage.start
    if stage.lr_schedule == "wsd":
        decay_start = length - stage.decay_tokens
        if into < decay_start or stage.decay_tokens == 0:
            return stage.lr
        progress = (into - decay_start + step_tokens) / stage.decay_tokens
        return ramp(stage.lr, stage.lr_final, progress, "linear")
    span = max(length - stage.warmup_tokens, 1)
    progress = (into - stage.warmup_tokens) / span
    return ramp(stage.lr, stage.lr_final, progress, stage.lr_schedule)


class Curriculum:
    """The stages of a run, resolved for a micro batch size and a data-parallel size.
    ``configured``: the stages come from ``curriculum.stages`` (False: the one stage of a
    run without them, which leaves the model's own T and RoPE base in its config)."""

    def __init__(
        self, stages: list[Stage], micro_batch_size: int, dp_size: int, configured: bool = True
    ):
        self.stages, self.micro_batch_size, self.dp_size = stages, micro_batch_size, dp_size
        self.configured = configured

    @classmethod
    def resolve(cls, settings: list[StageSettings], base: dict, micro: int, dp: int) -> Curriculum:
        """Stages from their settings; ``base`` holds the run's own values of seq_len,
        global_batch_tokens, lr, beta, num_recurrent_steps and rope_theta."""
        stages, start = [], 0
        previous = dict(base, weights=None, trainable=None, lr_final=base["lr"])
        previous["beta_final"] = base["beta"]
        for index, s in enumerate(settings):
            value = {key: getattr(s, key) for key in previous if hasattr(s, key)}
            merged = {k: previous[k] if v is None else v for k, v in value.items()}
            merged["lr"] = previous["lr_final"] if s.lr is None else s.lr
            merged["lr_final"] = merged["lr"] if s.lr_final is None else s.lr_final
            merged["beta"] = previous["beta_final"] if s.beta is None else s.beta
            merged["beta_final"] = merged["beta"] if s.beta_final is None else s.beta_final
            unit = micro * merged["seq_len"] * dp
            end = start + math.ceil(s.tokens / unit) * unit
            ramp_from = (
                merged["global_batch_tokens"] if s.batch_ramp_from is None else s.batch_ramp_from
            )
            stages.append(
                Stage(
                    index=index,
                    name=s.name,
                    start=start,
                    end=end,
                    weights=None if merged["weights"] is None else dict(merged["weights"]),
                    seq_len=merged["seq_len"],
                    global_batch_tokens=merged["global_batch_tokens"],
                    batch_ramp_from=ramp_from,
                    batch_ramp_tokens=s.batch_ramp_tokens,
                    lr=merged["lr"],
                    lr_final=merged["lr_final"],
                    lr_schedule=s.lr_schedule,
                    warmup_tokens=s.warmup_tokens,
                    beta=merged["beta"],
                    beta_final=merged["beta_final"],
                    beta_schedule=s.beta_schedule,
                    num_recurrent_steps=merged["num_recurrent_steps"],
                    rope_theta=merged["rope_theta"],
                    trainable=None if merged["trainable"] is None else tuple(merged["trainable"]),
                )
            )
            previous, start = merged, end
        return cls(stages, micro, dp)

    @property
    def total_tokens(self) -> int:
        return self.stages[-1].end

    def stage_at(self, tokens: int) -> Stage | None:
        """The stage of the step that starts after ``tokens`` consumed tokens (None: done)."""
        for stage in self.stages:
            if tokens < stage.end:
                return stage
        return None

    def plan(self, tokens: int) -> StepPlan:
        """The step that starts after ``tokens`` consumed tokens."""
        stage = self.stage_at(tokens)
        if stage is None:
            raise ValueError(f"the curriculum ends at {self.total_tokens} tokens, got {tokens}")
        into = tokens - stage.start
        unit = self.micro_batch_size * stage.seq_len * self.dp_size
        batch = stage.global_batch_tokens
        if stage.batch_ramp_tokens and into < stage.batch_ramp_tokens:
            batch = ramp(stage.batch_ramp_from, batch, into / stage.batch_ramp_tokens, "linear")
        accumulation = max(int(batch // unit), 1)
        accumulation = min(accumulation, math.ceil((stage.end - tokens) / unit))
        lr = stage_lr(stage, into, accumulation * unit)
        span = max(stage.end - stage.start, 1)
        beta = ramp(stage.beta, stage.beta_final, into / span, stage.beta_schedule)
        return StepPlan(stage, accumulation, accumulation * unit, lr, beta)

    def total_steps(self) -> int:
        """Optimizer steps of the whole curriculum."""
        steps = 0
        for stage in self.stages:
            tokens = stage.start
            while tokens < stage.end:
                plan = self.plan(tokens)
                into = tokens - stage.start
                if into >= stage.batch_ramp_tokens:  # constant batch to the stage's end
                    steps += math.ceil((stage.end - tokens) / plan.tokens)
                    break
                tokens += plan.tokens
                steps += 1
        return steps

    def describe(self) -> list[str]:
        """One line per stage, for the log."""
        return [
            f"stage {s.index} {s.name!r}: tokens [{s.start:,}, {s.end:,}), seq_len {s.seq_len}, "
            f"batch {s.global_batch_tokens:,} tokens"
            + (
                f" (ramp from {s.batch_ramp_from:,} over {s.batch_ramp_tokens:,} tokens)"
                if s.batch_ramp_tokens
                else ""
            )
            + f", lr {s.lr:g} -> {s.lr_final:g} "
            f"({s.lr_schedule}), beta {s.beta:g} -> {s.beta_final:g}, T {s.num_recurrent_steps}, "
            f"rope_theta {s.rope_theta:g}, trainable {list(s.trainable) if s.trainable else 'all'}"
            for s in self.stages
        ]


def stage_problems(
    settings: list[StageSettings],
    *,
    micro_batch_size: int,
    dp_size: int,
    base: dict,
    sources: list[str],
    max_positions: int | None,
    parameter_names: list[str] | None,
) -> list[str]:
    """Every problem of a list of stage settings for a run on ``dp_size`` ranks."""
    p: list[str] = []
    names = [s.name for s in settings]
    if len(set(names)) != len(names):
        p.append(f"curriculum.stages: stage names must be unique, got {names}")
    seq_len, batch = base["seq_len"], base["global_batch_tokens"]
    for i, s in enumerate(settings):
        where = f"curriculum.stages[{i}] ({s.name})"
        seq_len = seq_len if s.seq_len is None else s.seq_len
        batch = batch if s.global_batch_tokens is None else s.global_batch_tokens
        unit = micro_batch_size * seq_len * dp_size
        if s.tokens < 1:
            p.append(f"{where}: tokens must be >= 1, got {s.tokens}")
        if seq_len < 2 or (max_positions is not None and seq_len > max_positions):
            p.append(f"{where}: seq_len {seq_len} must lie in [2, {max_positions}]")
        for key, value in (("global_batch_tokens", batch), ("batch_ramp_from", s.batch_ramp_from)):
            if value is not None and (value < unit or value % unit):
                p.append(
                    f"{where}: {key} ({value}) must be a positive multiple of micro_batch_size x "
                    f"seq_len x data-parallel size ({micro_batch_size} x {seq_len} x {dp_size} "
                    f"= {unit})"
                )
        if s.batch_ramp_tokens < 0 or s.warmup_tokens < 0:
            p.append(f"{where}: batch_ramp_tokens and warmup_tokens must be >= 0")
        if s.warmup_tokens >= max(s.tokens, 1):
            p.append(
                f"{where}: warmup_tokens ({s.warmup_tokens}) must be below tokens ({s.tokens})"
            )
        if (s.lr is not None and s.lr <= 0) or (s.lr_final is not None and s.lr_final < 0):
            p.append(f"{where}: lr must be > 0 and lr_final >= 0")
        if (s.beta is not None and s.beta < 0) or (s.beta_final is not None and s.beta_final < 0):
            p.append(f"{where}: beta and beta_final must be >= 0")
        for key in ("lr_schedule", "beta_schedule"):
            if getattr(s, key) not in LR_SCHEDULES:
                p.append(f"{where}: {key} must be one of {LR_SCHEDULES}, got {getattr(s, key)!r}")
        if s.num_recurrent_steps is not None and s.num_recurrent_steps < 1:
            p.append(f"{where}: num_recurrent_steps must be >= 1, got {s.num_recurrent_steps}")
        if s.rope_theta is not None and s.rope_theta <= 0:
            p.append(f"{where}: rope_theta must be > 0, got {s.rope_theta}")
        if s.weights is not None:
            unknown = sorted(set(s.weights) - set(sources))
            if unknown:
                p.append(f"{where}: weights name unknown sources {unknown}; known: {sources}")
            if any(w < 0 for w in s.weights.values()) or sum(s.weights.values()) <= 0:
                p.append(f"{where}: weights must be >= 0 with a positive sum")
        if s.trainable is not None and parameter_names is not None:
            for pattern in s.trainable:
                if not fnmatch.filter(parameter_names, pattern):
                    p.append(f"{where}: trainable pattern {pattern!r} matches no parameter")
    return p


def trainable_mask(names: list[str], patterns: tuple[str, ...] | None) -> list[bool]:
    """Which of ``names`` train under ``patterns`` (None: all)."""
    if patterns is None:
        return [True] * len(names)
    return [any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns) for name in names]
