"""Upcycling by layer duplication: what it keeps and what it changes."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from looplm import LoopLMForCausalLM, upcycle
from tests.conftest import OURO_TINY

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "upcycle.py"


def test_layer_orders():
    assert upcycle.layer_sources(3, 2, "interleave") == [0, 0, 1, 1, 2, 2]
    assert upcycle.layer_sources(3, 2, "stack") == [0, 1, 2, 0, 1, 2]
    with pytest.raises(ValueError, match="unknown order"):
        upcycle.layer_sources(3, 2, "shuffle")


@pytest.mark.parametrize("order", ["interleave", "stack"])
def test_upcycling_copies_layers_and_keeps_everything_else(order):
    small = LoopLMForCausalLM.from_pretrained(OURO_TINY, dtype=torch.float64)
    big = upcycle.upcycle(small, 2, order)
    assert big.config.num_hidden_layers == 4
    assert big.config.replace(num_hidden_layers=2) == small.config
    s, b = small.state_dict(), big.state_dict()
    for name in s:
        if not name.startswith("model.layers."):
            assert torch.equal(s[name], b[name]), name
    for target, source in enumerate(upcycle.layer_sources(2, 2, order)):
        for name in [n for n in s if n.startswith(f"model.layers.{source}.")]:
            suffix = name[len(f"model.layers.{source}.") :]
            assert torch.equal(b[f"model.layers.{target}.{suffix}"], s[name])
    layer_params = sum(t.numel() for n, t in s.items() if n.startswith("model.layers.0."))
    assert big.num_parameters() == small.num_parameters() + 2 * layer_params


def test_upcycling_changes_the_function_but_a_factor_of_one_does_not():
    small = LoopLMForCausalLM.from_pretrained(OURO_TINY, dtype=torch.float64)
    ids = torch.randint(0, 384, (2, 10))
    same = upcycle.upcycle(small, 1, "stack")
    assert torch.equal(
        same(ids, return_all_steps=True).step_logits, small(ids, return_all_steps=True).step_logits
    )
    # Twice the layers between the per-step norms: another function (continued training adapts it).
    big = upcycle.upcycle(small, 2, "interleave")
    assert not torch.allclose(big(ids).logits, small(ids).logits)


def test_the_script_writes_an_ouro_directory(tmp_path):
    subprocess.run(
        [sys.executable, str(SCRIPT), OURO_TINY, str(tmp_path / "big"), "--order", "stack"],
        check=True,
    )
    loaded = LoopLMForCausalLM.from_pretrained(tmp_path / "big")
    assert loaded.config.num_hidden_layers == 4
    assert torch.equal(
        loaded.state_dict()["model.layers.2.mlp.up_proj.weight"],
        LoopLMForCausalLM.from_pretrained(OURO_TINY).state_dict()[
            "model.layers.0.mlp.up_proj.weight"
        ],
    )
