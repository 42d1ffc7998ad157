"""Curriculum stages, the rollback guard, the entropy-prior annealer and the recipe's tiny
twins, on real runs (2 gloo ranks unless said otherwise)."""

import json
import math
import subprocess
import sys

import pytest
import torch

from looplm import LoopLMConfig
from tests.distributed.launch import (
    FAST,
    REPO,
    bit_equal,
    completed,
    job,
    metrics,
    optimizer_tensors,
    run,
)
from train.export import export_checkpoint, load_checkpoint_model

# Three stages on 2 ranks x micro batch 2 (256 tokens per pass at seq_len 64, 512 at 128):
# a: T=2, the batch ramps 256 -> 512 tokens; steps of 256, 256, 512, 256 tokens (4 steps).
# b: seq_len 128, T=3, RoPE base 40K, one source only, batch 1024 (2 steps).
# c: only the exit gate trains (2 steps).
STAGES = (
    "curriculum.stages=["
    "{name: a, tokens: 1280, batch_ramp_from: 256, global_batch_tokens: 512,"
    " batch_ramp_tokens: 512, num_recurrent_steps: 2},"
    "{name: b, tokens: 2048, seq_len: 128, global_batch_tokens: 1024, rope_theta: 40000.0,"
    " num_recurrent_steps: 3, weights: {python_stdlib: 1.0}},"
    "{name: c, tokens: 2048, trainable: ['model.early_exit_gate.*']}]"
)
CURRICULUM = [STAGES, "train.max_steps=null"]


def checkpoint(run_dir, step):
    return run_dir / "checkpoints" / f"step_{step:08d}"


@pytest.mark.parametrize("zero", ["zero2", pytest.param("zero3", marks=pytest.mark.smoke)])
def test_stages_switch_at_exact_token_counts_and_resume_exactly_mid_stage_and_at_a_boundary(
    tmp_path, cache_dir, zero
):
    # ZeRO-3 traces the module order to prefetch; the loop depth changing between stages
    # changes that order, which it must survive.
    reference_dir = tmp_path / "reference"
    args = job(reference_dir, cache_dir, *CURRICULUM, f"deepspeed={zero}")
    code, out = run("train.pretrain", args, tmp_path / "r")
    assert code == 0, out[-3000:]
    reference = metrics(reference_dir)
    assert [r["stage"] for r in reference] == ["a"] * 4 + ["b"] * 2 + ["c"] * 2
    assert [r["batch_tokens"] for r in reference] == [256, 256, 512, 256, 1024, 1024, 1024, 1024]
    assert [r["tokens"] for r in reference] == [256, 512, 1024, 1280, 2304, 3328, 4352, 5376]
    assert [len(r["loss_per_step"]) for r in reference] == [2] * 4 + [3] * 4
    assert "entering stage 1 'b' at step 4, 1280 tokens" in out
    # Every stage's end is checkpointed; the model config carries the stage's T and RoPE base.
    assert completed(reference_dir) == ["step_00000004", "step_00000006", "step_00000008"]
    saved = [LoopLMConfig.load(checkpoint(reference_dir, s) / "model_config.json") for s in (4, 8)]
    assert [(c.total_ut_steps, c.rope_theta) for c in saved] == [(2, 10000.0), (3, 40000.0)]

    # Stage c trains only the gate: every other tensor is unchanged, bit for bit.
    before, after = (
        load_checkpoint_model(checkpoint(reference_dir, s)).state_dict() for s in (6, 8)
    )
    gate = {"model.early_exit_gate.weight", "model.early_exit_gate.bias"}
    assert all(bit_equal(before[k], after[k]) for k in before if k not in gate)
    assert all(not torch.equal(before[k], after[k]) for k in gate)
    if zero == "zero3":
        return

    # Stop in the middle of stage a, exactly at its end, inside the gate-only stage c (its
    # checkpoint written with the LM frozen), then run to the end.
    run_dir = tmp_path / "resumed"
    limits = ("train.max_steps=2", "train.max_steps=4", "train.max_steps=7", "train.max_steps=null")
    for limit in limits:
        code, out = run("train.pretrain", job(run_dir, cache_dir, STAGES, limit), tmp_path / "x")
        assert code == 0, out[-3000:]
    resumed = metrics(run_dir)
    assert [r["loss"] for r in resumed] == [r["loss"] for r in reference]  # bit for bit
    assert [r["stage"] for r in resumed] == [r["stage"] for r in reference]
    assert [r["lr"] for r in resumed] == [r["lr"] for r in reference]


