"""MFU counts the loops: T times the layer, head and attention FLOPs."""

import pytest

from looplm import LoopLMConfig, Objective
from train.metrics import step_flops_per_token, training_flops_per_token


def hand_count(cfg: LoopLMConfig, seq_len: int, steps: int) -> float:
    """Forward + backward = 3 x forward; a matmul of a [1, a] row by [a, b] costs 2ab."""
    d = cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    projections = 2 * (cfg.hidden_size * q + 2 * cfg.hidden_size * kv + q * cfg.hidden_size)
    mlp = 2 * 3 * cfg.hidden_size * cfg.intermediate_size
    # Scores and weighted values against the causal half of the sequence on average.
    attention = 2 * 2 * q * seq_len / 2
    head_and_gate = 2 * (cfg.vocab_size * cfg.hidden_size + cfg.hidden_size)
    per_step = cfg.num_hidden_layers * (projections + mlp + attention) + head_and_gate
    return 3 * steps * per_step


@pytest.mark.parametrize("preset", ["ouro-1.4b", "tiny"])
@pytest.mark.parametrize("steps", [1, 4, 8])
def test_flops_per_token_count_every_loop(preset, steps):
    cfg = LoopLMConfig.from_preset(preset)
    assert training_flops_per_token(cfg, 4096, steps) == pytest.approx(hand_count(cfg, 4096, steps))


def test_ouro_1_4b_at_4k_costs_about_four_dense_models():
    cfg = LoopLMConfig.from_preset("ouro-1.4b")
    looped = training_flops_per_token(cfg, 4096, 4)
    dense = training_flops_per_token(cfg, 4096, 1)
    assert looped == pytest.approx(4 * dense)
    # 6 x parameters x T plus attention: about 36 GFLOP per token for the released model.
    assert 3.3e10 < looped < 4.0e10


@pytest.mark.parametrize("kind", ["stage1", "last_step", "stage2"])
def test_a_steps_flops_come_from_its_objective(kind):
    """Stage II runs the frozen LM forward only: one of the three forward-equivalents of a
    training step."""
    cfg = LoopLMConfig.from_preset("tiny")
    flops = step_flops_per_token(cfg, 1024, 4, Objective(kind=kind))
    passes = 1 if kind == "stage2" else 3
    assert flops == pytest.approx(hand_count(cfg, 1024, 4) * passes / 3)
