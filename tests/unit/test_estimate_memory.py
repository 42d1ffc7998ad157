"""The memory estimate (train/memory.py, scripts/estimate_memory.py) against numbers computed
by hand and a measured CPU run."""

import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest

import train.memory as em
from looplm import LoopLMConfig

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "estimate_memory.py"
_spec = importlib.util.spec_from_file_location("estimate_memory", SCRIPT)
script = importlib.util.module_from_spec(_spec)
sys.modules["estimate_memory"] = script
_spec.loader.exec_module(script)

GIB = 2**30
OURO_1_4B_PARAMETERS = 1_434_652_673  # OURO.md §1
OURO_2_6B_PARAMETERS = 2_667_974_657


def ouro(name: str) -> LoopLMConfig:
    return LoopLMConfig.from_preset(name)


def test_ouro_1_4b_at_32k_on_8_gpus_by_hand():
    setup = em.Setup(config=ouro("ouro-1.4b"), seq_len=32768, zero_stage=2, data_parallel=8)
    e = em.estimate(setup)
    p, n = OURO_1_4B_PARAMETERS, 8
    assert e.weights == 2 * p
    assert e.gradients == 2 * p // n
    assert e.optimizer == 16 * p // n
    assert e.zero3_gathered == 0
    assert e.buckets == 2 * 50_000_000 * 2
    s, h, q, i, v, layers, steps = 32768, 2048, 2048, 5632, 49152, 24, 4
    layer_inputs = steps * layers * s * h * 2
    last_and_head_grads = (1 + steps) * s * h * 2
    rope = 2 * s * 128 * 2
    per_token = 24 * h + 2 * (2 * h + 3 * q + 2 * q + 4 * i)  # MHA: k' = K = Q
    layer_params = 4 * h * h + 3 * h * i + 4 * h
    backward = s * (per_token + 8 * h) + (layers * layer_params + h * i) * 2
    chunk = 134217728 // (4 * v)
    assert backward > 4 * v * h + 8 * chunk * v
    assert e.activations == layer_inputs + last_and_head_grads + rope + backward
    assert e.activations == 20_625_883_136  # 19.2 GiB
    assert e.total == e.activations + 2 * p + 2 * p // n + 16 * p // n + 2 * 10**8 + 2 * GIB


@pytest.mark.parametrize(
    "stage, offload, weights, gradients, optimizer",
    [
        (0, False, 2, 2, 16),
        (1, False, 2, 2, 16 / 4),
        (2, False, 2, 2 / 4, 16 / 4),
        (3, False, 2 / 4, 2 / 4, 16 / 4),
        (2, True, 2, 0, 0),
        (3, True, 0, 0, 0),
    ],
)
def test_model_states_per_zero_stage(stage, offload, weights, gradients, optimizer):
    setup = em.Setup(
        config=ouro("ouro-2.6b"),
        seq_len=4096,
        zero_stage=stage,
        data_parallel=2,
        sequence_parallel=2,  # ZeRO shards over dp x sp = 4 ranks
        offload_optimizer=offload,
        offload_param=offload and stage == 3,
    )
    e = em.estimate(setup)
    p = OURO_2_6B_PARAMETERS
    assert e.weights == int(weights * p)
    assert e.gradients == int(gradients * p)
    assert e.optimizer == int(optimizer * p)
    assert (e.zero3_gathered > 0) == (stage == 3)


def test_a_model_smaller_than_the_bucket_setting_is_its_own_bucket():
    config = LoopLMConfig.from_preset("tiny")
    e = em.estimate(em.Setup(config=config, seq_len=256, zero_stage=2, data_parallel=2))
    assert e.buckets == 2 * config.num_parameters() * 2 < 2 * 50_000_000 * 2


def test_sequence_parallelism_divides_the_activations_per_rank():
    one = em.Setup(config=ouro("ouro-1.4b"), seq_len=65536)
    terms = em.activation_terms(one)
    split = em.activation_terms(dataclasses.replace(one, sequence_parallel=4))
    assert split["layer_inputs"] * 4 == terms["layer_inputs"]
    assert split["last_output_and_head_grads"] * 4 == terms["last_output_and_head_grads"]


def test_the_largest_micro_batch_is_the_boundary():
    setup = em.Setup(config=ouro("ouro-1.4b"), seq_len=32768, data_parallel=8)
    _, largest = em.check_fits(setup)
    assert largest == 4
    assert em.fits(dataclasses.replace(setup, micro_batch_size=largest))
    assert not em.fits(dataclasses.replace(setup, micro_batch_size=largest + 1))


def test_64k_on_one_gpu_without_sequence_parallelism_is_a_clear_error():
    setup = em.Setup(config=ouro("ouro-2.6b"), seq_len=65536, gpu_memory_gib=80)
    with pytest.raises(em.DoesNotFit, match="sequence parallelism over 2 ranks") as error:
        em.check_fits(setup)
    assert "65536 tokens per sequence do not fit" in str(error.value)
    _, largest = em.check_fits(dataclasses.replace(setup, sequence_parallel=2))
    assert largest >= 1


def test_a_setup_that_cannot_be_split_reports_every_problem():
    setup = em.Setup(
        config=ouro("ouro-1.4b"),
        seq_len=131072,
        sequence_parallel=3,
        zero_stage=1,
        offload_optimizer=True,
    )
    with pytest.raises(ValueError) as error:
        em.estimate(setup)
    message = str(error.value)
    for expected in (
        "num_attention_heads (16)",
        "seq_len (131072)",
        "max_position_embeddings",
        "optimizer offload needs ZeRO stage 2 or 3",
    ):
        assert expected in message


def test_command_line(capsys):
    assert script.main(["--model", "ouro-1.4b", "--seq-len", "32768", "--dp", "8"]) == 0
    assert "largest micro batch that fits: 4" in capsys.readouterr().out
    assert script.main(["--model", "ouro-2.6b", "--seq-len", "65536"]) == 1
    assert "do not fit" in capsys.readouterr().err
    assert script.main(["--model", "ouro-1.4b", "--seq-len", "4096", "--sp", "3"]) == 2


# ---- against a measured forward and backward ----------------------------------------------


def small(num_steps: int = 2) -> LoopLMConfig:
    return LoopLMConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        total_ut_steps=num_steps,
        max_position_embeddings=1024,
    )


def measured_setup(**settings) -> em.Setup:
    return em.Setup(attention="sdpa", packed=False, **{"config": small(), **settings})


@pytest.mark.parametrize(
    "settings",
    [
        {"precision": "bf16", "gradient_checkpointing": True},
        {"precision": "fp32", "gradient_checkpointing": False},
    ],
    ids=["bf16-checkpointed", "fp32-stored"],
)
def test_activations_match_a_measured_cpu_forward_backward(settings):
    setup = measured_setup(seq_len=256, **settings)
    measured = em.measure_activation_bytes(setup)
    assert em.estimate(setup).activations == pytest.approx(measured, rel=0.10)


def test_each_recurrent_step_adds_its_layer_inputs_and_head_gradient():
    two = measured_setup(seq_len=256, precision="fp32")
    three = dataclasses.replace(two, config=small(3))
    growth = em.measure_activation_bytes(three) - em.measure_activation_bytes(two)
    layers, tokens, hidden = 2, 256, 128
    assert growth == pytest.approx((layers + 1) * tokens * hidden * 4, rel=0.03)
