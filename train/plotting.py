"""PNG charts of a run from its `metrics.jsonl` (one JSON object per optimizer step).

`plot_run` writes four charts into `RUN_DIR/plots/`, and two more when the run evaluated
held-out tasks (`eval.jsonl`, written by `train.validation`):

- `loss.png`: the training loss, the loss when exiting at each recurrent step, and each
  step's loss minus the last step's, smoothed with the raw values faint, stage boundaries
  marked;
- `exit_distribution.png`: the mean exit distribution over recurrent steps, stacked;
- `optimization.png`: learning rate, gradient norm (skipped steps marked) and exit entropy;
- `throughput.png`: tokens per second and, when the job measured it, MFU;
- `eval_accuracy.png`: exact-match accuracy by recurrent step over training, a panel a task;
- `eval_loss.png`: the held-out answer loss of each recurrent step over training.

The number of recurrent steps T may change during a run: a step missing from a record has
no loss (a gap in its line) and exit probability 0. Figures are drawn on matplotlib's Agg
canvas without pyplot, so a training job can call `plot_run` whatever backend it uses.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # matplotlib is imported where a chart is drawn: reading metrics needs none
    from matplotlib.figure import Figure

REQUIRED_KEYS = ("step", "loss", "loss_per_step", "exit_pdf_mean")


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a `metrics.jsonl`, in file order.

    Raises FileNotFoundError for a missing file and ValueError for an empty one, a line that
    is not JSON, or a record lacking one of `REQUIRED_KEYS`. A last line without its newline
    is still being written and is ignored.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}")
    text = path.read_text()
    lines = text.splitlines()
    if lines and not text.endswith("\n"):
        lines.pop()
    records = [
        _parse_line(path, number, line) for number, line in enumerate(lines, 1) if line.strip()
    ]
    if not records:
        raise ValueError(f"{path} holds no records")
    return records


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Draw the charts of the run in `run_dir` into `out_dir` (default `run_dir/plots`) and
    return the paths of the PNG files written."""
    records = read_metrics(Path(run_dir) / "metrics.jsonl")
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    steps = _series(records, "step")
    charts: dict[str, Callable[[Figure, np.ndarray, list[dict]], None]] = {
        "loss": _draw_loss,
        "exit_distribution": _draw_exit_distribution,
        "optimization": _draw_optimization,
        "throughput": _draw_throughput,
    }
    written = [_save(out / f"{name}.png", draw, steps, records) for name, draw in charts.items()]
    evaluations = read_evaluations(Path(run_dir) / "eval.jsonl")
    if evaluations:
        eval_steps = _series(evaluations, "step")
        for name, draw in (("eval_accuracy", _draw_eval_accuracy), ("eval_loss", _draw_eval_loss)):
            written.append(_save(out / f"{name}.png", draw, eval_steps, evaluations))
    return written


