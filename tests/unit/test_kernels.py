"""The fused-kernel switch on a machine that may not run the kernels (tests/gpu checks their
numbers on CUDA)."""

import pytest
import torch

from looplm import LoopLMConfig, LoopLMForCausalLM
from looplm.kernels import kernels_problem


def test_the_torch_kernels_are_the_default_and_always_run():
    model = LoopLMForCausalLM(LoopLMConfig.from_preset("tiny", vocab_size=64))
    assert kernels_problem("torch") is None
    assert {m.kernels for m in model.modules() if hasattr(m, "kernels")} == {"torch"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
def test_liger_without_a_gpu_is_refused_with_the_reason_and_nothing_changes():
    model = LoopLMForCausalLM(LoopLMConfig.from_preset("tiny", vocab_size=64))
    problem = kernels_problem("liger")
    assert problem is not None and problem.startswith("kernels='liger' needs ")
    with pytest.raises(ValueError, match="kernels='liger' needs "):
        model.set_kernels("liger")
    assert {m.kernels for m in model.modules() if hasattr(m, "kernels")} == {"torch"}
    with pytest.raises(ValueError, match="unknown kernels 'fast'"):
        model.set_kernels("fast")
