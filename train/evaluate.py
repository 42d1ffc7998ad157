"""Held-out evaluation of a LoopLM's depth and exit gate: ``python -m train.evaluate``
(or ``looplm-evaluate``), one process.

    python -m train.evaluate model_path=runs/tiny compare_path=runs/tiny-gate/model \
        out_dir=runs/tiny-gate/eval data.seed=1234 num_batches=16

For each model (an Ouro-format directory, a run directory or a checkpoint step directory), on
the same ``num_batches`` held-out batches of the data config:

- the loss, perplexity and next-token accuracy of every recurrent step;
- the mean exit distribution, and the histogram of Q-exit steps at every threshold;
- the Q-exit sweep: q in [0, 1] against the mean depth used, loss and accuracy, and the loss
  interpolated at fixed depths (the comparison of two gates at equal average depth);
- the gate-free baseline: exit at the first step t >= 2 whose hidden state moved less than
  eps relative to the step before, ``||h_t - h_{t-1}|| / ||h_{t-1}|| < eps``, swept over eps.

``out_dir`` receives ``evaluation.json`` and ``evaluation.png``. With ``sweep.tasks`` (held-out
tasks, as a training job's ``eval.tasks``) or ``sweep.harness_tasks`` (lm-evaluation-harness
tasks), also the depth sweep (``train.depth_sweep``): each task scored when exiting at every
step 1..``sweep.max_steps`` and under Q-exit, as ``depth_sweep.json``, ``.md`` and ``.png``.

    python -m train.evaluate model_path=runs/tiny compare_path=runs/tiny-gate/model \
        out_dir=runs/sweep 'sweep.tasks=[{name:mano,source:mano},{name:multi_hop,source:multi_hop}]'


Shape legend: T recurrent steps, N target tokens, C a chunk of them, H hidden, V vocab.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.config_store import ConfigStore
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from omegaconf import MISSING, DictConfig, OmegaConf

from data_pipelines.config import DataConfig
from data_pipelines.loader import build_data_loader
from looplm import LoopLMForCausalLM, q_exit_steps
from looplm.losses import IGNORE_INDEX, chunked_cross_entropy_and_hits, exit_pdf
from train import depth_sweep
from train.depth_sweep import SweepSettings, sweep_problems
from train.export import load_model

logger = logging.getLogger("looplm.evaluate")
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")
ROLES = ("model", "compare")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "bfloat16", "auto")
_COLORS = colormaps["tab10"]  # model i is drawn in colour i in every panel


@dataclass
class EvaluateConfig:
    """The evaluation job."""

    model_path: str = MISSING
    """An Ouro-format directory (or hub id), a run directory (its latest complete checkpoint)
    or a checkpoint step directory."""
    compare_path: str | None = None
    """A second model evaluated on the same batches, e.g. the Stage II export of model_path."""
    out_dir: str = MISSING
    """Where evaluation.json and evaluation.png are written."""
    data: DataConfig = field(default_factory=DataConfig)
    """The held-out data: e.g. the training corpus under another data.seed."""
    num_batches: int = 16
    batch_size: int = 4
    """Sequences per batch (of data.seq_len tokens)."""
    num_recurrent_steps: int | None = None
    """T to run (default: each model's total_ut_steps)."""
    num_thresholds: int = 11
    """Q-exit thresholds q, evenly spaced over [0, 1]."""
    eps: list[float] = field(default_factory=list)
    """Thresholds of the hidden-state-change baseline (empty: num_eps quantiles of the observed
    relative changes, from no early exit to every token exiting at step 2)."""
    num_eps: int = 11
    histogram_q: float = 0.5
    """The Q-exit threshold whose exit-step histogram the plot shows."""
    device: str = "auto"
    """auto (cuda when available), cpu or cuda."""
    dtype: str = "float32"
    """float32, bfloat16, or auto (the checkpoint's own)."""
    chunk_tokens: int = 512
    """Tokens whose [tokens, V] logits are materialized at once."""
    sweep: SweepSettings = field(default_factory=SweepSettings)
    """Task quality at each exit step (``train.depth_sweep``); off while it lists no task."""


def register_configs() -> None:
    ConfigStore.instance().store(name="evaluate_schema", node=EvaluateConfig)


def config_problems(cfg: EvaluateConfig) -> list[str]:
    """Every problem of the job's own settings (the data config is checked by its loader)."""
    p = []
    if cfg.num_batches < 1 or cfg.batch_size < 1 or cfg.chunk_tokens < 1:
        p.append("num_batches, batch_size and chunk_tokens must be >= 1")
    if cfg.num_recurrent_steps is not None and cfg.num_recurrent_steps < 1:
        p.append(f"num_recurrent_steps must be >= 1, got {cfg.num_recurrent_steps}")
    if cfg.num_thresholds < 2 or (not cfg.eps and cfg.num_eps < 2):
        p.append("num_thresholds and num_eps must be >= 2")
    if not 0.0 <= cfg.histogram_q <= 1.0:
        p.append(f"histogram_q must lie in [0, 1], got {cfg.histogram_q}")
    if any(e < 0 for e in cfg.eps):
        p.append(f"eps must be >= 0, got {list(cfg.eps)}")
    if cfg.device not in DEVICES:
        p.append(f"device must be one of {DEVICES}, got {cfg.device!r}")
    if cfg.dtype not in DTYPES:
        p.append(f"dtype must be one of {DTYPES}, got {cfg.dtype!r}")
    return p + sweep_problems(cfg.sweep, cfg.data)


# ---- per-token results -----------------------------------------------------------------


@dataclass
class TokenStats:
    """One model's per-token results on the evaluation batches."""

    loss_TN: torch.Tensor  # cross-entropy of each step's prediction, float32
    correct_TN: torch.Tensor  # whether each step's argmax is the target
    gate_logits_NT: torch.Tensor  # exit-gate logits z_t, float32
    hidden_change_TN: torch.Tensor  # [T-1, N] ||h_t - h_{t-1}|| / ||h_{t-1}|| for t = 2..T

    @property
    def num_steps(self) -> int:
        return self.loss_TN.shape[0]


def _head_stats(lm_head, hidden_TNH, targets_N, chunk_tokens: int):
    """Cross-entropy and argmax hits [T, N] of every step, a chunk of tokens at a time."""
    rows_N = torch.arange(hidden_TNH.shape[1], device=hidden_TNH.device)
    per_step = [
        chunked_cross_entropy_and_hits(h_NH, lm_head.weight, rows_N, targets_N, chunk_tokens)
        for h_NH in hidden_TNH
    ]
    loss_TN = torch.stack([loss.float() for loss, _ in per_step])
    return loss_TN, torch.stack([correct for _, correct in per_step])


@torch.no_grad()
def token_stats(
    model: LoopLMForCausalLM, batches: list[dict], num_steps: int, chunk_tokens: int = 512
) -> TokenStats:
    """Runs every step of ``model`` on the batches and keeps, per target token, what the exit
    rules need."""
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    parts = []
    for batch in batches:
        ids = batch["input_ids"].to(device)
        if int(ids.max()) >= vocab:
            raise ValueError(
                f"the data holds token id {int(ids.max())}, outside the model's {vocab}"
            )
        body = model.model(ids, batch["position_ids"].to(device), num_steps)
        labels = batch["labels"].reshape(-1).to(device)
        rows = (labels != IGNORE_INDEX).nonzero().squeeze(1)
        hidden_TNH = torch.stack([h.reshape(-1, h.shape[-1])[rows] for h in body.step_hidden])
        loss, correct = _head_stats(model.lm_head, hidden_TNH, labels[rows], chunk_tokens)
        h = hidden_TNH.float()
        change = (h[1:] - h[:-1]).norm(dim=-1) / h[:-1].norm(dim=-1).clamp(min=1e-12)
        gate = body.gate_logits.reshape(-1, num_steps)[rows].float()
        parts.append((loss.cpu(), correct.cpu(), gate.cpu(), change.cpu()))
    loss, correct, gate, change = zip(*parts, strict=True)
    return TokenStats(
        torch.cat(loss, 1), torch.cat(correct, 1), torch.cat(gate, 0), torch.cat(change, 1)
    )


# ---- exit rules and their curves -------------------------------------------------------


def exit_result(stats: TokenStats, exit_steps_N: torch.Tensor) -> dict:
    """Mean depth (1-based), loss, perplexity and accuracy when token i exits at 0-based step
    ``exit_steps_N[i]``."""
    index = exit_steps_N.long()[None]
    loss = stats.loss_TN.double().gather(0, index).mean().item()
    return {
        "mean_depth": (index.double() + 1).mean().item(),
        "loss": loss,
        "perplexity": float(np.exp(loss)),
        "accuracy": stats.correct_TN.gather(0, index).double().mean().item(),
    }


def q_exit_sweep(stats: TokenStats, thresholds: list[float]) -> list[dict]:
    """Q-exit at each threshold q: its exit result and the fraction of tokens exiting at each
    step."""
    curve = []
    for q in thresholds:
        steps_N = q_exit_steps(stats.gate_logits_NT, q)
        histogram = torch.bincount(steps_N, minlength=stats.num_steps).double()
        curve.append(
            {
                "q": q,
                **exit_result(stats, steps_N),
                "exit_histogram": (histogram / max(steps_N.numel(), 1)).tolist(),
            }
        )
    return curve


def hidden_change_exit_steps(change_TN: torch.Tensor, eps: float) -> torch.Tensor:
    """0-based exit step [N] of the baseline: the first step t >= 2 (1-based) whose relative
    hidden-state change is below eps; the last step when there is none."""
    last = change_TN.shape[0]  # 0-based index of step T
    if last == 0:
        return torch.zeros(change_TN.shape[1], dtype=torch.long)
    # Row r of ``below`` is 0-based step r + 1; a last row of True stands for "no such step".
    below = torch.cat([change_TN.double() < eps, torch.ones_like(change_TN[:1], dtype=torch.bool)])
    return (below.int().argmax(0) + 1).clamp(max=last)


def default_eps(stats: TokenStats, count: int) -> list[float]:
    """``count`` thresholds at evenly spaced quantiles of the relative changes of steps 2..T-1
    (the ones a rule can exit at); the last one lies just above the largest change."""
    decisive = stats.hidden_change_TN[:-1].flatten().double().numpy()
    if decisive.size == 0:
        return [0.0]
    values = np.quantile(decisive, np.linspace(0.0, 1.0, count))
    values[-1] = np.nextafter(values[-1], np.inf)
    return values.tolist()


def hidden_change_sweep(stats: TokenStats, eps_values: list[float]) -> list[dict]:
    """The gate-free baseline at each threshold eps: its exit result."""
    return [
        {"eps": eps, **exit_result(stats, hidden_change_exit_steps(stats.hidden_change_TN, eps))}
        for eps in eps_values
    ]


def depth_grid(num_steps: int, per_step: int = 2) -> list[float]:
    """Depths 1, 1 + 1/per_step, ..., T at which curves are compared."""
    return np.linspace(1.0, num_steps, per_step * (num_steps - 1) + 1).tolist()


def loss_at_depths(curve: list[dict], depths: list[float]) -> list[float]:
    """The curve's loss linearly interpolated at each depth (a mixture of the two neighbouring
    thresholds reaches any depth between theirs); clamped beyond the curve's ends."""
    points = sorted({(c["mean_depth"], c["loss"]) for c in curve})
    xs, ys = zip(*points, strict=True)
    return np.interp(depths, xs, ys).tolist()


def mean_loss_over_depth(curve: list[dict], num_steps: int) -> float:
    """The area under the loss-vs-depth curve over [1, T], divided by T - 1: lower is better."""
    if num_steps == 1:
        return loss_at_depths(curve, [1.0])[0]
    depths = np.linspace(1.0, num_steps, 201)
    losses = np.array(loss_at_depths(curve, depths.tolist()))
    return float(((losses[1:] + losses[:-1]) / 2 * np.diff(depths)).sum() / (num_steps - 1))


def summarize(stats: TokenStats, cfg: EvaluateConfig) -> dict:
    """Every figure of one model (plain numbers and lists, JSON-ready)."""
    t = stats.num_steps
    mean_loss = stats.loss_TN.double().mean(1)
    pdf_NT = exit_pdf(stats.gate_logits_NT.double())
    thresholds = np.linspace(0.0, 1.0, cfg.num_thresholds).tolist()
    q_curve = q_exit_sweep(stats, thresholds)
    eps_values = list(cfg.eps) or default_eps(stats, cfg.num_eps)
    depths = depth_grid(t)
    return {
        "num_recurrent_steps": t,
        "num_tokens": stats.loss_TN.shape[1],
        "loss_per_step": mean_loss.tolist(),
        "perplexity_per_step": mean_loss.exp().tolist(),
        "accuracy_per_step": stats.correct_TN.double().mean(1).tolist(),
        "exit_pdf_mean": pdf_NT.mean(0).tolist(),
        "expected_loss": (pdf_NT.T * stats.loss_TN.double()).sum(0).mean().item(),
        "q_exit": q_curve,
        "q_exit_histogram": q_exit_sweep(stats, [cfg.histogram_q])[0],
        "depths": depths,
        "q_exit_loss_at_depth": loss_at_depths(q_curve, depths),
        "q_exit_mean_loss": mean_loss_over_depth(q_curve, t),
        "hidden_change": hidden_change_sweep(stats, eps_values),
    }


def compare(first: dict, second: dict) -> dict:
    """The second model's Q-exit curve against the first's at equal mean depth (negative: the
    second loses less)."""
    t = min(first["num_recurrent_steps"], second["num_recurrent_steps"])
    depths = depth_grid(t)
    a, b = loss_at_depths(first["q_exit"], depths), loss_at_depths(second["q_exit"], depths)
    return {
        "depths": depths,
        "loss_difference": [y - x for x, y in zip(a, b, strict=True)],
        "mean_loss_difference": mean_loss_over_depth(second["q_exit"], t)
        - mean_loss_over_depth(first["q_exit"], t),
    }


# ---- the job ---------------------------------------------------------------------------


def held_out_batches(cfg: EvaluateConfig) -> list[dict]:
    """The first ``num_batches`` batches of the data config, read in this process."""
    loader = build_data_loader(cfg.data, rank=0, world_size=1, micro_batch_size=cfg.batch_size)
    stream = iter(loader)
    try:
        return [next(stream) for _ in range(cfg.num_batches)]
    finally:
        stream.close()


def evaluate(cfg: EvaluateConfig, batches: list[dict] | None = None) -> dict:
    """Evaluates the model (and the comparison model) on ``batches`` (default: the config's
    held-out batches); writes ``evaluation.json`` and ``evaluation.png`` into ``cfg.out_dir``
    and returns the report."""
    problems = config_problems(cfg)
    if problems:
        raise ValueError("invalid evaluation config:\n  - " + "\n  - ".join(problems))
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if batches is None:
        batches = held_out_batches(cfg)
    paths = dict(zip(ROLES, (cfg.model_path, cfg.compare_path), strict=True))
    report: dict = {"config": asdict(cfg), "models": {}}
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sweeps = {}
    for role, path in paths.items():
        if path is None:
            continue
        model = load_model(path, cfg.dtype).to(device).eval()
        steps = cfg.num_recurrent_steps or model.config.total_ut_steps
        stats = token_stats(model, batches, steps, cfg.chunk_tokens)
        report["models"][role] = {"path": path, **summarize(stats, cfg)}
        if cfg.sweep.tasks or cfg.sweep.harness_tasks:
            sweeps[role] = depth_sweep.sweep_model(model, path, cfg.sweep, cfg.data, out)
        del model
        logger.info(
            "%s (%s): loss per step %s", role, path, report["models"][role]["loss_per_step"]
        )
    if len(report["models"]) == 2:
        report["comparison"] = compare(report["models"]["model"], report["models"]["compare"])
    if sweeps:
        report["depth_sweep"] = depth_sweep.write(sweeps, out)
    (out / "evaluation.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_evaluation(report, out / "evaluation.png")
    return report


# ---- the plot --------------------------------------------------------------------------


def plot_evaluation(report: dict, path: str | Path) -> Path:
    """Four panels: loss and accuracy against mean depth, loss per step, and the exit
    distributions."""
    figure = Figure(figsize=(12, 8), layout="constrained")
    FigureCanvasAgg(figure)
    (loss_axes, accuracy_axes), (step_axes, exit_axes) = figure.subplots(2, 2)
    models = report["models"]
    _draw_depth_curves(loss_axes, models, "loss")
    _draw_depth_curves(accuracy_axes, models, "accuracy")
    for index, (role, result) in enumerate(models.items()):
        steps = np.arange(1, result["num_recurrent_steps"] + 1)
        step_axes.plot(steps, result["loss_per_step"], "o-", color=_COLORS(index), label=role)
    loss_axes.set(title="Loss at equal mean depth", xlabel="mean depth (steps)", ylabel="loss")
    accuracy_axes.set(title="Next-token accuracy", xlabel="mean depth (steps)", ylabel="accuracy")
    step_axes.set(title="Loss when exiting at step t", xlabel="step t", ylabel="loss")
    _draw_exit_bars(exit_axes, models)
    for axes in (loss_axes, accuracy_axes, step_axes, exit_axes):
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    figure.savefig(path, dpi=110)
    return Path(path)


def _draw_depth_curves(axes, models: dict, key: str) -> None:
    """Each model's Q-exit sweep (solid), its hidden-change baseline (dashed; drawn once when
    two models share it, as a tuned gate and its source do) and its fixed exit steps (crosses)."""
    drawn = []
    for index, (role, result) in enumerate(models.items()):
        color = _COLORS(index)
        curve = result["q_exit"]
        x, y = [c["mean_depth"] for c in curve], [c[key] for c in curve]
        axes.plot(x, y, "o-", ms=3, color=color, label=f"{role}: Q-exit")
        baseline = result["hidden_change"]
        if baseline not in drawn:
            drawn.append(baseline)
            x, y = [c["mean_depth"] for c in baseline], [c[key] for c in baseline]
            axes.plot(x, y, "--", lw=1, color=color, label=f"{role}: hidden-state change")
        steps = np.arange(1, result["num_recurrent_steps"] + 1)
        per_step = result[f"{key}_per_step"]
        axes.plot(steps, per_step, "x", color=color, label=f"{role}: exit at step t")


def _draw_exit_bars(axes, models: dict) -> None:
    """Per step: each model's mean exit probability (solid) and the share of tokens that
    Q-exit at the histogram threshold (hatched)."""
    width = 0.8 / (2 * len(models))
    for index, (role, result) in enumerate(models.items()):
        steps = np.arange(1, result["num_recurrent_steps"] + 1)
        histogram = result["q_exit_histogram"]
        offset = (2 * index - len(models)) * width + width / 2
        axes.bar(
            steps + offset,
            result["exit_pdf_mean"],
            width,
            color=_COLORS(index),
            label=f"{role}: mean exit pdf",
        )
        axes.bar(
            steps + offset + width,
            histogram["exit_histogram"],
            width,
            color="white",
            edgecolor=_COLORS(index),
            hatch="//",
            label=f"{role}: Q-exit steps (q={histogram['q']:g})",
        )
    axes.set(title="Exit distribution", xlabel="step t", ylabel="share of tokens")


register_configs()


@hydra.main(config_path=CONFIG_DIR, config_name="evaluate", version_base=None)
def main(raw: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    report = evaluate(OmegaConf.to_object(raw))
    for role, result in report["models"].items():
        logger.info("%s: Q-exit mean loss over depth %.4f", role, result["q_exit_mean_loss"])
    if "comparison" in report:
        logger.info("compare - model: %+.4f", report["comparison"]["mean_loss_difference"])


if __name__ == "__main__":
    main()
