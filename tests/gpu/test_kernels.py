"""The fused (Liger) kernels on CUDA against the float64 reference and the torch kernels."""

import importlib.util

import pytest
import torch

from tests.unit.test_model_numerics import reference_forward, tiny_model, token_ids

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(
        importlib.util.find_spec("liger_kernel") is None, reason="liger-kernel is not installed"
    ),
]


def cuda_model(kernels: str, dtype=torch.float32):
    model = tiny_model().to("cuda", dtype)
    model.set_kernels(kernels)
    return model


def test_liger_kernels_follow_the_float64_reference():
    model = cuda_model("liger")
    ids = token_ids(2, 24)
    # Each row restarts at its own place: a kernel that read one row's positions for all fails.
    positions = torch.stack(
        [
            torch.cat([torch.arange(10), torch.arange(14)]),
            torch.cat([torch.arange(17), torch.arange(7)]),
        ]
    )
    out = model(ids.cuda(), positions.cuda(), return_all_steps=True)
    reference = tiny_model()
    step_logits, gate_logits = reference_forward(reference, ids, positions)
    torch.testing.assert_close(out.step_logits.cpu().double(), step_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.gate_logits.cpu().double(), gate_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_liger_gradients_equal_the_torch_kernels(dtype):
    ids = token_ids(2, 32).cuda()
    positions = torch.stack([torch.arange(32), torch.cat([torch.arange(12), torch.arange(20)])])
    grads = {}
    for kernels in ("torch", "liger"):
        model = cuda_model(kernels, dtype)
        model(ids, positions.cuda(), labels=ids.roll(-1, 1)).loss.backward()
        grads[kernels] = torch.cat([p.grad.float().flatten() for p in model.parameters()])
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    scale = grads["torch"].abs().max()
    assert (grads["liger"] - grads["torch"]).abs().max() <= tolerance * scale
