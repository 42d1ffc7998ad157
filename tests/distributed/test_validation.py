"""Evaluation inside the pre-training job on 2 gloo ranks: split over ranks and reduced, equal
to one process scoring the same checkpoint, exact across a kill and resume."""

import pytest
import torch
from omegaconf import OmegaConf

from tests.distributed.launch import (
    dump_stacks,
    job,
    kill_job,
    metrics,
    run,
    start,
    wait_paused,
)
from train.config import PretrainConfig
from train.export import load_checkpoint_model
from train.validation import Validator, read_records

EVAL = [
    "deepspeed.precision=fp32",
    "eval=embedded",
    "eval.num_items=6",
    "eval.batch_size=4",
    "eval.thresholds=[0.5,0.9]",
]


def _single_process_evaluation(run_dir, num_steps: int) -> dict:
    """The run's held-out tasks scored in this process on its last checkpoint."""
    cfg = OmegaConf.to_object(
        OmegaConf.merge(
            OmegaConf.structured(PretrainConfig), OmegaConf.load(run_dir / "config.yaml")
        )
    )
    validator = Validator.build(cfg.eval, cfg.data, run_dir, dp_rank=0, dp_size=1, write=False)
    return validator.evaluate(load_checkpoint_model(run_dir).eval(), num_steps)


def _assert_same_scores(got: dict, want: dict) -> None:
    assert got["tasks"].keys() == want["tasks"].keys()
    for name, task in got["tasks"].items():
        for key in ("n", "accuracy_per_step", "accuracy_q_exit"):
            assert task[key] == want["tasks"][name][key], (name, key)
        for q, depth in task["mean_depth_q_exit"].items():
            assert depth == pytest.approx(want["tasks"][name]["mean_depth_q_exit"][q], rel=1e-6)
    for key in ("loss_per_step", "loss_extra_steps", "exit_pdf_mean"):
        torch.testing.assert_close(
            torch.tensor(got[key]), torch.tensor(want[key]), rtol=1e-4, atol=1e-6
        )


@pytest.mark.parametrize(
    "variant",
    [["deepspeed=zero3"], ["deepspeed.sequence_parallel_size=2"]],
    ids=["zero3", "sequence_parallel"],
)
def test_the_evaluation_split_over_ranks_equals_one_process(tmp_path, cache_dir, variant):
    run_dir = tmp_path / "run"
    args = job(run_dir, cache_dir, *EVAL, *variant, "train.max_steps=3", "eval.every_steps=2")
    code, out = run("train.pretrain", args, tmp_path / "log")
    assert code == 0, out[-3000:]
    records = read_records(run_dir)
    assert [r["step"] for r in records] == [2, 3]  # every 2 steps and at the end
    assert "eval step 3: loss/step" in out
    last = records[-1]
    assert len(last["loss_per_step"]) == 4 and len(last["loss_extra_steps"]) == 2
    for task in last["tasks"].values():
        assert task["n"] == 6 and len(task["accuracy_per_step"]) == 6
    _assert_same_scores(last, _single_process_evaluation(run_dir, 4))


def test_kill_and_resume_with_evaluation_on_is_exact_and_evaluates_each_step_once(
    tmp_path, cache_dir
):
    steps = ["deepspeed.precision=fp32", "train.max_steps=4", "checkpoint.every_steps=2"]
    reference_dir = tmp_path / "reference"  # evaluation off: it must not change training
    code, out = run("train.pretrain", job(reference_dir, cache_dir, *steps), tmp_path / "ref.log")
    assert code == 0, out[-3000:]

    run_dir = tmp_path / "run"
    evaluated = [*steps, *EVAL, "eval.every_steps=1"]
    # Killed after step 3: its evaluation is written, the newest checkpoint is step 2's.
    log = tmp_path / "a.log"
    process = start(
        "train.pretrain", job(run_dir, cache_dir, *evaluated, "faults.pause_after_step=3"), log
    )
    try:
        wait_paused(log, process)
        # A job that seems stuck shows where each rank waits, and goes on.
        dump_stacks(process)
        assert process.poll() is None
        assert log.read_text().count("in pause_after") == 2, log.read_text()[-5000:]
    finally:
        kill_job(process)
    assert [r["step"] for r in read_records(run_dir)] == [1, 2, 3]
    code, out = run("train.pretrain", job(run_dir, cache_dir, *evaluated), tmp_path / "b.log")
    assert code == 0, out[-3000:]
    assert [r["loss"] for r in metrics(run_dir)] == [r["loss"] for r in metrics(reference_dir)]
    records = read_records(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    _assert_same_scores(records[-1], _single_process_evaluation(run_dir, 4))
