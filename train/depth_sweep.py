"""Task quality by exit step: the depth sweep of ``python -m train.evaluate``.

For each model, each task is scored when every token exits at step t = 1..N (past the trained
T too) and under Q-exit at each threshold:

- held-out tasks (``tasks``, as the training jobs' ``eval.tasks``): exact-match accuracy, all
  exit rules from one teacher-forced pass (``train.validation``);
- lm-evaluation-harness tasks (``harness_tasks``): the task's first metric, one harness run
  per exit rule through the ``looplm`` harness model (``train.harness``).

The result is a task x step table per model (``depth_sweep.json``, ``depth_sweep.md``), a plot
(``depth_sweep.png``), and with two models the second's scores minus the first's.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from data_pipelines.config import DataConfig
from train.validation import EvalSettings, EvalTaskSettings, Validator, eval_problems

_COLORS = colormaps["tab10"]


@dataclasses.dataclass
class SweepSettings:
    """What the depth sweep scores (nothing when both task lists are empty)."""

    tasks: list[EvalTaskSettings] = dataclasses.field(default_factory=list)
    """Held-out tasks, as eval.tasks of a training job (a synthetic one names a data source)."""
    num_items: int = 64
    max_steps: int | None = None
    """Exit steps 1..max_steps (default: the model's T + 2)."""
    thresholds: list[float] = dataclasses.field(default_factory=lambda: [0.5, 0.8, 0.95])
    harness_tasks: list[str] = dataclasses.field(default_factory=list)
    """lm-evaluation-harness task names."""
    harness_include_path: str | None = None
    """A folder of extra harness task YAMLs."""
    harness_limit: int | None = None
    """Documents per harness task (None: all)."""
    batch_size: int = 16


def sweep_problems(settings: SweepSettings, data: DataConfig) -> list[str]:
    p = []
    if settings.max_steps is not None and settings.max_steps < 1:
        p.append(f"sweep.max_steps must be >= 1, got {settings.max_steps}")
    if settings.tasks:
        p += eval_problems(_eval_settings(settings, 0), data)
    if settings.harness_include_path and not Path(settings.harness_include_path).is_dir():
        p.append(f"sweep.harness_include_path: no folder {settings.harness_include_path}")
    return p


def _eval_settings(settings: SweepSettings, extra_steps: int) -> EvalSettings:
    return EvalSettings(
        enabled=True,
        tasks=list(settings.tasks),
        num_items=settings.num_items,
        extra_steps=extra_steps,
        thresholds=list(settings.thresholds),
        batch_size=settings.batch_size,
    )


def sweep_model(model, path: str, settings: SweepSettings, data: DataConfig, out_dir: Path) -> dict:
    """``{task: {"metric", "per_step": [N scores], "q_exit": {q: score}}}`` of one model."""
    t = model.config.total_ut_steps
    n = settings.max_steps or t + 2
    result = {}
    if settings.tasks:
        eval_settings = _eval_settings(settings, max(0, n - t))
        validator = Validator.build(eval_settings, data, out_dir, dp_rank=0, dp_size=1, write=False)
        record = validator.evaluate(model, t)
        for name, task in record["tasks"].items():
            result[name] = {
                "metric": "exact_match",
                "n": task["n"],
                "per_step": task["accuracy_per_step"][:n],
                "q_exit": task["accuracy_q_exit"],
                "q_exit_depth": task["mean_depth_q_exit"],
            }
    if settings.harness_tasks:
        result.update(_harness_sweep(path, t, n, settings))
    return result


def _harness_sweep(path: str, t: int, n: int, settings: SweepSettings) -> dict:
    """One harness run per exit rule, on one loaded model."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from train.harness import LoopLMEval

    lm = LoopLMEval(pretrained=path, batch_size=settings.batch_size, device="cpu")
    manager = TaskManager(include_path=settings.harness_include_path)
    rules = [(f"step {s}", {"exit_at_step": s, "num_steps": max(t, s)}) for s in range(1, n + 1)]
    rules += [(f"q {q}", {"exit_threshold": q, "num_steps": t}) for q in settings.thresholds]
    scores: dict[str, dict] = {}
    base = lm.args
    for rule, exits in rules:
        lm.args = dataclasses.replace(
            base, **{"exit_at_step": None, "exit_threshold": None, **exits}
        )
        out = lm_eval.simple_evaluate(
            model=lm, tasks=list(settings.harness_tasks), task_manager=manager,
            limit=settings.harness_limit, log_samples=False, bootstrap_iters=0,
        )  # fmt: skip
        for task in settings.harness_tasks:
            metric, value = _first_metric(out["results"][task])
            entry = scores.setdefault(task, {"metric": metric, "per_step": [], "q_exit": {}})
            if rule.startswith("step"):
                entry["per_step"].append(value)
            else:
                entry["q_exit"][rule.split()[1]] = value
    lm.args = base
    return scores


def _first_metric(results: dict) -> tuple[str, float]:
    """The task's first numeric metric (``acc,none``, ``exact_match,strict-match``, ...)."""
    for key, value in results.items():
        if (
            "," in key
            and not key.split(",")[0].endswith("_stderr")
            and isinstance(value, float | int)
        ):
            return key, float(value)
    raise ValueError(f"no metric among {sorted(results)}")


def compare(first: dict, second: dict) -> dict:
    """Per shared task: the second model's score minus the first's, by step and threshold."""
    difference = {}
    for task in first.keys() & second.keys():
        a, b = first[task], second[task]
        steps = min(len(a["per_step"]), len(b["per_step"]))
        difference[task] = {
            "per_step": [b["per_step"][i] - a["per_step"][i] for i in range(steps)],
            "q_exit": {q: b["q_exit"][q] - a["q_exit"][q] for q in a["q_exit"] if q in b["q_exit"]},
        }
    return difference


def markdown(sweeps: dict[str, dict], comparison: dict | None) -> str:
    """The task x step table of every model (and the difference)."""
    width = max(len(task["per_step"]) for sweep in sweeps.values() for task in sweep.values())
    thresholds = sorted(
        {q for sweep in sweeps.values() for task in sweep.values() for q in task["q_exit"]}
    )
    header = [
        "model",
        "task",
        "metric",
        *[f"step {s}" for s in range(1, width + 1)],
        *[f"q={q}" for q in thresholds],
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows = [(role, sweep) for role, sweep in sweeps.items()]
    if comparison:
        rows.append(
            ("compare - model", {k: {"metric": "difference", **v} for k, v in comparison.items()})
        )
    for role, sweep in rows:
        for name, task in sweep.items():
            cells = [f"{x:.3f}" for x in task["per_step"]] + [""] * (width - len(task["per_step"]))
            cells += [f"{task['q_exit'][q]:.3f}" if q in task["q_exit"] else "" for q in thresholds]
            lines.append("| " + " | ".join([role, name, task["metric"], *cells]) + " |")
    return "\n".join(lines) + "\n"


def plot(sweeps: dict[str, dict], path: Path) -> Path:
    """A panel per task: score against the exit step, a line per model; Q-exit as points at
    their mean depth where it is known."""
    tasks = list(dict.fromkeys(name for sweep in sweeps.values() for name in sweep))
    columns = min(len(tasks), 3)
    rows = -(-len(tasks) // columns)
    figure = Figure(figsize=(4 * columns + 1, 3.5 * rows + 0.5), layout="constrained")
    FigureCanvasAgg(figure)
    panels = figure.subplots(rows, columns, squeeze=False).ravel()
    for axes, task in zip(panels, tasks, strict=False):
        for index, (role, sweep) in enumerate(sweeps.items()):
            if task not in sweep:
                continue
            entry, color = sweep[task], _COLORS(index)
            steps = range(1, len(entry["per_step"]) + 1)
            axes.plot(steps, entry["per_step"], "o-", color=color, label=f"{role}: exit at step")
            depths = entry.get("q_exit_depth", {})
            for q, value in entry["q_exit"].items():
                if q in depths:
                    axes.plot(depths[q], value, "*", ms=9, color=color)
                    axes.annotate(f"q={q}", (depths[q], value), fontsize="x-small")
        axes.set(title=task, xlabel="exit step (stars: Q-exit at its mean depth)", ylabel="score")
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    for axes in panels[len(tasks) :]:
        axes.set_axis_off()
    figure.savefig(path, dpi=110)
    return path


def write(sweeps: dict[str, dict], out_dir: Path) -> dict:
    """depth_sweep.json, .md and .png; returns the JSON's content."""
    comparison = compare(sweeps["model"], sweeps["compare"]) if len(sweeps) == 2 else None
    report = {"models": sweeps, **({"comparison": comparison} if comparison else {})}
    (out_dir / "depth_sweep.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "depth_sweep.md").write_text(markdown(sweeps, comparison))
    plot(sweeps, out_dir / "depth_sweep.png")
    return report
