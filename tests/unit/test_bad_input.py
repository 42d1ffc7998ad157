import pytest
import torch

from looplm import LoopKVCache, LoopLMConfig, LoopLMForCausalLM, Objective


@pytest.fixture(scope="module")
def model():
    cfg = LoopLMConfig.from_preset("tiny", vocab_size=50, max_position_embeddings=16)
    return LoopLMForCausalLM(cfg)


def ids(*shape, high=50):
    return torch.randint(0, high, shape)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"input_ids": ids(6)}, r"input_ids must be an integer tensor \[batch, seq\]"),
        ({"input_ids": torch.zeros(2, 4)}, "input_ids must be an integer tensor"),
        ({"input_ids": ids(2, 4, high=60) + 50}, "outside the vocabulary"),
        ({"input_ids": -ids(2, 4) - 1}, "outside the vocabulary"),
        ({"input_ids": ids(2, 4), "position_ids": torch.arange(5)[None]}, "position_ids"),
        ({"input_ids": ids(1, 20)}, "exceeds max_position_embeddings"),
        ({"input_ids": ids(2, 4), "labels": ids(2, 5)}, "labels"),
        ({"input_ids": ids(2, 4), "labels": ids(2, 4) + 50}, "labels hold id"),
        ({"input_ids": ids(2, 4), "exit_at_step": 5}, r"exit_at_step must lie in \[1, 4\]"),
        ({"input_ids": ids(2, 4), "exit_at_step": 0}, "exit_at_step"),
        ({"input_ids": ids(2, 4), "num_steps": 0}, "num_steps must be an integer >= 1"),
        ({"input_ids": ids(2, 4), "exit_threshold": 2.0}, "exit_threshold"),
    ],
)
def test_bad_forward_inputs_name_the_problem(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        model(**kwargs)


def test_packed_sequences_cannot_use_a_cache(model):
    packed = torch.tensor([[0, 1, 2, 0, 1]])
    with pytest.raises(ValueError, match="cannot use a KV cache"):
        model(ids(1, 5), position_ids=packed, past_key_values=LoopKVCache(4, 2))


def test_a_cache_for_fewer_steps_is_refused(model):
    with pytest.raises(ValueError, match="made for 2 steps"):
        model(ids(1, 3), past_key_values=LoopKVCache(2, 2))


def test_unknown_attention_backend(model):
    with pytest.raises(ValueError, match="unknown attn_implementation 'xformers'"):
        LoopLMForCausalLM(model.config, attn_implementation="xformers")


@pytest.mark.skipif(torch.cuda.is_available(), reason="flash-attn may be usable here")
def test_flash_attention_without_cuda_is_a_clear_error(model):
    with pytest.raises(ValueError, match="needs the flash-attn package and a CUDA device"):
        LoopLMForCausalLM(model.config, attn_implementation="flash")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "stage3"}, "objective kind"),
        ({"prior": "poisson"}, "prior must be one of"),
        ({"prior": "geometric", "regularizer": "entropy"}, "needs regularizer='kl'"),
        ({"prior": "geometric", "regularizer": "kl", "prior_param": 1.5}, "prior_param"),
        ({"beta": -0.1}, "beta must be >= 0"),
    ],
)
def test_bad_objectives(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Objective(**kwargs)
