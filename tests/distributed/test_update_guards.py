"""The update guards on real runs of 2 gloo ranks: a non-finite loss or gradient on one
rank, a run whose updates are all skipped, a lasting rise of the gradient norm, a loss spike."""

import json

import pytest
import torch

from tests.distributed.launch import (
    bit_equal,
    completed,
    job,
    metrics,
    optimizer_tensors,
    run,
)
from train.export import load_checkpoint_model


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_a_non_finite_loss_or_gradient_on_one_rank_skips_the_update_everywhere(
    tmp_path, cache_dir, zero
):
    run_dir = tmp_path / "run"
    args = job(
        run_dir, cache_dir, f"deepspeed={zero}", "train.max_steps=4", "checkpoint.every_steps=1",
        "checkpoint.keep_last=10", "faults.nan_loss_at_steps=[2]", "faults.nan_grad_at_steps=[3]",
    )  # fmt: skip
    code, out = run("train.pretrain", args, tmp_path / "log")
    assert code == 0, out[-3000:]
    assert [r["skipped"] for r in metrics(run_dir)] == [False, True, True, False]
    steps = [run_dir / "checkpoints" / f"step_{s:08d}" for s in (1, 2, 3, 4)]
    weights = [load_checkpoint_model(p).state_dict() for p in steps]
    optimizer = [optimizer_tensors(p) for p in steps]
    for later in (1, 2):  # after the skipped steps 2 and 3: bit-identical to step 1
        assert all(bit_equal(weights[0][k], weights[later][k]) for k in weights[0])
        assert optimizer[0].keys() == optimizer[later].keys()
        assert all(bit_equal(optimizer[0][k], optimizer[later][k]) for k in optimizer[0])
    assert any(not torch.equal(weights[0][k], weights[3][k]) for k in weights[0])  # step 4 trains


def test_a_run_whose_updates_are_all_skipped_stops_with_an_error(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    args = job(
        run_dir, cache_dir, "train.max_steps=10", "checkpoint.every_steps=2",
        "faults.nan_grad_at_steps=[3,4,5,6,7,8]", "stability.max_consecutive_skips=4",
        "stability.rollback_after=0",
    )  # fmt: skip
    code, out = run("train.pretrain", args, tmp_path / "log")
    assert code != 0
    assert "the last 4 updates (to step 6) were all skipped, the last for: non-finite" in out
    assert [r["skipped"] for r in metrics(run_dir)] == [False, False, True, True, True]
    assert completed(run_dir) == ["step_00000002", "step_00000004"]  # nothing saved after


def test_a_lasting_rise_of_the_gradient_norm_is_skipped_only_for_a_while(tmp_path, cache_dir):
    # Gradients 500x larger (then clipped) from step 30 on, as when an update lands the
    # weights where gradients are large: a skip leaves the weights there, so every later step
    # was a spike too, and the run skipped every update from then on.
    run_dir = tmp_path / "run"
    shifted = ",".join(str(step) for step in range(30, 46))
    args = job(
        run_dir, cache_dir, "train.max_steps=45", "checkpoint.every_steps=45",
        "stability.rollback_after=0", "stability.grad_norm_patience=3",
        "faults.spike_factor=500", f"faults.spike_grad_at_steps=[{shifted}]",
    )  # fmt: skip
    code, out = run("train.pretrain", args, tmp_path / "log")
    assert code == 0, out[-3000:]
    records = metrics(run_dir)
    skipped = [r["step"] for r in records if r["skipped"]]
    assert skipped[:3] == [30, 31, 32] and 33 not in skipped and len(skipped) <= 6, skipped
    assert "step 33: grad_norm" in out and "the (clipped) update proceeds" in out
    assert records[29]["grad_norm"] > 50 * max(r["grad_norm"] for r in records[20:29])
    assert len(records) == 45


def test_a_loss_spike_skips_its_update_and_the_window_is_checkpointed(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    args = job(
        run_dir, cache_dir, "train.max_steps=5", "checkpoint.every_steps=1", "checkpoint.keep_last=10",
        "stability.min_history=2", "stability.window=10", "faults.spike_loss_at_steps=[4]",
    )  # fmt: skip
    code, out = run("train.pretrain", args, tmp_path / "log")
    assert code == 0, out[-3000:]
    records = metrics(run_dir)
    assert [r["skipped"] for r in records] == [False, False, False, True, False]
    assert "the window mean" in records[3]["skip_reason"] and "step 4 skipped" in out
    assert "OVERFLOW" not in out, "DeepSpeed's non-finite notice for a finite, guarded skip"
    states = [
        json.loads((run_dir / f"checkpoints/step_{s:08d}/trainer_state.json").read_text())
        for s in (3, 4)
    ]
    assert states[0]["loss_window"] == states[1]["loss_window"] == [r["loss"] for r in records[:3]]
    before, after = (
        load_checkpoint_model(run_dir / f"checkpoints/step_{s:08d}").state_dict() for s in (3, 4)
    )
    assert all(bit_equal(before[k], after[k]) for k in before)
