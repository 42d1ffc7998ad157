import json

import pytest
import torch

from looplm import PRESETS, LoopLMConfig, LoopLMForCausalLM
from tests.conftest import OURO_TINY


@pytest.mark.parametrize(
    ("preset", "count"), [("ouro-1.4b", 1_434_652_673), ("ouro-2.6b", 2_667_974_657)]
)
def test_release_presets_match_the_published_parameter_counts(preset, count):
    cfg = LoopLMConfig.from_preset(preset)
    assert cfg.num_parameters() == count
    with torch.device("meta"):
        model = LoopLMForCausalLM(cfg)
    assert model.num_parameters() == count
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim) == (2048, 16, 128)
    assert (cfg.total_ut_steps, cfg.rope_theta, cfg.vocab_size) == (4, 1_000_000.0, 49152)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_builds_and_counts_consistently(preset):
    cfg = LoopLMConfig.from_preset(preset)
    with torch.device("meta"):
        assert LoopLMForCausalLM(cfg).num_parameters() == cfg.num_parameters()


def test_tied_embeddings_count_the_matrix_once():
    cfg = LoopLMConfig.from_preset("tiny", tie_word_embeddings=True)
    model = LoopLMForCausalLM(cfg)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.num_parameters() == cfg.num_parameters()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"hidden_size": 100, "num_attention_heads": 3}, "not divisible by num_attention_heads"),
        (
            {"num_attention_heads": 4, "num_key_value_heads": 3},
            "not divisible by num_key_value_heads",
        ),
        ({"total_ut_steps": 0}, "total_ut_steps must be an integer >= 1"),
        ({"early_exit_threshold": 1.5}, "early_exit_threshold"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"vocab_size": 0}, "vocab_size must be a positive integer"),
        ({"eos_token_id": 10_000}, "eos_token_id (10000) is outside the vocabulary"),
        ({"head_dim": 7}, "head_dim"),
    ],
)
def test_invalid_configs_name_the_problem(changes, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        LoopLMConfig.from_preset("tiny", **changes)


def test_all_problems_are_reported_at_once():
    with pytest.raises(ValueError) as err:
        LoopLMConfig.from_preset("tiny", num_key_value_heads=3, total_ut_steps=0, rope_theta=-1.0)
    text = str(err.value)
    assert "num_key_value_heads" in text and "total_ut_steps" in text and "rope_theta" in text


def test_json_round_trip_keeps_every_field(tmp_path):
    cfg = LoopLMConfig.from_preset("tiny", eos_token_id=[2, 0], pad_token_id=0)
    cfg.save(tmp_path / "config.json")
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["model_type"] == "ouro" and data["architectures"] == ["OuroForCausalLM"]
    assert LoopLMConfig.load(tmp_path) == cfg


def test_released_config_loads_and_keeps_unknown_keys(tmp_path):
    cfg = LoopLMConfig.load(OURO_TINY)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.total_ut_steps) == (64, 2, 4)
    assert cfg.extra["layer_types"] == ["full_attention", "full_attention"]
    cfg.save(tmp_path / "config.json")
    original = json.loads(open(f"{OURO_TINY}/config.json").read())
    written = json.loads((tmp_path / "config.json").read_text())
    for key, value in original.items():
        assert written[key] == value, key


def test_other_model_types_are_rejected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(ValueError, match="model_type='llama'"):
        LoopLMConfig.load(tmp_path)


@pytest.mark.parametrize(
    ("key", "value"), [("use_sliding_window", True), ("rope_scaling", {"type": "yarn"})]
)
def test_unsupported_architecture_switches_are_rejected(tmp_path, key, value):
    data = json.loads(open(f"{OURO_TINY}/config.json").read())
    data[key] = value
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=key):
        LoopLMConfig.load(tmp_path)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="ouro-1.4b"):
        LoopLMConfig.from_preset("ouro-7b")
