"""The evaluation job: exit rules on hand-made per-token results, curve interpolation, and the
report and plot of a run on two tiny models that share their LM."""

import json
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from looplm import LoopLMConfig, LoopLMForCausalLM
from train.evaluate import (
    EvaluateConfig,
    TokenStats,
    evaluate,
    exit_result,
    hidden_change_exit_steps,
    loss_at_depths,
    mean_loss_over_depth,
    q_exit_sweep,
    token_stats,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def hand_made_stats() -> TokenStats:
    """T = 3, two tokens: token 0 gains from depth, token 1 does not."""
    return TokenStats(
        loss_TN=torch.tensor([[2.0, 1.0], [1.0, 1.2], [0.5, 1.4]]),
        correct_TN=torch.tensor([[False, True], [True, True], [True, False]]),
        # lambda: token 0: 0.5, 0.5, -; token 1: 0.9 at once.
        gate_logits_NT=torch.tensor([[0.0, 0.0, 0.0], [math.log(9.0), 0.0, 0.0]]),
        hidden_change_TN=torch.tensor([[0.30, 0.05], [0.02, 0.04]]),
    )


def test_q_exit_sweep_by_hand():
    stats = hand_made_stats()
    # CDF: token 0: 0.5, 0.75, 1; token 1: 0.9, 0.95, 1.
    curve = q_exit_sweep(stats, [0.0, 0.6, 0.8, 0.92, 1.0])
    exits = [[0, 0], [1, 0], [2, 0], [2, 1], [2, 2]]
    for point, steps in zip(curve, exits, strict=True):
        expected = exit_result(stats, torch.tensor(steps))
        assert {k: point[k] for k in expected} == expected
        assert point["mean_depth"] == pytest.approx(sum(steps) / 2 + 1)
        histogram = [steps.count(t) / 2 for t in range(3)]
        assert point["exit_histogram"] == histogram
    assert curve[1]["loss"] == pytest.approx((1.0 + 1.0) / 2)
    assert curve[1]["accuracy"] == 1.0
    assert curve[1]["perplexity"] == pytest.approx(math.e)


def test_hidden_change_rule_by_hand():
    change = hand_made_stats().hidden_change_TN  # steps 2 and 3
    assert hidden_change_exit_steps(change, 0.0).tolist() == [2, 2]
    assert hidden_change_exit_steps(change, 0.03).tolist() == [2, 2]
    assert hidden_change_exit_steps(change, 0.06).tolist() == [2, 1]
    assert hidden_change_exit_steps(change, 1.0).tolist() == [1, 1]
    assert hidden_change_exit_steps(torch.tensor([[0.1], [0.01]]), 0.05).tolist() == [2]
    assert hidden_change_exit_steps(torch.zeros(0, 3), 1.0).tolist() == [0, 0, 0]


def test_loss_at_depths_interpolates_and_clamps():
    curve = [
        {"mean_depth": 1.0, "loss": 3.0},
        {"mean_depth": 1.0, "loss": 3.0},
        {"mean_depth": 2.0, "loss": 2.0},
        {"mean_depth": 3.0, "loss": 1.5},
    ]
    assert loss_at_depths(curve, [1.0, 1.5, 2.5, 3.0, 4.0]) == [3.0, 2.5, 1.75, 1.5, 1.5]
    # (2.5 + 1.75) / 2 over [1, 3]:
    assert mean_loss_over_depth(curve, 3) == pytest.approx(2.125, abs=1e-12)


def composed(*overrides: str) -> EvaluateConfig:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        raw = compose("evaluate", overrides=list(overrides))
    return OmegaConf.to_object(raw)


def random_batches(vocab: int, count: int = 2) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        ids = torch.randint(0, vocab, (2, 12), generator=gen)
        labels = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
        position_ids = torch.arange(12).expand(2, 12)
        batches.append({"input_ids": ids, "labels": labels, "position_ids": position_ids})
    return batches


def test_token_stats_agree_with_the_model_forward():
    torch.manual_seed(0)
    config = LoopLMConfig.from_preset("tiny", vocab_size=64, hidden_size=32, intermediate_size=64)
    model = LoopLMForCausalLM(config).eval()
    batch = random_batches(64, 1)[0]
    stats = token_stats(model, [batch], num_steps=3, chunk_tokens=5)
    out = model(batch["input_ids"], num_steps=3, return_all_steps=True)
    keep = batch["labels"] != -100
    log_probs = torch.log_softmax(out.step_logits.double(), -1)
    targets = batch["labels"].clamp(min=0)[None, ..., None].expand(3, -1, -1, 1)
    expected = -log_probs.gather(-1, targets).squeeze(-1)[:, keep]
    torch.testing.assert_close(stats.loss_TN.double(), expected, atol=1e-5, rtol=0)
    assert torch.equal(stats.correct_TN, (out.step_logits.argmax(-1) == batch["labels"])[:, keep])
    assert torch.equal(stats.gate_logits_NT, out.gate_logits[keep].float())
    assert (
        stats.hidden_change_TN.shape == (2, int(keep.sum())) and (stats.hidden_change_TN > 0).all()
    )


def test_the_report_and_plot_of_two_models(tmp_path):
    torch.manual_seed(0)
    config = LoopLMConfig.from_preset("tiny", vocab_size=64, hidden_size=32, intermediate_size=64)
    model = LoopLMForCausalLM(config)
    model.save_pretrained(tmp_path / "a")
    with torch.no_grad():
        model.model.early_exit_gate.weight.normal_(std=0.1)
    model.save_pretrained(tmp_path / "b")
    cfg = composed(
        f"model_path={tmp_path / 'a'}", f"compare_path={tmp_path / 'b'}", f"out_dir={tmp_path}/e"
    )
    assert cfg.data.seed != 0, "held out: not the training stream"
    report = evaluate(cfg, random_batches(64))

    written = json.loads((tmp_path / "e/evaluation.json").read_text())
    assert written == json.loads(json.dumps(report))
    assert (tmp_path / "e/evaluation.png").stat().st_size > 10_000
    assert set(written) == {"config", "models", "comparison"}
    a, b = written["models"]["model"], written["models"]["compare"]
    assert a["loss_per_step"] == b["loss_per_step"], "the LM is the same"
    assert a["exit_pdf_mean"] != b["exit_pdf_mean"]
    for result in (a, b):
        assert result["num_recurrent_steps"] == 4 and result["num_tokens"] == 2 * 2 * 11
        assert [math.exp(x) for x in result["loss_per_step"]] == pytest.approx(
            result["perplexity_per_step"]
        )
        assert sum(result["exit_pdf_mean"]) == pytest.approx(1.0)
        curve = result["q_exit"]
        assert [c["q"] for c in curve] == pytest.approx([i / 10 for i in range(11)])
        depths = [c["mean_depth"] for c in curve]
        assert depths == sorted(depths) and depths[0] == 1.0 and depths[-1] == 4.0
        assert curve[0]["loss"] == pytest.approx(result["loss_per_step"][0])
        assert curve[-1]["loss"] == pytest.approx(result["loss_per_step"][-1])
        assert all(sum(c["exit_histogram"]) == pytest.approx(1.0) for c in curve)
        assert result["q_exit_histogram"]["q"] == cfg.histogram_q
        baseline = result["hidden_change"]
        assert len(baseline) == cfg.num_eps
        assert baseline[0]["mean_depth"] == 4.0 and baseline[-1]["mean_depth"] == 2.0
        depths = [c["mean_depth"] for c in baseline]
        assert depths == sorted(depths, reverse=True), "a larger eps exits earlier"
        assert len(result["q_exit_loss_at_depth"]) == len(result["depths"]) == 7
    assert written["comparison"]["depths"] == a["depths"]
    assert written["comparison"]["mean_loss_difference"] == pytest.approx(
        b["q_exit_mean_loss"] - a["q_exit_mean_loss"]
    )
