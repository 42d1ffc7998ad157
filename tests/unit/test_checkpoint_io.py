import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from looplm import LoopLMConfig, LoopLMForCausalLM
from looplm.checkpoint import auto_map
from tests.conftest import OURO_TINY

OURO_LAYER_KEYS = {
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
    "input_layernorm.weight",
    "input_layernorm_2.weight",
    "post_attention_layernorm.weight",
    "post_attention_layernorm_2.weight",
}


def ouro_keys(num_layers: int) -> set[str]:
    keys = {f"model.layers.{i}.{k}" for i in range(num_layers) for k in OURO_LAYER_KEYS}
    top = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
    return keys | set(top) | {"model.early_exit_gate.weight", "model.early_exit_gate.bias"}


def small_model(**changes) -> LoopLMForCausalLM:
    torch.manual_seed(0)
    cfg = LoopLMConfig.from_preset(
        "tiny", vocab_size=96, hidden_size=32, intermediate_size=64, **changes
    )
    return LoopLMForCausalLM(cfg)


def assert_same_tensors(a: LoopLMForCausalLM, b: LoopLMForCausalLM):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), name


def test_save_load_round_trip_is_bit_exact(tmp_path):
    model = small_model()
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "ouro" and config["architectures"] == ["OuroForCausalLM"]
    with safe_open(tmp_path / "m" / "model.safetensors", framework="pt") as f:
        assert set(f.keys()) == ouro_keys(2)
    loaded = LoopLMForCausalLM.from_pretrained(tmp_path / "m")
    assert_same_tensors(model, loaded)
    ids = torch.randint(0, 96, (2, 5))
    assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no partial copy left beside it


def test_sharded_save_and_load(tmp_path):
    model = small_model()
    model.save_pretrained(tmp_path / "m", max_shard_size="20KB")
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and set(index["weight_map"]) == ouro_keys(2)
    assert not (tmp_path / "m" / "model.safetensors").exists()
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert index["metadata"]["total_size"] == total
    assert_same_tensors(model, LoopLMForCausalLM.from_pretrained(tmp_path / "m"))


def test_save_in_bfloat16_and_load_with_selectable_dtype(tmp_path):
    model = small_model()
    model.save_pretrained(tmp_path / "m", dtype="bfloat16")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    auto = LoopLMForCausalLM.from_pretrained(tmp_path / "m", dtype="auto")
    assert auto.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(auto.lm_head.weight, model.lm_head.weight.to(torch.bfloat16))
    as_f32 = LoopLMForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    assert as_f32.lm_head.weight.dtype == torch.float32


def test_tied_embeddings_store_the_matrix_once(tmp_path):
    model = small_model(tie_word_embeddings=True)
    model.save_pretrained(tmp_path / "m")
    assert "lm_head.weight" not in load_file(tmp_path / "m" / "model.safetensors")
    loaded = LoopLMForCausalLM.from_pretrained(tmp_path / "m")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_saving_over_an_existing_directory_replaces_it(tmp_path):
    small_model().save_pretrained(tmp_path / "m", max_shard_size="20KB")
    model = small_model(total_ut_steps=2)
    model.save_pretrained(tmp_path / "m")
    assert not (tmp_path / "m" / "model.safetensors.index.json").exists()
    assert LoopLMForCausalLM.from_pretrained(tmp_path / "m").config.total_ut_steps == 2


def test_the_released_format_fixture_loads_unchanged():
    model = LoopLMForCausalLM.from_pretrained(OURO_TINY)
    reference = load_file(f"{OURO_TINY}/model.safetensors")
    state = model.state_dict()
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in reference)


