"""An independent float64 re-implementation of the Ouro LoopLM and its objectives.

Written from the Ouro architecture description (layers, norms, exit gate, objectives)
alone, never from looplm's code, so that the tests compare two implementations that could
not share a mistake. Plain functions over a state
dict of tensors with Ouro's key names; everything is computed in float64 (the weights are
cast on entry), with explicit loops where a loop reads closer to the paper than a fused op.

Shape legend: T recurrent steps, B batch, S sequence, H hidden, V vocab, N heads, D head dim.
"""

from __future__ import annotations

import math

import torch

IGNORE_INDEX = -100
F64 = torch.float64


def _w(state: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    return state[key].to(F64)


def num_layers(state: dict[str, torch.Tensor]) -> int:
    return len({k.split(".")[2] for k in state if k.startswith("model.layers.")})


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def rope_cos_sin(position_ids_BS: torch.Tensor, head_dim: int, theta: float, rope_fp32: bool):
    """cos, sin [B, S, D]; OURO.md: computed in float32 (then cast), as the release does."""
    dtype = torch.float32 if rope_fp32 else F64
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=dtype) / head_dim))
    freqs = position_ids_BS.to(dtype)[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(F64), emb.sin().to(F64)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def document_ids(position_ids_BS: torch.Tensor) -> torch.Tensor:
    """A new document starts wherever the position restarts at 0."""
    starts = position_ids_BS == 0
    starts[:, 0] = False
    return starts.long().cumsum(1)


def attention(x_BSH, state, prefix, num_heads, cos, sin, doc_BS):
    """Causal multi-head attention; key/value head g serves query heads g*N/G .. (g+1)*N/G-1."""
    b, s, _ = x_BSH.shape
    q = x_BSH @ _w(state, prefix + "q_proj.weight").T
    k = x_BSH @ _w(state, prefix + "k_proj.weight").T
    v = x_BSH @ _w(state, prefix + "v_proj.weight").T
    head_dim = q.shape[-1] // num_heads
    num_kv_heads = k.shape[-1] // head_dim
    group = num_heads // num_kv_heads
    allowed = torch.ones(s, s, dtype=torch.bool).tril() & (doc_BS[:, :, None] == doc_BS[:, None, :])
    outs = []
    for n in range(num_heads):
        g = n // group
        qn = q[..., n * head_dim : (n + 1) * head_dim]
        kn = k[..., g * head_dim : (g + 1) * head_dim]
        vn = v[..., g * head_dim : (g + 1) * head_dim]
        qn = qn * cos + rotate_half(qn) * sin
        kn = kn * cos + rotate_half(kn) * sin
        scores = (qn @ kn.transpose(-1, -2)) / math.sqrt(head_dim)
        scores = scores.masked_fill(~allowed, -math.inf)
        outs.append(torch.softmax(scores, dim=-1) @ vn)
    return torch.cat(outs, dim=-1) @ _w(state, prefix + "o_proj.weight").T


def mlp(x, state, prefix):
    gate = x @ _w(state, prefix + "gate_proj.weight").T
    up = x @ _w(state, prefix + "up_proj.weight").T
    return (gate * torch.sigmoid(gate) * up) @ _w(state, prefix + "down_proj.weight").T


def decoder_layer(h, state, prefix, num_heads, cos, sin, doc_BS, eps):
    """Sandwich norms: h + norm2(attn(norm1(h))), then h + norm2'(mlp(norm1'(h)))."""

    def norm(name, x):
        return rms_norm(x, _w(state, prefix + name + ".weight"), eps)

    a = attention(
        norm("input_layernorm", h), state, prefix + "self_attn.", num_heads, cos, sin, doc_BS
    )
    h = h + norm("input_layernorm_2", a)
    m = mlp(norm("post_attention_layernorm", h), state, prefix + "mlp.")
    return h + norm("post_attention_layernorm_2", m)


def forward(
    state: dict[str, torch.Tensor],
    input_ids_BS: torch.Tensor,
    *,
    num_heads: int,
    num_steps: int,
    rope_theta: float,
    eps: float = 1e-6,
    position_ids_BS: torch.Tensor | None = None,
    rope_fp32: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(step_logits [T, B, S, V], gate_logits [B, S, T]) of the looped model, in float64."""
    b, s = input_ids_BS.shape
    if position_ids_BS is None:
        position_ids_BS = torch.arange(s).expand(b, s)
    head_dim = state["model.layers.0.self_attn.q_proj.weight"].shape[0] // num_heads
    cos, sin = rope_cos_sin(position_ids_BS, head_dim, rope_theta, rope_fp32)
    doc = document_ids(position_ids_BS)
    h = _w(state, "model.embed_tokens.weight")[input_ids_BS]
    step_logits, gate_logits = [], []
    for _ in range(num_steps):
        for i in range(num_layers(state)):
            h = decoder_layer(h, state, f"model.layers.{i}.", num_heads, cos, sin, doc, eps)
        h = rms_norm(h, _w(state, "model.norm.weight"), eps)
        step_logits.append(h @ _w(state, "lm_head.weight").T)
        gate = h @ _w(state, "model.early_exit_gate.weight").T
        gate_logits.append(gate[..., 0] + _w(state, "model.early_exit_gate.bias"))
    return torch.stack(step_logits), torch.stack(gate_logits, dim=-1)


# ---- the exit distribution -------------------------------------------------------------


def exit_pdf(gate_logits_xT: torch.Tensor) -> torch.Tensor:
    """p(t) = lambda_t prod_{j<t} (1 - lambda_j) for t < T; p(T) = prod_{j<T} (1 - lambda_j)."""
    lam = torch.sigmoid(gate_logits_xT.to(F64))
    steps = lam.shape[-1]
    survive = torch.ones_like(lam[..., 0])
    pdf = []
    for t in range(steps):
        pdf.append(survive.clone() if t == steps - 1 else lam[..., t] * survive)
        survive = survive * (1 - lam[..., t])
    return torch.stack(pdf, dim=-1)


def q_exit_steps(gate_logits_xT: torch.Tensor, q: float) -> torch.Tensor:
    """0-based first step n with CDF(n) = 1 - prod_{j<=n} (1 - lambda_j) >= q (CDF(T) = 1)."""
    lam = torch.sigmoid(gate_logits_xT.to(F64))
    steps = lam.shape[-1]
    chosen = torch.full(lam.shape[:-1], steps - 1, dtype=torch.long)
    decided = torch.zeros(lam.shape[:-1], dtype=torch.bool)
    survive = torch.ones_like(lam[..., 0])
    for t in range(steps - 1):
        survive = survive * (1 - lam[..., t])
        hit = (1 - survive >= q) & ~decided
        chosen[hit] = t
        decided |= hit
    return chosen


def select_steps(step_logits_TBSV: torch.Tensor, steps_BS: torch.Tensor) -> torch.Tensor:
    """logits [B, S, V] of each token at its own (0-based) step."""
    b, s = steps_BS.shape
    out = torch.empty(step_logits_TBSV.shape[1:], dtype=step_logits_TBSV.dtype)
    for i in range(b):
        for j in range(s):
            out[i, j] = step_logits_TBSV[steps_BS[i, j], i, j]
    return out


def geometric_prior(num_steps: int, q: float) -> torch.Tensor:
    """q (1-q)^(t-1) for t < T; the remaining mass (1-q)^(T-1) at T."""
    prior = [q * (1 - q) ** (t - 1) for t in range(1, num_steps)] + [(1 - q) ** (num_steps - 1)]
    return torch.tensor(prior, dtype=F64)


# ---- the objectives --------------------------------------------------------------------


def per_step_ce(step_logits_TBSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
    """L(t) per target token [T, N], in the order of ``labels[labels != -100]``."""
    keep = labels_BS != IGNORE_INDEX
    logits_TNV = step_logits_TBSV[:, keep].to(F64)
    targets = labels_BS[keep]
    log_probs = logits_TNV - logits_TNV.logsumexp(-1, keepdim=True)
    return -log_probs[:, torch.arange(targets.numel()), targets]


def stage1_loss(
    step_logits_TBSV: torch.Tensor,
    gate_logits_BST: torch.Tensor,
    labels_BS: torch.Tensor,
    *,
    beta: float,
    regularizer: str = "entropy",
    prior: str = "uniform",
    prior_param: float = 0.5,
) -> dict[str, torch.Tensor]:
    """Stage I: mean over target tokens of sum_t p(t) L(t) - beta H(p) (entropy form), or
    + beta KL(p || prior) (KL form; prior "uniform" or "geometric"); prior "none": no term."""
    ce_TN = per_step_ce(step_logits_TBSV, labels_BS)
    p_NT = exit_pdf(gate_logits_BST[labels_BS != IGNORE_INDEX])
    steps = p_NT.shape[-1]
    expected = (p_NT * ce_TN.T).sum(-1)
    entropy = -(p_NT * torch.log(p_NT)).sum(-1)
    if prior == "none":
        reg = torch.zeros_like(entropy)
    elif regularizer == "entropy":
        reg = -entropy
    else:
        ref = torch.full((steps,), 1.0 / steps, dtype=F64)
        if prior == "geometric":
            ref = geometric_prior(steps, prior_param)
        reg = (p_NT * (torch.log(p_NT) - torch.log(ref))).sum(-1)
    return {
        "loss": (expected + beta * reg).mean(),
        "loss_per_step": ce_TN.mean(1),
        "exit_pdf_mean": p_NT.mean(0),
        "exit_entropy": entropy.mean(),
    }


def stage2_loss(
    step_logits_TBSV: torch.Tensor,
    gate_logits_BST: torch.Tensor,
    labels_BS: torch.Tensor,
    *,
    k: float = 50.0,
    gamma: float = 0.005,
) -> torch.Tensor:
    """Stage II per OURO.md: I_t = max(0, L_{t-1} - L_t) (no grad), w_t = sigmoid(k (I_t - gamma)),
    L(t) = -mean_i [w_t log(1 - lambda_t) + (1 - w_t) log lambda_t],
    total = (1/T) sum_{t=2..T} L(t)."""
    ce_TN = per_step_ce(step_logits_TBSV, labels_BS).detach()
    lam_NT = torch.sigmoid(gate_logits_BST[labels_BS != IGNORE_INDEX].to(F64))
    steps = ce_TN.shape[0]
    total = torch.zeros((), dtype=F64)
    for t in range(1, steps):
        improvement = torch.clamp(ce_TN[t - 1] - ce_TN[t], min=0.0)
        w = torch.sigmoid(k * (improvement - gamma))
        lam = lam_NT[:, t]
        total = total - (w * torch.log(1 - lam) + (1 - w) * torch.log(lam)).mean()
    return total / steps