def test_repeated_spikes_roll_back_skip_the_window_and_lower_the_lr(tmp_path, cache_dir):
    common = [
        "train.max_steps=9", "checkpoint.every_steps=3", "checkpoint.keep_last=10",
        "schedule=constant", "stability.min_history=2", "stability.rollback_after=2",
        "stability.rollback_within=5", "stability.lr_factor=0.25", "stability.lr_factor_steps=2",
        "stability.grad_norm_rollback=true",
    ]  # fmt: skip
    reference_dir, run_dir = tmp_path / "reference", tmp_path / "run"
    code, out = run("train.pretrain", job(reference_dir, cache_dir, *common), tmp_path / "r")
    assert code == 0, out[-3000:]
    # Step 5's loss spikes, step 6's gradient does: both are skipped, and at the second spike
    # the run returns to the weights of step 3 (step 4 trained after it, so it is undone).
    faults = ["faults.spike_loss_at_steps=[5]", "faults.spike_grad_at_steps=[6]"]
    code, out = run("train.pretrain", job(run_dir, cache_dir, *common, *faults), tmp_path / "x")
    assert code == 0, out[-3000:]
    records = metrics(run_dir)
    assert [r["skipped"] for r in records] == [False] * 4 + [True, True] + [False] * 3
    assert records[4]["skip_reason"].startswith("loss ")
    assert records[5]["skip_reason"].startswith("grad_norm ")
    assert records[5]["rollback"] == {"to_step": 3, "skipped_tokens": 3 * 512, "lr_factor": 0.25}
    assert "rolled back to the weights of step 3" in out
    # The LR is lowered for two steps after the rollback, then back to the schedule's.
    lrs = [r["lr"] for r in records]
    assert lrs[6:8] == [0.25 * lrs[3]] * 2 and lrs[8] == lrs[3]
    # Saved at once after the rollback: the weights and optimizer state of step 3 ...
    assert "step_00000006" in completed(run_dir)
    back, good = checkpoint(run_dir, 6), checkpoint(run_dir, 3)
    w_back, w_good = (load_checkpoint_model(p).state_dict() for p in (back, good))
    assert all(bit_equal(w_back[k], w_good[k]) for k in w_good)
    o_back, o_good = optimizer_tensors(back), optimizer_tensors(good)
    assert all(bit_equal(o_back[k], o_good[k]) for k in o_good if "/state/" in k)
    # ... with the data stream where the uninterrupted run has it after 6 steps: the window
    # of steps 4 to 6 is never trained on again.
    for rank in (0, 1):
        name = f"rank_{rank:05d}.pt"
        data = torch.load(back / name, weights_only=False)["data"]
        expected = torch.load(checkpoint(reference_dir, 6) / name, weights_only=False)["data"]
        assert data == expected
    state = json.loads((back / "trainer_state.json").read_text())
    assert state["guard"]["rollbacks"] == [{"step": 6, "to_step": 3, "skipped_tokens": 1536}]
    assert records[-1]["rollbacks"] == 1 and records[-1]["skipped_steps"] == 2


def test_more_rollbacks_than_allowed_end_the_run_with_a_clear_message(tmp_path, cache_dir):
    args = job(
        tmp_path / "run", cache_dir, "train.max_steps=8", "checkpoint.every_steps=2",
        "stability.min_history=2", "stability.rollback_after=2", "stability.max_rollbacks=0",
        "faults.spike_loss_at_steps=[4,5]",
    )  # fmt: skip
    code, out = run("train.pretrain", args, tmp_path / "log")
    assert code != 0
    assert "1 rollbacks, more than stability.max_rollbacks (0)" in out


def _exit_statistics(run_dir, last: int) -> tuple[float, list[float], list[float]]:
    records = metrics(run_dir)[-last:]
    entropy = sum(r["exit_entropy"] for r in records) / last
    pdf = [sum(r["exit_pdf_mean"][t] for r in records) / last for t in range(4)]
    losses = [sum(r["loss_per_step"][t] for r in records) / last for t in range(4)]
    return entropy, pdf, losses


