"""Rotary embeddings and the attention kernels (SDPA, flash-attn, eager).

Shape legend: B batch, S query length, K key length, N heads, G key/value heads, D head dim.

Packed sequences carry their document boundaries in ``position_ids``: a position that does
not continue the previous one (``pos[i] != pos[i-1] + 1``) starts a new document, and
attention never crosses a document boundary.

Sequence parallelism (DeepSpeed-Ulysses) enters through ``SequenceParallel``: each rank holds a
contiguous slice of every sequence; around the attention kernel, an all-to-all trades the
sequence split for a head split, so the kernel sees whole sequences with 1/P of the heads.
The communication itself lives with the training code; here it is only an interface.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

ATTN_IMPLEMENTATIONS = ("sdpa", "flash", "eager")


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


def resolve_attn_implementation(name: str) -> str:
    """Checks an attention backend name; 'auto' picks flash-attn when it can run, else SDPA."""
    if name == "auto":
        return "flash" if flash_attn_available() else "sdpa"
    if name not in ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"unknown attn_implementation {name!r}; choose one of {ATTN_IMPLEMENTATIONS}"
        )
    if name == "flash" and not flash_attn_available():
        raise ValueError(
            "attn_implementation='flash' needs the flash-attn package and a CUDA device"
        )
    return name


# ---- rotary position embedding ---------------------------------------------------------


def rope_cos_sin(
    position_ids_BS: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [B, S, D] of the rotary embedding, computed in float32 as the release does."""
    exponents = torch.arange(0, head_dim, 2, device=position_ids_BS.device, dtype=torch.float32)
    inv_freq = 1.0 / (theta ** (exponents / head_dim))
    freqs = position_ids_BS.float()[..., None] * inv_freq  # [B, S, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x_BNSD: torch.Tensor, cos_BSD: torch.Tensor, sin_BSD: torch.Tensor) -> torch.Tensor:
    cos, sin = cos_BSD[:, None], sin_BSD[:, None]
    return x_BNSD * cos + _rotate_half(x_BNSD) * sin


# ---- masks -----------------------------------------------------------------------------


def document_ids(position_ids_BS: torch.Tensor) -> torch.Tensor:
    """Per-token document index [B, S]: it increments wherever the position does not continue."""
    restart = torch.ones_like(position_ids_BS, dtype=torch.bool)
    restart[:, 1:] = position_ids_BS[:, 1:] != position_ids_BS[:, :-1] + 1
    restart[:, 0] = False
    return restart.long().cumsum(dim=1)


class SequenceParallel(Protocol):
    """How the slices of a sequence split over P ranks meet in attention."""

    def gather_positions(self, position_ids_BS: torch.Tensor) -> torch.Tensor:
        """The whole sequences' position ids [B, P x S] from every rank's slice [B, S]."""

    def heads_to_sequence(self, x_BNSD: torch.Tensor) -> torch.Tensor:
        """[B, N, S, D] (all heads, this rank's slice) -> [B, N / P, P x S, D] (this rank's
        heads, the whole sequence)."""

    def sequence_to_heads(self, out_BSND: torch.Tensor) -> torch.Tensor:
        """[B, P x S, N / P, D] -> [B, S, N, D]: the attention output back to this rank's
        slice, all heads."""


@dataclass
class AttentionLayout:
    """What every attention call of one forward shares (computed once, used T x L times).

    ``mask`` is None for plain causal attention over the whole row (query i sees keys up to
    cached + i), else a boolean [B, 1, S, K] mask where True means "may attend".
    ``cu_seqlens``/``max_seqlen`` describe packed documents for flash-attn's varlen kernel.
    ``causal`` is False only for a single query after a cache, which sees every key. It is
    decided here, outside the layers, so that a compiled layer never branches on a shape.
    """

    mask: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0
    causal: bool = True
    sequence_parallel: SequenceParallel | None = None
    """Set when the layout describes whole sequences split over ranks (see above)."""

    @classmethod
    def build(
        cls,
        position_ids_BS: torch.Tensor,
        past_length: int,
        packed: bool,
        implementation: str,
        key_mask_BK: torch.Tensor | None = None,
    ) -> AttentionLayout:
        """``key_mask_BK`` (bool, past and new tokens) marks padding keys (False) that no query
        may see; a padding query still sees itself, so its (unused) output stays finite."""
        b, s = position_ids_BS.shape
        device = position_ids_BS.device
        if packed:
            doc = document_ids(position_ids_BS)
            if implementation == "flash":
                return cls(None, *_cu_seqlens(doc))
            causal = torch.ones(s, s, dtype=torch.bool, device=device).tril()
            same_doc = doc[:, :, None] == doc[:, None, :]
            return cls((same_doc & causal)[:, None])
        chunk_after_cache = past_length and s > 1 and implementation != "flash"
        if key_mask_BK is None and not chunk_after_cache:
            return cls(causal=s > 1)
        q_pos = torch.arange(s, device=device)[:, None] + past_length
        k_pos = torch.arange(past_length + s, device=device)[None, :]
        mask = (k_pos <= q_pos)[None]
        if key_mask_BK is not None:
            mask = (mask & key_mask_BK[:, None, :]) | (k_pos == q_pos)
        return cls(mask.expand(b, s, -1)[:, None])


