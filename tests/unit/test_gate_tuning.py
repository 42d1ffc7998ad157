"""The gate-tuning job's config and its export (the job itself runs in
tests/distributed/test_gate_tuning.py)."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from safetensors import safe_open

from looplm import LoopLMConfig, LoopLMForCausalLM
from looplm.checkpoint import INDEX_NAME
from tests.conftest import OURO_TINY
from train.gate_tuning import GateTuningConfig, export_tuned_gate, gate_tuning_problems

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
GATE = ("model.early_exit_gate.weight", "model.early_exit_gate.bias")


def composed(*overrides: str) -> GateTuningConfig:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        raw = compose("gate_tuning", overrides=["run_dir=/tmp/unused", *overrides])
    return OmegaConf.to_object(raw)


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    found = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            found.update({name: f.get_tensor(name) for name in f.keys()})
    return found


def test_the_shipped_config_composes_and_is_valid():
    cfg = composed(f"init_from={OURO_TINY}", "stage2.k=20", "stage2.gamma=0.01")
    assert isinstance(cfg, GateTuningConfig)
    assert (cfg.stage2.k, cfg.stage2.gamma, cfg.export_dir) == (20.0, 0.01, None)
    assert (cfg.optim.weight_decay, cfg.schedule.kind) == (0.0, "constant")
    # The tokenizer of data=embedded is larger than ouro-tiny's vocabulary; nothing else fails.
    problems = gate_tuning_problems(cfg, world_size=2)
    assert len(problems) == 1 and "tokenizer" in problems[0], problems


def test_unknown_keys_and_a_missing_source_fail_at_compose_time():
    for override in ("stage2.slope=3", "stage2.k=steep", "curriculum=ouro_1.4b"):
        with pytest.raises(ConfigCompositionException):
            composed(f"init_from={OURO_TINY}", override)
    with pytest.raises(Exception, match="init_from"):
        composed()


def test_every_problem_is_reported_at_once(tmp_path):
    cfg = composed(
        f"init_from={tmp_path}",
        "stage2.k=0",
        "train.max_steps=null",
        f"export_dir={tmp_path}",
    )
    problems = gate_tuning_problems(cfg, world_size=2)
    assert len(problems) == 4, problems
    for fragment in ("init_from", "stage2.k", "train.max_steps", "overwrite the source"):
        assert any(fragment in p for p in problems), fragment


@pytest.mark.parametrize("shard_size", ["5GB", "40KB"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_export_changes_the_gate_and_keeps_every_other_byte(tmp_path, shard_size, dtype):
    torch.manual_seed(0)
    config = LoopLMConfig.from_preset("tiny", vocab_size=128, hidden_size=32, intermediate_size=64)
    source = tmp_path / "source"
    LoopLMForCausalLM(config).save_pretrained(source, max_shard_size=shard_size, dtype=dtype)
    (source / "tokenizer.json").write_text("{}")
    gate = {
        GATE[0]: torch.randn(1, 32, dtype=torch.float32),
        GATE[1]: torch.tensor([0.25], dtype=torch.float32),
    }
    out = export_tuned_gate(str(source), gate, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in source.iterdir())
    assert (out / "config.json").read_bytes() == (source / "config.json").read_bytes()
    assert (out / INDEX_NAME).is_file() == (shard_size == "40KB")
    before, after = tensors(source), tensors(out)
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype, name
        if name in GATE:
            assert torch.equal(after[name], gate[name].to(tensor.dtype)), name
        else:
            assert torch.equal(after[name].view(torch.uint8), tensor.view(torch.uint8)), name
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []


def test_the_export_refuses_a_source_without_the_gate(tmp_path):
    with pytest.raises(ValueError, match="no tensors named"):
        export_tuned_gate(OURO_TINY, {"model.no_such_gate.weight": torch.zeros(1)}, tmp_path / "x")
    assert not (tmp_path / "x").exists()
