"""scripts/gpu_check.sh, the prepared GPU validation, run as --dry-run on the CPU: every check
runs its real code at toy sizes and lands in the report, so the script works when a GPU is
lent."""

import json
import subprocess
import sys

import pytest
import torch

from tests.distributed.launch import REPO, environment


def test_the_dry_run_runs_every_check_and_writes_one_report(tmp_path):
    report_path = tmp_path / "report.json"
    done = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--dry-run", "--out", str(report_path)],
        cwd=REPO,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["dry_run"] is True
    gpu_tests = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "tests/gpu"],
        cwd=REPO,
        capture_output=True,
        text=True,
    ).stdout
    collected = sum(1 for line in gpu_tests.splitlines() if "::" in line)
    assert report["tests"]["skipped"] == collected > 0  # no CUDA here: each one skips
    assert report["job_flash"]["skipped"]
    job = report["job_sdpa"]
    assert job["ok"] and job["steps"] == 3 and job["tokens_per_s"] > 0
    compiled = report["job_compiled"]
    assert compiled["ok"] and len(compiled["compiled_graphs"]) == 3
    assert abs(compiled["loss_vs_eager"]) < 1e-4  # float32 in the dry run
    variants = report["mfu"]["variants"]
    assert [(v["compile"], v["checkpointing"]) for v in variants] == [
        (False, False),
        (True, False),
        (False, True),
        (True, True),
    ]
    assert all(v["tokens_per_s"] > 0 and v["estimated_activations_gib"] > 0 for v in variants)
    assert report["mfu"]["mfu_target_met"] is None  # no peak FLOP/s for a CPU
    reproduce = report["reproduce"]  # the driver's job, on the ranks it chose (2 CPU ranks)
    assert reproduce["ok"] and reproduce["steps"] == 3 and reproduce["ranks"] == 2
    hours = 3000 * 8192 / reproduce["tokens_per_s"] / 3600  # the full grid's steps and batch
    assert reproduce["hours_per_depth12_model"] == pytest.approx(hours)
    assert reproduce["grid_hours_estimate"] == pytest.approx(40 * hours)
    assert report["summary"][-1] == (
        "verdicts: tests PASS, job_flash -, job_sdpa PASS, job_compiled PASS, mfu PASS, "
        "reproduce PASS"
    )
    assert "\n".join(report["summary"]) in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
def test_without_a_gpu_it_points_to_the_dry_run(tmp_path):
    done = subprocess.run(
        [sys.executable, "scripts/gpu_check.py", "--out", str(tmp_path / "r.json")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert "no CUDA device here: run with --dry-run" in done.stderr
    assert not (tmp_path / "r.json").exists()