def test_generation_config_carries_the_special_tokens(tmp_path):
    small_model(bos_token_id=1, eos_token_id=2, pad_token_id=0).save_pretrained(tmp_path / "m")
    generation = json.loads((tmp_path / "m" / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


# ---- bad checkpoints: a clear error naming the tensor, never a partial load -----------------


def corrupt(tmp_path, edit):
    small_model().save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, path)
    return tmp_path / "m"


def test_missing_tensor_is_named(tmp_path):
    path = corrupt(tmp_path, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor model\.layers\.1\.mlp\.up_proj\.weight"):
        LoopLMForCausalLM.from_pretrained(path)


def test_unexpected_tensor_is_named(tmp_path):
    path = corrupt(
        tmp_path, lambda s: s.update({"model.layers.2.mlp.up_proj.weight": torch.zeros(2)})
    )
    with pytest.raises(
        ValueError, match=r"unexpected tensor model\.layers\.2\.mlp\.up_proj\.weight"
    ):
        LoopLMForCausalLM.from_pretrained(path)


def test_misshaped_tensor_is_named(tmp_path):
    path = corrupt(tmp_path, lambda s: s.update({"model.norm.weight": torch.ones(31)}))
    with pytest.raises(ValueError, match=r"model\.norm\.weight has shape \(31,\)"):
        LoopLMForCausalLM.from_pretrained(path)


def test_every_problem_is_listed_together(tmp_path):
    def edit(state):
        state.pop("lm_head.weight")
        state["model.norm.weight"] = torch.ones(3)

    with pytest.raises(ValueError) as err:
        LoopLMForCausalLM.from_pretrained(corrupt(tmp_path, edit))
    assert "lm_head.weight" in str(err.value) and "model.norm.weight" in str(err.value)


def test_missing_shard_file_is_named(tmp_path):
    small_model().save_pretrained(tmp_path / "m", max_shard_size="20KB")
    second = sorted((tmp_path / "m").glob("model-00002-of-*.safetensors"))[0]
    second.unlink()
    with pytest.raises(FileNotFoundError, match=second.name):
        LoopLMForCausalLM.from_pretrained(tmp_path / "m")


@pytest.mark.parametrize("cut", [40, "half"])  # inside the header, inside the tensors
def test_a_truncated_weights_file_is_named(tmp_path, cut):
    small_model().save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2 if cut == "half" else cut])
    with pytest.raises(ValueError, match=str(weights)):
        LoopLMForCausalLM.from_pretrained(tmp_path / "m")


def test_a_damaged_shard_index_is_named(tmp_path):
    small_model().save_pretrained(tmp_path / "m", max_shard_size="20KB")
    index = tmp_path / "m" / "model.safetensors.index.json"
    index.write_text(index.read_text()[:50])
    with pytest.raises(ValueError, match=f"{index} is not a safetensors index"):
        LoopLMForCausalLM.from_pretrained(tmp_path / "m")


def test_other_model_type_is_rejected(tmp_path):
    small_model().save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["model_type"] = "qwen2"
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model_type='qwen2'"):
        LoopLMForCausalLM.from_pretrained(tmp_path / "m")


def test_missing_weights_and_directories_are_clear(tmp_path):
    small_model().save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="neither model.safetensors"):
        LoopLMForCausalLM.from_pretrained(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="no model directory"):
        LoopLMForCausalLM.from_pretrained(tmp_path / "nowhere")


def test_hub_ids_go_through_the_hub_client(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="ByteDance/Ouro-1.4B is neither a local directory"):
        LoopLMForCausalLM.from_pretrained("ByteDance/Ouro-1.4B")


@pytest.mark.parametrize(
    ("umask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)]
)
def test_exported_files_are_as_readable_as_the_umask_allows(tmp_path, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        small_model().save_pretrained(tmp_path / "m", max_shard_size="20KB")
    finally:
        os.umask(old)
    assert (tmp_path / "m").stat().st_mode & 0o777 == dir_mode
    modes = {path.name: path.stat().st_mode & 0o777 for path in (tmp_path / "m").iterdir()}
    assert len(modes) > 4 and set(modes.values()) == {file_mode}, modes


def test_every_export_names_the_released_remote_code(tmp_path):
    small_model().save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "ByteDance/Ouro-1.4B--configuration_ouro.OuroConfig",
        "AutoModel": "ByteDance/Ouro-1.4B--modeling_ouro.OuroModel",
        "AutoModelForCausalLM": "ByteDance/Ouro-1.4B--modeling_ouro.OuroForCausalLM",
    }
    for module in ("configuration_ouro.py", "modeling_ouro.py"):
        (tmp_path / "m" / module).write_text("# the released code\n")
    assert auto_map(tmp_path / "m")["AutoModel"] == "modeling_ouro.OuroModel"


def test_dtype_and_torch_dtype_agree_after_a_cast(tmp_path):
    config = json.loads((Path(OURO_TINY) / "config.json").read_text())
    config["dtype"] = config["torch_dtype"]  # the newer transformers name, as some releases have
    model = LoopLMForCausalLM(LoopLMConfig.from_dict(config))
    model.save_pretrained(tmp_path / "m", dtype="bfloat16")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["dtype"] == saved["torch_dtype"] == "bfloat16"


def test_early_exit_step_is_the_default_exit_as_in_the_released_format():
    torch.manual_seed(0)
    model = small_model().eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    steps = model(ids, return_all_steps=True).step_logits
    default = model(ids).logits
    model.config.extra["early_exit_step"] = 1  # 0-based: the second step
    assert torch.equal(model(ids).logits, steps[1])
    assert torch.equal(model(ids, exit_threshold=1.0).logits, default)  # an explicit rule wins
    assert torch.equal(model(ids, exit_at_step=3).logits, steps[2])
    model.config.extra["early_exit_step"] = model.config.total_ut_steps  # past the loop: unused
    assert torch.equal(model(ids).logits, default)
    with pytest.raises(ValueError, match="early_exit_step must be a step index"):
        LoopLMConfig.from_preset("tiny", extra={"early_exit_step": -1})
