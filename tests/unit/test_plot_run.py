import importlib.util
import json
import math
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from matplotlib.figure import Figure

from train.plotting import (
    _draw_loss,
    plot_run,
    read_metrics,
    smooth,
    smoothing_window,
    stage_boundaries,
)

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "plot_run.py"
CHARTS = ["loss.png", "exit_distribution.png", "optimization.png", "throughput.png"]


def _record(step: int, num_steps: int) -> dict:
    weights = [math.exp(-t) for t in range(num_steps)]
    pdf = [w / sum(weights) for w in weights]
    per_step = [4.0 / (1 + 0.01 * step) + 0.3 * (num_steps - t) for t in range(num_steps)]
    return {
        "step": step,
        "tokens": step * 4096,
        "loss": sum(p * loss for p, loss in zip(pdf, per_step, strict=True)),
        "loss_per_step": per_step,
        "exit_pdf_mean": pdf,
        "exit_entropy": -sum(p * math.log(p) for p in pdf),
        "beta": 0.1,
        "grad_norm": None if step == 7 else 1.0 / math.sqrt(step),
        "lr": 3e-4 * min(1.0, step / 10),
        "skipped": step == 25,
        "tokens_per_s": 12_000.0 + step,
        "mfu": None if step < 5 else 0.41,
    }


def _write_run(run_dir: Path, records: list[dict]) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "metrics.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def _load_script():
    spec = importlib.util.spec_from_file_location("plot_run_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_charts_are_drawn_when_the_number_of_recurrent_steps_changes(tmp_path):
    records = [_record(step, 2 if step <= 20 else 4) for step in range(1, 41)]
    _write_run(tmp_path, records)
    paths = plot_run(tmp_path)
    assert [path.name for path in paths] == CHARTS
    for path in paths:
        assert path.parent == tmp_path / "plots"
        assert path.stat().st_size > 10_000
        pixels = matplotlib.image.imread(path)
        assert pixels.shape[0] > 300 and pixels.shape[1] > 500
        assert pixels.std() > 0.01, f"{path.name} is blank"


def test_cli_writes_into_out_and_prints_the_paths(tmp_path, capsys):
    _write_run(tmp_path / "run", [_record(step, 4) for step in range(1, 6)])
    assert _load_script().main([str(tmp_path / "run"), "--out", str(tmp_path / "charts")]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / "charts" / name) for name in CHARTS]
    assert all(Path(path).is_file() for path in printed)


def test_cli_reports_a_missing_metrics_file(tmp_path, capsys):
    assert _load_script().main([str(tmp_path)]) == 1
    assert f"error: no metrics file at {tmp_path / 'metrics.jsonl'}" in capsys.readouterr().err


def test_an_empty_metrics_file_is_an_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="holds no records"):
        plot_run(tmp_path)


def test_bad_lines_are_named_and_a_line_being_written_is_ignored(tmp_path):
    path = _write_run(tmp_path, [_record(1, 2), _record(2, 2)])
    with open(path, "a") as file:
        file.write('{"step": 3, "lo')
    assert [record["step"] for record in read_metrics(path)] == [1, 2]
    path.write_text(json.dumps(_record(1, 2)) + "\n{not json}\n" + json.dumps({"step": 3}) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not JSON"):
        read_metrics(path)
    path.write_text(json.dumps({"step": 3, "loss": 1.0}) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:1: the record lacks \['loss_per_step'"):
        read_metrics(path)


def _evaluation(step: int, num_steps: int) -> dict:
    extra = 2
    task = {
        "n": 16,
        "accuracy_per_step": [
            min(1.0, step / 40 * (t + 1) / num_steps) for t in range(num_steps + extra)
        ],
        "accuracy_q_exit": {"0.5": 0.25},
        "mean_depth_q_exit": {"0.5": 2.5},
    }
    return {
        "step": step,
        "loss_per_step": [3.0 - 0.01 * step - 0.1 * t for t in range(num_steps)],
        "loss_extra_steps": [2.5] * extra,
        "tasks": {"mano": task, "reachability": task},
    }


def test_evaluations_get_their_accuracy_and_loss_charts(tmp_path):
    _write_run(tmp_path, [_record(step, 4) for step in range(1, 41)])
    evaluations = [_evaluation(step, 2 if step <= 20 else 4) for step in (10, 20, 30, 40)]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evaluations))
    paths = plot_run(tmp_path)
    assert [path.name for path in paths] == [*CHARTS, "eval_accuracy.png", "eval_loss.png"]
    for path in paths[-2:]:
        assert matplotlib.image.imread(path).std() > 0.01, f"{path.name} is blank"


def test_smoothing_is_a_centred_moving_average_that_skips_gaps():
    values = np.array([1.0, 2.0, math.nan, 4.0, 8.0, math.nan, math.nan, math.nan, 3.0])
    expected = []
    for index in range(len(values)):
        window = [v for v in values[max(0, index - 1) : index + 2] if not math.isnan(v)]
        expected.append(sum(window) / len(window) if window else math.nan)
    np.testing.assert_allclose(smooth(values, 3), expected, equal_nan=True)
    assert smoothing_window(10) == 1 and smoothing_window(400) == 11


def test_the_loss_chart_shows_the_depth_gap_and_the_stage_boundaries(tmp_path):
    records = [_record(step, 4) | {"stage": "a" if step <= 30 else "b"} for step in range(1, 81)]
    figure = Figure()
    _draw_loss(figure, np.arange(1.0, 81.0), records)
    objective, per_step, gap = figure.axes
    assert "training loss" in objective.get_title()
    window = smoothing_window(len(records))
    first, last = (np.array([r["loss_per_step"][i] for r in records]) for i in (0, -1))
    gap_of_step_1 = [line for line in gap.get_lines() if line.get_color() != "black"][0]
    np.testing.assert_allclose(gap_of_step_1.get_ydata(), smooth(first - last, window))
    assert (gap_of_step_1.get_ydata() > 0).all(), "step 1 is worse than the last in the data"
    assert stage_boundaries(records) == [(31.0, "b")]
    dotted = [line for line in gap.get_lines() if line.get_linestyle() == ":"]
    assert [line.get_xdata()[0] for line in dotted] == [31.0]


def test_gate_tuning_keeps_its_gate_loss_off_the_lm_loss_axis(tmp_path):
    records = [{k: v for k, v in _record(step, 4).items() if k != "beta"} for step in range(1, 30)]
    figure = Figure()
    _draw_loss(figure, np.arange(1.0, 30.0), records)
    assert "Stage II gate loss" in figure.axes[0].get_title()
    assert figure.axes[1].get_ylabel() == "LM loss"
