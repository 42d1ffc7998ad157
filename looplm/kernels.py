"""Optional fused GPU kernels for RMSNorm, SwiGLU and RoPE (the Liger kernels, Triton).

``torch`` (the default) is the plain PyTorch code in ``looplm.modeling``; ``liger`` swaps in
fused kernels that compute the same math in fewer passes over memory, for CUDA only (the
``gpu`` extra installs them) and for eager layers: ``compile_layers`` fuses these operations
itself, and Triton kernels inside a compiled graph fix their shape arguments (a new batch size
would recompile). The casting follows the torch code: RMSNorm normalizes in float32 and casts
back before the weight ("llama" casting); RoPE is the rotate-half form.
"""

from __future__ import annotations

import importlib.util

import torch

KERNELS = ("torch", "liger")


def kernels_problem(name: str, here: bool = True) -> str | None:
    """Why ``name`` cannot run (None when it can). With ``here`` False only the name is
    checked: a launch host without a GPU validates jobs that run on GPU nodes."""
    if name not in KERNELS:
        return f"unknown kernels {name!r}; choose one of {KERNELS}"
    if not here:
        return None
    if name == "liger" and importlib.util.find_spec("liger_kernel") is None:
        return "kernels='liger' needs the liger-kernel package (pip install -e '.[gpu]')"
    if name == "liger" and not torch.cuda.is_available():
        return "kernels='liger' needs a CUDA device (its kernels are Triton GPU kernels)"
    return None


def check_kernels(name: str) -> None:
    """Raises ValueError when ``name`` cannot run here."""
    problem = kernels_problem(name)
    if problem is not None:
        raise ValueError(problem)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * normalize(x)``, normalized in float32 and cast back to x's dtype first."""
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    # in_place=False: the fused backward would otherwise write dX over dY, and a sandwich
    # norm's dY is also the residual stream's gradient.
    return LigerRMSNormFunction.apply(x, weight, eps, 0.0, "llama", False)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``, SwiGLU's gating."""
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    return LigerSiLUMulFunction.apply(gate, up)


def rope(
    q_BNSD: torch.Tensor, k_BGSD: torch.Tensor, cos_BSD: torch.Tensor, sin_BSD: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and keys rotated by each row's own cos and sin (packed rows differ)."""
    from liger_kernel.ops.rope import LigerRopeFunction

    return LigerRopeFunction.apply(q_BNSD, k_BGSD, cos_BSD, sin_BSD)
