"""Exit distribution, the Stage I and Stage II objectives, and the chunked LM-head loss.

Shape legend: T recurrent steps, B batch, S sequence, M rows of a flattened hidden state,
N target tokens (rows with a target), C a chunk of them, H hidden, V vocab.

Stage I  (OURO.md §2): ``sum_t p(t|x) L(t) + beta * R(p)`` per token, where R is ``-H(p)``
(entropy form) or ``KL(p || prior)`` (KL form; for the uniform prior it equals ``-H + log T``).
Stage II: binary cross-entropy of the gate against a detached improvement target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
PRIORS = ("uniform", "geometric", "none")
REGULARIZERS = ("entropy", "kl")


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half precisions, the input's own for float32/float64."""
    return torch.promote_types(dtype, torch.float32)


# ---- the exit distribution -------------------------------------------------------------


def exit_log_pdf(gate_logits_xT: torch.Tensor) -> torch.Tensor:
    """log p(t) from the gate logits z_t (lambda_t = sigmoid(z_t)), over the last dim.

    p(t) = lambda_t * prod_{j<t} (1 - lambda_j) for t < T; the last step takes the rest.
    Computed in log space (float32 at least) so that no probability underflows.
    """
    z = gate_logits_xT.to(_accumulation_dtype(gate_logits_xT.dtype))
    log_continue = F.logsigmoid(-z)
    survive = F.pad(log_continue.cumsum(-1)[..., :-1], (1, 0))  # sum_{j<t} log(1 - lambda_j)
    log_exit = F.logsigmoid(z) + survive
    return torch.cat((log_exit[..., :-1], survive[..., -1:]), dim=-1)


def exit_pdf(gate_logits_xT: torch.Tensor) -> torch.Tensor:
    return exit_log_pdf(gate_logits_xT).exp()


def q_exit_steps(gate_logits_xT: torch.Tensor, threshold: float) -> torch.Tensor:
    """0-based step at which each token exits under Q-exit with threshold q.

    CDF(n) = 1 - prod_{j<=n} (1 - lambda_j), CDF(T) = 1; the exit is the first n with
    CDF(n) >= q.
    """
    z = gate_logits_xT.to(_accumulation_dtype(gate_logits_xT.dtype))
    cdf = 1.0 - torch.exp(F.logsigmoid(-z).cumsum(-1))
    cdf[..., -1] = 1.0
    return (cdf >= threshold).int().argmax(dim=-1)


def log_prior(
    kind: str, num_steps: int, param: float, device=None, dtype=torch.float32
) -> torch.Tensor:
    """log of a prior over exit steps [T]: uniform, or geometric with success probability param
    (truncated: the last step takes the remaining mass, as the exit distribution does)."""
    if kind == "uniform":
        return torch.full((num_steps,), -math.log(num_steps), device=device, dtype=dtype)
    if kind == "geometric":
        if not 0.0 < param < 1.0:
            raise ValueError(f"a geometric prior needs 0 < prior_param < 1, got {param}")
        t = torch.arange(num_steps, device=device, dtype=torch.float64)
        logp = math.log(param) + t * math.log1p(-param)
        logp[-1] = (num_steps - 1) * math.log1p(-param)
        return logp.to(dtype)
    raise ValueError(f"unknown exit prior {kind!r}; choose one of {PRIORS}")


OBJECTIVE_KINDS = ("stage1", "stage2", "last_step")


@dataclass
class Objective:
    """Which training objective a forward with labels computes, and its settings."""

    kind: str = "stage1"  # "stage1" (joint LM + exit), "stage2" (gate only, LM frozen) or
    # "last_step" (the last step's cross-entropy only, no exit gate: plain looped training)
    beta: float = 0.1  # weight of the exit regularizer (Stage I)
    prior: str = "uniform"  # "uniform", "geometric" or "none" (no regularizer)
    prior_param: float = 0.5  # success probability of the geometric prior
    regularizer: str = "entropy"  # "entropy": -beta H(p); "kl": beta KL(p || prior)
    gate_k: float = 50.0  # Stage II: slope of the continuation target
    gate_gamma: float = 0.005  # Stage II: improvement threshold of the continuation target
    chunk_tokens: int | None = None  # LM-head chunk; None sizes chunks to ~256 MiB of logits

    def __post_init__(self) -> None:
        problems = []
        if self.kind not in OBJECTIVE_KINDS:
            problems.append(f"objective kind must be one of {OBJECTIVE_KINDS}, got {self.kind!r}")
        if self.prior not in PRIORS:
            problems.append(f"prior must be one of {PRIORS}, got {self.prior!r}")
        if self.regularizer not in REGULARIZERS:
            problems.append(f"regularizer must be one of {REGULARIZERS}, got {self.regularizer!r}")
        if self.regularizer == "entropy" and self.prior == "geometric":
            problems.append(
                "a geometric prior needs regularizer='kl' (the entropy form is uniform)"
            )
        if self.prior == "geometric" and not 0.0 < self.prior_param < 1.0:
            problems.append(f"prior_param must lie in (0, 1), got {self.prior_param}")
        if self.beta < 0:
            problems.append(f"beta must be >= 0, got {self.beta}")
        if problems:
            raise ValueError("invalid objective:\n  - " + "\n  - ".join(problems))