def read_evaluations(path: Path) -> list[dict]:
    """The records of a run's `eval.jsonl` (none when the run did not evaluate)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _save(path: Path, draw, steps: np.ndarray, records: list[dict]) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 9 if draw is _draw_loss else 6), layout="constrained")
    FigureCanvasAgg(figure)
    draw(figure, steps, records)
    figure.savefig(path, dpi=110)
    return path


def _parse_line(path: Path, number: int, line: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{number}: not JSON ({error.msg})") from None
    missing = [key for key in REQUIRED_KEYS if not isinstance(record, dict) or key not in record]
    if missing:
        raise ValueError(f"{path}:{number}: the record lacks {missing}")
    return record


def _series(records: list[dict], key: str) -> np.ndarray:
    """One value per record; absent or null values are NaN."""
    return np.array([_number(record.get(key)) for record in records], dtype=float)


def _matrix(records: list[dict], key: str, fill: float) -> np.ndarray:
    """[records, max T] from per-record lists of varying length, padded with `fill`."""
    width = max(len(record[key]) for record in records)
    matrix = np.full((len(records), width), fill)
    for row, record in enumerate(records):
        matrix[row, : len(record[key])] = [_number(value) for value in record[key]]
    return matrix


def _number(value) -> float:
    return math.nan if value is None else float(value)


def _step_colors(count: int) -> list:
    """Recurrent step t gets the same colour in every chart."""
    from matplotlib import colormaps

    colormap = colormaps["viridis"]
    return [colormap(index / max(count - 1, 1)) for index in range(count)]


def smoothing_window(count: int) -> int:
    """Steps averaged per point of a smoothed curve: about a fortieth of the run, odd."""
    return max(1, count // 40) | 1


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average over `window` points (shorter at the ends), skipping NaN; NaN
    where the window holds no number."""
    present = ~np.isnan(values)
    sums = np.concatenate([[0.0], np.cumsum(np.where(present, values, 0.0))])
    counts = np.concatenate([[0], np.cumsum(present)])
    index = np.arange(len(values))
    low = np.clip(index - window // 2, 0, len(values))
    high = np.clip(index + window // 2 + 1, 0, len(values))
    number = counts[high] - counts[low]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (sums[high] - sums[low]) / number
    return np.where(number > 0, mean, np.nan)


def stage_boundaries(records: list[dict]) -> list[tuple[float, str]]:
    """(first optimizer step, name) of every curriculum stage after the first."""
    return [
        (float(record["step"]), str(record["stage"]))
        for previous, record in zip(records, records[1:], strict=False)
        if record.get("stage") is not None and record.get("stage") != previous.get("stage")
    ]


def _mark_stages(axes, records: list[dict], label: bool) -> None:
    for step, name in stage_boundaries(records):
        axes.axvline(step, color="grey", ls=":", lw=1)
        if label:
            axes.annotate(name, (step, 1.0), xycoords=("data", "axes fraction"), fontsize="small",
                          rotation=90, va="top", ha="right", color="grey")  # fmt: skip


def _draw_loss(figure: Figure, steps: np.ndarray, records: list[dict]) -> None:
    """Three panels, smoothed (the raw values faint): the training objective (the gate loss
    in gate tuning) on its own axis; the loss when exiting at each recurrent step; and each
    step's loss minus the last step's, where whether deeper steps help is read at a glance."""
    objective_axes, step_axes, gap_axes = figure.subplots(3, 1, sharex=True)
    window = smoothing_window(len(records))
    gate = "beta" not in records[-1]  # gate tuning records carry no exit-regularizer weight
    objective = _series(records, "loss")
    objective_axes.plot(steps, objective, color="black", lw=0.8, alpha=0.25)
    objective_axes.plot(steps, smooth(objective, window), color="black", lw=1.5)
    name = "Stage II gate loss" if gate else "training loss"
    objective_axes.set(title=f"{name} (smoothed over {window} steps; raw faint)", ylabel=name)
    per_step = _matrix(records, "loss_per_step", math.nan)
    last = np.array([_number(r["loss_per_step"][-1]) for r in records])
    for index, color in enumerate(_step_colors(per_step.shape[1])):
        column = per_step[:, index]
        step_axes.plot(steps, column, color=color, lw=0.6, alpha=0.2)
        step_axes.plot(steps, smooth(column, window), color=color, lw=1.3,
                       label=f"exit at step {index + 1}")  # fmt: skip
        gap_axes.plot(steps, smooth(column - last, window), color=color, lw=1.3)
    step_axes.set(ylabel="LM loss" if gate else "loss", title="Loss when exiting at each step")
    gap_axes.axhline(0.0, color="black", lw=0.8)
    gap_axes.set(ylabel="minus the last step", xlabel="optimizer step",
                 title="Each step's loss minus the last step's (above 0: the last step is better)")  # fmt: skip
    for axes in (objective_axes, step_axes, gap_axes):
        axes.grid(alpha=0.3)
        _mark_stages(axes, records, label=axes is objective_axes)
    step_axes.legend(fontsize="small", loc="upper right")


def _draw_exit_distribution(figure: Figure, steps: np.ndarray, records: list[dict]) -> None:
    axes = figure.subplots()
    pdf = np.nan_to_num(_matrix(records, "exit_pdf_mean", 0.0))
    colors = _step_colors(pdf.shape[1])
    labels = [f"step {index + 1}" for index in range(pdf.shape[1])]
    axes.stackplot(steps, pdf.T, colors=colors, labels=labels, alpha=0.9)
    axes.set(title="Mean exit distribution", xlabel="optimizer step", ylabel="probability")
    axes.set_ylim(0, 1)
    axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small", reverse=True)


def _draw_optimization(figure: Figure, steps: np.ndarray, records: list[dict]) -> None:
    lr_axes, norm_axes, entropy_axes = figure.subplots(3, 1, sharex=True)
    lr_axes.plot(steps, _series(records, "lr"), color="tab:blue")
    lr_axes.set(title="Optimization", ylabel="learning rate")
    lr_axes.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    grad_norm = _series(records, "grad_norm")
    norm_axes.plot(steps, grad_norm, color="tab:orange", lw=1)
    skipped = np.array([bool(record.get("skipped")) for record in records])
    if skipped.any():
        norm_axes.plot(steps[skipped], grad_norm[skipped], "rx", label="skipped step")
        norm_axes.legend(fontsize="small")
    norm_axes.set(ylabel="gradient norm")
    entropy_axes.plot(steps, _series(records, "exit_entropy"), color="tab:green")
    entropy_axes.set(ylabel="exit entropy (nats)", xlabel="optimizer step")
    for axes in (lr_axes, norm_axes, entropy_axes):
        axes.grid(alpha=0.3)
        _mark_stages(axes, records, label=axes is lr_axes)


def _draw_throughput(figure: Figure, steps: np.ndarray, records: list[dict]) -> None:
    mfu = _series(records, "mfu")
    has_mfu = not np.isnan(mfu).all()
    rows = figure.subplots(2 if has_mfu else 1, 1, sharex=True, squeeze=False)[:, 0]
    rows[0].plot(steps, _series(records, "tokens_per_s"), color="tab:purple")
    rows[0].set(title="Throughput", ylabel="tokens / s")
    if has_mfu:
        rows[1].plot(steps, 100 * mfu, color="tab:red")
        rows[1].set(ylabel="MFU (%)")
    rows[-1].set(xlabel="optimizer step")
    for axes in rows:
        axes.grid(alpha=0.3)


def _draw_eval_accuracy(figure: Figure, steps: np.ndarray, records: list[dict]) -> None:
    """One panel per task: exact-match accuracy when exiting at each recurrent step (dashed:
    steps beyond the trained T), over training."""
    tasks = list(records[-1]["tasks"])
    columns = min(len(tasks), 3)
    rows = math.ceil(len(tasks) / columns)
    panels = np.atleast_1d(figure.subplots(rows, columns, squeeze=False).ravel())
    for axes, task in zip(panels, tasks, strict=False):
        present = [r for r in records if task in r["tasks"]]
        xs = np.array([r["step"] for r in present], dtype=float)
        accuracy = _matrix([r["tasks"][task] for r in present], "accuracy_per_step", math.nan)
        trained = max(len(r["loss_per_step"]) for r in present)
        for index, color in enumerate(_step_colors(accuracy.shape[1])):
            style = "-" if index < trained else "--"
            axes.plot(
                xs, accuracy[:, index], style, color=color, marker=".", label=f"step {index + 1}"
            )
        axes.set(title=f"{task} (n={present[-1]['tasks'][task]['n']})", xlabel="optimizer step")
        axes.set(ylabel="exact match", ylim=(-0.02, 1.02))
        axes.grid(alpha=0.3)
    for axes in panels[len(tasks) :]:
        axes.set_axis_off()
    panels[0].legend(fontsize="small")
    figure.suptitle("Held-out accuracy by recurrent step (dashed: beyond the trained T)")


def _draw_eval_loss(figure: Figure, steps: np.ndarray, records: list[dict]) -> None:
    """Held-out answer loss at each recurrent step, over training."""
    axes = figure.subplots()
    combined = [{"loss": r["loss_per_step"] + r.get("loss_extra_steps", [])} for r in records]
    losses = _matrix(combined, "loss", math.nan)
    trained = max(len(r["loss_per_step"]) for r in records)
    for index, color in enumerate(_step_colors(losses.shape[1])):
        style = "-" if index < trained else "--"
        axes.plot(
            steps,
            losses[:, index],
            style,
            color=color,
            marker=".",
            label=f"exit at step {index + 1}",
        )
    axes.set(title="Held-out answer loss per recurrent step (dashed: beyond the trained T)")
    axes.set(xlabel="optimizer step", ylabel="loss")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