def test_without_the_entropy_term_the_exit_distribution_collapses(tmp_path, cache_dir):
    """beta = 0 moves the exit mass onto the step with the lowest loss (at scale the last step,
    OURO.md §2; on a tiny CPU run the first, whose loss stays lowest); beta = 0.1 keeps the
    entropy near its maximum log T."""
    statistics = {}
    for beta in (0.0, 0.1):
        run_dir = tmp_path / f"beta_{beta}"
        args = job(
            run_dir, cache_dir, f"train.beta={beta}", "train.max_steps=50",
            "train.micro_batch_size=4", "optim.lr=3e-3", "schedule=constant",
            "schedule.warmup_steps=5", "train.deterministic=false", "checkpoint.every_steps=1000",
        )  # fmt: skip
        code, out = run("train.pretrain", args, tmp_path / f"{beta}.log", nproc=1)
        assert code == 0, out[-3000:]
        statistics[beta] = _exit_statistics(run_dir, last=15)
    entropy, pdf, losses = statistics[0.0]
    best = min(range(4), key=losses.__getitem__)
    assert entropy < 0.35 * math.log(4) and pdf[best] > 0.85
    assert statistics[0.1][0] > 0.75 * math.log(4)


def _eighth_budgets(first: int) -> list[str]:
    """The twins' stages with an eighth of their tokens (stage ``first`` of the 1.4B twin is the
    2.6B twin's stage 0), so that the test takes a minute."""
    budgets = [12288, 8192, 6144, 2048, 4096][first:]
    overrides = [f"curriculum.stages.{i}.tokens={t}" for i, t in enumerate(budgets)]
    overrides.append("curriculum.stages.0.warmup_tokens=2048")
    if first == 0:
        overrides.append("curriculum.stages.0.batch_ramp_tokens=8192")
    return overrides


def test_the_recipe_twins_run_end_to_end_and_branch_by_upcycling(tmp_path, cache_dir):
    small = FAST[1:5]  # the model sizes of the fast runs
    twin_dir = tmp_path / "twin_1.4b"
    args = [
        "experiment=tiny_ouro_1.4b", *small, *_eighth_budgets(0), f"run_dir={twin_dir}",
        f"data.cache_dir={cache_dir}", "logging.wandb=false", "logging.plot_at_end=false",
    ]  # fmt: skip
    code, out = run("train.pretrain", args, tmp_path / "twin.log", timeout=600)
    assert code == 0, out[-3000:]
    records = metrics(twin_dir)
    stages = ["stable_1a", "stable_1b", "ct_annealing", "long_ct", "mid_training"]
    assert list(dict.fromkeys(r["stage"] for r in records)) == stages
    assert records[-1]["tokens"] == 32768
    assert all(math.isfinite(r["loss"]) for r in records)
    assert records[-1]["loss"] < records[0]["loss"] - 1.0
    # Branch at the end of stable_1a: export, upcycle to twice the layers, go on with 1b to 4.
    end_1a = next(r["step"] for r in records if r["stage"] == "stable_1b") - 1
    exported = export_checkpoint(checkpoint(twin_dir, end_1a), tmp_path / "twin_1a")
    assert LoopLMConfig.load(exported / "config.json").total_ut_steps == 8
    upcycled = tmp_path / "twin_2x"
    command = [sys.executable, str(REPO / "scripts/upcycle.py"), str(exported), str(upcycled)]
    subprocess.run([*command, "--factor", "2", "--order", "interleave"], check=True, cwd=REPO)
    branch_dir = tmp_path / "twin_2.6b"
    args = [
        "experiment=tiny_ouro_2.6b", f"init_from={upcycled}", *_eighth_budgets(1),
        f"run_dir={branch_dir}", f"data.cache_dir={cache_dir}", "logging.wandb=false",
        "logging.plot_at_end=false",
    ]  # fmt: skip
    code, out = run("train.pretrain", args, tmp_path / "branch.log", timeout=600)
    assert code == 0, out[-3000:]
    branch = metrics(branch_dir)
    assert list(dict.fromkeys(r["stage"] for r in branch)) == stages[1:]
    final = LoopLMConfig.load(checkpoint(branch_dir, branch[-1]["step"]) / "model_config.json")
    assert (final.num_hidden_layers, final.total_ut_steps, final.rope_theta) == (4, 4, 1e6)
