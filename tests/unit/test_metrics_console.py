"""The progress line (losses averaged since the last line, ETA from the recent pace) and the
wandb keys of recurrent steps, with wandb itself in offline mode."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from train.metrics import MetricsLogger
from train.trainer import same_depth_tail


def record(step: int, loss: float, steps: int = 4) -> dict:
    return {
        "step": step,
        "loss": loss,
        "loss_per_step": [loss + t for t in range(steps)],
        "exit_pdf_mean": [1.0 / steps] * steps,
        "exit_entropy": 0.5,
        "lr": 1e-3,
        "grad_norm": 1.0,
        "tokens_per_s": 100.0,
    }


def test_progress_lines_average_the_steps_since_the_last_line(tmp_path, capsys):
    metrics = MetricsLogger(tmp_path, True, resume_step=0, log_every=3, max_steps=9)
    for step, loss in enumerate([9.0, 1.0, 2.0, 6.0, 4.0, 5.0, 7.0], start=1):
        metrics.log(record(step, loss))
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("step 1/9  loss 9.0000 [9.000 10.000 11.000 12.000]")
    assert lines[0].endswith("eta (measuring)")
    assert lines[1].startswith("step 3/9  loss 1.5000 (mean of 2) [1.500 2.500 3.500 4.500]")
    assert lines[2].startswith("step 6/9  loss 5.0000 (mean of 3) [5.000 6.000")
    assert " eta " in lines[2] and len(lines) == 3


def test_wandb_keys_of_steps_the_loop_no_longer_runs_become_nan(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    metrics = MetricsLogger(tmp_path, True, resume_step=0, log_every=1, max_steps=3)
    metrics.attach_wandb(tmp_path, "looplm-test", "offline", {})
    for step, steps in ((1, 4), (2, 2), (3, 2)):  # wandb commits a step when the next comes
        metrics.log(record(step, 1.0, steps))
    summary = metrics.wandb.summary
    assert summary["exit_pdf_mean/2"] == 0.5 and math.isnan(summary["exit_pdf_mean/4"])
    assert math.isnan(summary["loss_per_step/3"])
    metrics.close()
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_a_change_of_depth_between_lines_averages_only_the_steps_that_ran_alike(tmp_path, capsys):
    metrics = MetricsLogger(tmp_path, True, resume_step=0, log_every=3, max_steps=9)
    for step, (loss, steps) in enumerate([(1.0, 2), (2.0, 2), (4.0, 3)], start=1):
        metrics.log(record(step, loss, steps))
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("step 3/9  loss 3.0000 (mean of 2) [4.000 5.000 6.000]")
    records = [record(1, 1.0, 2), record(2, 2.0, 3), record(3, 3.0, 3)]
    assert [r["step"] for r in same_depth_tail(records)] == [2, 3]


@pytest.mark.skipif(torch.cuda.is_available(), reason="DeepSpeed finds the GPU: no CPU notice")
def test_deepspeed_s_cpu_notice_is_dropped_and_its_other_warnings_are_kept():
    """Without a GPU, DeepSpeed warns on import that it chose the CPU; the jobs (whose package
    is imported first) drop that one line and keep the rest of DeepSpeed's warnings."""
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    say = "import logging; logging.getLogger('DeepSpeed').warning('another warning')"

    def output(code: str) -> str:
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
        )
        return done.stdout + done.stderr

    notice = "Setting accelerator to CPU. If you have GPU or other accelerator"
    assert notice in output(f"import deepspeed; {say}")  # DeepSpeed alone
    quiet = output(f"import train, deepspeed; {say}")
    assert notice not in quiet and "another warning" in quiet