def _cu_seqlens(doc_BS: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative document lengths over the flattened batch, for varlen flash-attn."""
    b, s = doc_BS.shape
    global_doc = doc_BS + torch.arange(b, device=doc_BS.device)[:, None] * (s + 1)
    _, lengths = torch.unique_consecutive(global_doc.flatten(), return_counts=True)
    cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    return cu, int(lengths.max())


# ---- kernels ---------------------------------------------------------------------------


def attend(
    q_BNSD: torch.Tensor,
    k_BGKD: torch.Tensor,
    v_BGKD: torch.Tensor,
    layout: AttentionLayout,
    implementation: str,
) -> torch.Tensor:
    """Causal attention of queries over keys; returns [B, S, N, D]."""
    if implementation == "flash" and layout.mask is None:
        return _flash(q_BNSD, k_BGKD, v_BGKD, layout)
    groups = q_BNSD.shape[1] // k_BGKD.shape[1]
    if groups > 1:
        k_BGKD = k_BGKD.repeat_interleave(groups, dim=1)
        v_BGKD = v_BGKD.repeat_interleave(groups, dim=1)
    if implementation == "eager":
        out = _eager(q_BNSD, k_BGKD, v_BGKD, layout)
    else:
        out = _sdpa(q_BNSD, k_BGKD, v_BGKD, layout)
    return out.transpose(1, 2)


CPU_FLOAT32_SDPA_MAX_KEYS = 512
"""On a CPU, attention over at most this many keys runs in float32 when its inputs are bf16 or
fp16. There PyTorch's bf16 SDPA is the slower one, forward and backward: 2.6-4.5x over 64-128
keys, 1.3x at 256, at par near 512, and faster beyond, where bf16 is kept
(``scripts/bench_attention.py``)."""


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout):
    """PyTorch's SDPA; on a CPU in half precision over few keys, computed in float32 and
    returned in the inputs' dtype."""
    dtype = q.dtype
    upcast = (
        q.device.type == "cpu"
        and dtype in (torch.bfloat16, torch.float16)
        and k.shape[2] <= CPU_FLOAT32_SDPA_MAX_KEYS
    )
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    if layout.mask is not None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=layout.mask)
    else:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=layout.causal)
    return out.to(dtype)


def _eager(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout
) -> torch.Tensor:
    """Reference attention: explicit scores, softmax in float32 (or float64)."""
    s, kl = q.shape[2], k.shape[2]
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    mask = layout.mask
    if mask is None:
        q_pos = torch.arange(s, device=q.device)[:, None] + (kl - s)
        mask = torch.arange(kl, device=q.device)[None, :] <= q_pos
    scores = scores.masked_fill(~mask, float("-inf"))
    accumulation = torch.promote_types(q.dtype, torch.float32)
    probs = torch.softmax(scores.to(accumulation), dim=-1).to(q.dtype)
    return probs @ v


def _flash(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout
) -> torch.Tensor:
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # flash layout [B, S, heads, D]
    if layout.cu_seqlens is None:
        # flash-attn aligns the causal mask to the bottom right, as a KV cache needs.
        return flash_attn_func(q, k, v, causal=True)
    b, s = q.shape[:2]
    cu, m = layout.cu_seqlens, layout.max_seqlen
    out = flash_attn_varlen_func(
        q.reshape(b * s, *q.shape[2:]),
        k.reshape(b * s, *k.shape[2:]),
        v.reshape(b * s, *v.shape[2:]),
        cu,
        cu,
        m,
        m,
        causal=True,
    )
    return out.reshape(b, s, *out.shape[1:])
