"""CUDA paths: bf16, SDPA and flash-attn kernels. Skipped on machines without a GPU."""

import importlib.util

import pytest
import torch

from looplm import LoopLMConfig, LoopLMForCausalLM

pytestmark = pytest.mark.gpu
needs_flash = pytest.mark.skipif(
    importlib.util.find_spec("flash_attn") is None, reason="flash-attn is not installed"
)


def cuda_model(implementation: str, dtype=torch.bfloat16) -> LoopLMForCausalLM:
    torch.manual_seed(0)
    cfg = LoopLMConfig.from_preset("tiny", vocab_size=512, hidden_size=256, num_attention_heads=4)
    return LoopLMForCausalLM(cfg, attn_implementation=implementation).to("cuda", dtype)


def packed_batch():
    ids = torch.randint(0, 512, (2, 96), device="cuda")
    lengths = [40, 56]
    pos = torch.cat([torch.arange(n) for n in lengths]).to("cuda").expand(2, -1).contiguous()
    return ids, pos, lengths


def test_bf16_forward_follows_float32():
    fp32 = cuda_model("sdpa", torch.float32)
    bf16 = cuda_model("sdpa")
    ids = torch.randint(0, 512, (2, 64), device="cuda")
    a = fp32(ids, return_all_steps=True).step_logits
    b = bf16(ids, return_all_steps=True).step_logits.float()
    assert (a - b).abs().max() < 0.1 * a.abs().max()


def test_sdpa_equals_eager_on_cuda():
    ids = torch.randint(0, 512, (2, 64), device="cuda")
    a = cuda_model("sdpa", torch.float32)(ids, return_all_steps=True).step_logits
    b = cuda_model("eager", torch.float32)(ids, return_all_steps=True).step_logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("implementation", ["sdpa", pytest.param("flash", marks=needs_flash)])
def test_packed_documents_equal_separate_runs_on_cuda(implementation):
    model = cuda_model(implementation)
    ids, pos, lengths = packed_batch()
    packed = model(ids, position_ids=pos, return_all_steps=True).step_logits
    start = 0
    for n in lengths:
        alone = model(ids[:, start : start + n], return_all_steps=True).step_logits
        torch.testing.assert_close(packed[:, :, start : start + n], alone, rtol=2e-2, atol=2e-2)
        start += n


@needs_flash
def test_flash_matches_sdpa():
    ids = torch.randint(0, 512, (2, 128), device="cuda")
    a = cuda_model("flash")(ids, return_all_steps=True).step_logits.float()
    b = cuda_model("sdpa")(ids, return_all_steps=True).step_logits.float()
    torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_bf16_training_step_has_finite_gradients():
    model = cuda_model("sdpa")
    model.set_gradient_checkpointing(True)
    model.train()
    ids = torch.randint(0, 512, (2, 64), device="cuda")
    out = model(ids, labels=ids.roll(-1, dims=1))
    out.loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_compiled_layers_follow_eager_in_bf16():
    eager, compiled = cuda_model("sdpa"), cuda_model("sdpa")
    compiled.compile_layers()
    ids = torch.randint(0, 512, (2, 128), device="cuda")
    positions = torch.cat([torch.arange(50), torch.arange(78)]).to("cuda").expand(2, -1)
    losses = {}
    for name, model in (("eager", eager), ("compiled", compiled)):
        out = model(ids, positions, labels=ids.roll(-1, dims=1))
        out.loss.backward()
        losses[name] = out.loss.item()
    # Inductor keeps fused bf16 intermediates in float32 where eager rounds them.
    assert abs(losses["compiled"] - losses["eager"]) <= 1e-2 * abs(losses["eager"])
    grads = [p.grad for p in compiled.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