def exit_regularizer(log_p_NT: torch.Tensor, objective: Objective) -> torch.Tensor:
    """Per-token regularizer R(p) [N]: -H(p) or KL(p || prior)."""
    p = log_p_NT.exp()
    if objective.prior == "none":
        return torch.zeros_like(p[:, 0])
    if objective.regularizer == "entropy":
        return (p * log_p_NT).sum(-1)
    prior = log_prior(objective.prior, p.shape[-1], objective.prior_param, p.device, p.dtype)
    return (p * (log_p_NT - prior)).sum(-1)


# ---- the LM head and cross-entropy, fused and chunked -----------------------------------


def _auto_chunk(vocab_size: int) -> int:
    """Tokens per chunk: ~128 MiB of float32 logits (1024 tokens at V = 32768)."""
    return max(128, (128 * 2**20) // (4 * vocab_size))


def _chunks(total: int, size: int):
    for start in range(0, total, size):
        yield start, min(start + size, total)


def _log_probs(hidden_CH: torch.Tensor, weight_VH: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    return torch.log_softmax((hidden_CH @ weight_VH.T).to(acc), dim=-1)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """sum_{t,n} w_tn CE(h_t[rows_n] @ W.T, y_n) over the steps' hidden states, with the
    gradients computed chunk by chunk in the forward pass: no [tokens, V] tensor outlives its
    chunk, the hidden states are read in place (only the target rows, a chunk at a time), and
    the head's weight gradient is one accumulator for all steps.

    The token weights w are constants here; the gradient of the objective with respect to
    them comes from the caller through the detached per-token losses (also returned)."""

    @staticmethod
    def forward(ctx, weight_VH, rows_N, targets_N, weights_TN, chunk, *hidden_MH):
        acc = _accumulation_dtype(hidden_MH[0].dtype)
        n, device = rows_N.shape[0], weight_VH.device
        ce_TN = torch.empty(len(hidden_MH), n, dtype=acc, device=device)
        grad_w = torch.zeros(weight_VH.shape, dtype=acc, device=device)
        grads_h = []
        for t, hidden in enumerate(hidden_MH):
            grad_h = torch.zeros_like(hidden)
            for s, e in _chunks(n, chunk):
                rows, targets = rows_N[s:e], targets_N[s:e, None]
                h = hidden.index_select(0, rows)
                grad_logits = _log_probs(h, weight_VH, acc)
                ce_TN[t, s:e] = -grad_logits.gather(1, targets).squeeze(1)
                grad_logits.exp_().scatter_add_(
                    1, targets, grad_logits.new_full(targets.shape, -1.0)
                )
                grad_logits = grad_logits.mul_(weights_TN[t, s:e, None]).to(h.dtype)
                grad_h.index_copy_(0, rows, grad_logits @ weight_VH)
                if grad_w.dtype == h.dtype:
                    grad_w.addmm_(grad_logits.T, h)
                else:
                    grad_w += (grad_logits.T @ h).to(acc)
                del grad_logits, h
            grads_h.append(grad_h)
        ctx.save_for_backward(grad_w, *grads_h)
        ctx.weight_dtype = weight_VH.dtype
        ctx.mark_non_differentiable(ce_TN)
        return (ce_TN * weights_TN.to(acc)).sum(), ce_TN

    @staticmethod
    def backward(ctx, grad_total, _grad_ce):
        grad_w, *grads_h = ctx.saved_tensors
        scaled_h = [g * grad_total.to(g.dtype) for g in grads_h]
        return ((grad_w * grad_total).to(ctx.weight_dtype), None, None, None, None, *scaled_h)


def chunked_cross_entropy(hidden_MH, weight_VH, rows_N, targets_N, chunk: int) -> torch.Tensor:
    """Cross-entropy [N] of the target rows of ``hidden @ weight.T``, without gradients."""
    return _chunked_scores(hidden_MH, weight_VH, rows_N, targets_N, chunk, hits=False)[0]


def chunked_cross_entropy_and_hits(
    hidden_MH, weight_VH, rows_N, targets_N, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``chunked_cross_entropy`` and whether each row's most likely token is its target [N]."""
    return _chunked_scores(hidden_MH, weight_VH, rows_N, targets_N, chunk, hits=True)


def _chunked_scores(hidden_MH, weight_VH, rows_N, targets_N, chunk: int, hits: bool):
    acc = _accumulation_dtype(hidden_MH.dtype)
    out = torch.empty(rows_N.shape[0], dtype=acc, device=hidden_MH.device)
    correct = torch.empty(rows_N.shape[0] if hits else 0, dtype=torch.bool, device=out.device)
    with torch.no_grad():
        for s, e in _chunks(rows_N.shape[0], chunk):
            log_probs = _log_probs(hidden_MH.index_select(0, rows_N[s:e]), weight_VH, acc)
            out[s:e] = -log_probs.gather(1, targets_N[s:e, None]).squeeze(1)
            if hits:
                correct[s:e] = log_probs.argmax(-1) == targets_N[s:e]
    return out, correct


def weighted_lm_cross_entropy(
    hidden: torch.Tensor | list[torch.Tensor],
    weight_VH: torch.Tensor,
    targets_N: torch.Tensor,
    weights: torch.Tensor,
    chunk_tokens: int | None = None,
    rows_N: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The LM head's weighted cross-entropy, fused and chunked.

    Args:
        hidden: one [M, H] tensor, or the T steps' [M, H] hidden states as a list.
        targets_N: target ids of the N target rows.
        weights: [N] (one tensor) or [T, N] (a list): the constant weight of each loss term.
        rows_N: which rows of each hidden tensor have targets (default: all, N = M).
    Returns:
        (sum of w * CE with gradients to hidden and weight, detached CE: [N] or [T, N]).
    """
    single = isinstance(hidden, torch.Tensor)
    hidden_list = [hidden] if single else list(hidden)
    weights_TN = weights[None] if single else weights
    if rows_N is None:
        rows_N = torch.arange(hidden_list[0].shape[0], device=targets_N.device)
    chunk = chunk_tokens or _auto_chunk(weight_VH.shape[0])
    needs_grad = torch.is_grad_enabled() and (
        weight_VH.requires_grad or any(h.requires_grad for h in hidden_list)
    )
    if needs_grad:
        total, ce_TN = _FusedLinearCrossEntropy.apply(
            weight_VH, rows_N, targets_N, weights_TN.detach(), chunk, *hidden_list
        )
    else:
        ce_TN = torch.stack(
            [chunked_cross_entropy(h, weight_VH, rows_N, targets_N, chunk) for h in hidden_list]
        )
        total = (ce_TN * weights_TN.detach().to(ce_TN.dtype)).sum()  # constants, as above
    return total, (ce_TN[0] if single else ce_TN)


# ---- the objectives ---------------------------------------------------------------------


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, with gradients
    loss_per_step: torch.Tensor  # [T] mean cross-entropy of each step (detached)
    exit_pdf_mean: torch.Tensor  # [T] exit distribution averaged over target tokens (detached)
    exit_entropy: torch.Tensor  # scalar mean entropy of the exit distribution (detached)
    num_tokens: int  # target tokens the means are over


def _targets(labels_BS: torch.Tensor, gate_logits_BST: torch.Tensor):
    """Flat positions [N] that have a target, those targets [N], and their gate logits [N, T]."""
    flat = labels_BS.reshape(-1)
    rows = (flat != IGNORE_INDEX).nonzero().squeeze(1)
    return rows, flat[rows], gate_logits_BST.reshape(-1, gate_logits_BST.shape[-1])[rows]


def _head_losses(lm_head, step_hidden, rows_N, y_N, weights_TN, objective: Objective):
    """(weighted sum, per-step cross-entropy [T, N]) of the target rows of every step."""
    return lm_head(
        [h.reshape(-1, h.shape[-1]) for h in step_hidden],
        targets=y_N,
        token_weights=weights_TN,
        chunk_tokens=objective.chunk_tokens,
        rows=rows_N,
    )


def _stats(ce_TN, log_p_NT, loss) -> LossOutput:
    n = ce_TN.shape[1]
    p = log_p_NT.detach().exp()
    entropy = -(p * log_p_NT.detach()).sum(-1)
    denominator = max(n, 1)
    return LossOutput(
        loss=loss,
        loss_per_step=ce_TN.sum(1) / denominator,
        exit_pdf_mean=p.sum(0) / denominator,
        exit_entropy=entropy.sum() / denominator,
        num_tokens=n,
    )


def stage1_loss(
    step_hidden: list[torch.Tensor],
    gate_logits_BST: torch.Tensor,
    labels_BS: torch.Tensor,
    lm_head: torch.nn.Module,
    objective: Objective,
) -> LossOutput:
    """Stage I: expected per-step cross-entropy under the exit distribution plus beta R(p).

    ``step_hidden`` holds each step's [B, S, H] hidden state. ``labels_BS[b, i]`` is the target
    of position i (already shifted), IGNORE_INDEX to skip. ``lm_head`` is called as a module
    (so that sharded-parameter hooks run) with
    ``lm_head(hidden, targets=..., token_weights=..., chunk_tokens=..., rows=...)``.
    """
    rows_N, y_N, z_NT = _targets(labels_BS, gate_logits_BST)
    log_p_NT = exit_log_pdf(z_NT)
    p_TN = log_p_NT.exp().T
    denominator = max(rows_N.shape[0], 1)
    weighted, ce_TN = _head_losses(lm_head, step_hidden, rows_N, y_N, p_TN / denominator, objective)
    # value: sum_t p L / N; gradients: to the LM through `weighted`, to the gate through p.
    expected = (p_TN * ce_TN).sum() / denominator + (weighted - weighted.detach())
    regularizer = exit_regularizer(log_p_NT, objective).sum() / denominator
    return _stats(ce_TN, log_p_NT, expected + objective.beta * regularizer)


def last_step_loss(
    step_hidden: list[torch.Tensor],
    gate_logits_BST: torch.Tensor,
    labels_BS: torch.Tensor,
    lm_head: torch.nn.Module,
    objective: Objective,
) -> LossOutput:
    """The last step's mean cross-entropy alone: a looped model trained the usual way, read out
    only after its T steps (the exit gate gets no gradient). The other steps' losses are
    measured for the metrics."""
    rows_N, y_N, z_NT = _targets(labels_BS, gate_logits_BST)
    dtype = torch.promote_types(step_hidden[0].dtype, torch.float32)
    weights_TN = torch.zeros(len(step_hidden), rows_N.shape[0], device=y_N.device, dtype=dtype)
    weights_TN[-1] = 1.0 / max(rows_N.shape[0], 1)
    loss, ce_TN = _head_losses(lm_head, step_hidden, rows_N, y_N, weights_TN, objective)
    # The gate's logits join the graph with weight zero, so that every parameter has a gradient.
    return _stats(ce_TN, exit_log_pdf(z_NT), loss + 0.0 * z_NT.sum())


def gate_targets(ce_TN: torch.Tensor, k: float, gamma: float) -> torch.Tensor:
    """Continuation targets w_t [T-1, N] for t = 2..T: sigmoid(k (max(0, L_{t-1} - L_t) - gamma))."""
    improvement = (ce_TN[:-1] - ce_TN[1:]).clamp(min=0.0)
    return torch.sigmoid(k * (improvement - gamma))


def stage2_gate_loss(ce_TN: torch.Tensor, gate_logits_NT: torch.Tensor, k: float, gamma: float):
    """Stage II: (1/T) sum_{t=2..T} -mean_i [w_t log(1 - lambda_t) + (1 - w_t) log lambda_t]."""
    t = ce_TN.shape[0]
    acc = _accumulation_dtype(gate_logits_NT.dtype)
    w = gate_targets(ce_TN.detach().to(acc), k, gamma)  # [T-1, N]
    z = gate_logits_NT.to(acc).T[1:]  # [T-1, N]: the gates of steps 2..T
    if w.shape[1] == 0:
        return z.sum() * 0.0
    bce = -(w * F.logsigmoid(-z) + (1.0 - w) * F.logsigmoid(z))
    return bce.mean(dim=1).sum() / t


def stage2_loss(
    step_hidden: list[torch.Tensor],
    gate_logits_BST: torch.Tensor,
    labels_BS: torch.Tensor,
    lm_head: torch.nn.Module,
    objective: Objective,
) -> LossOutput:
    """Stage II objective on one batch; the per-step losses carry no gradient."""
    rows_N, y_N, z_NT = _targets(labels_BS, gate_logits_BST)
    no_weights = torch.zeros(len(step_hidden), rows_N.shape[0], device=y_N.device)
    with torch.no_grad():
        _, ce_TN = _head_losses(lm_head, step_hidden, rows_N, y_N, no_weights, objective)
    loss = stage2_gate_loss(ce_TN, z_NT, objective.gate_k, objective.gate_gamma)
    return _stats(ce_TN, exit_log_pdf(z_NT), loss)
