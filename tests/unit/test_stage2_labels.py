"""The Stage II label rule (OURO.md §2) against hand-computed values and an independent float64
computation in plain Python: targets w_t = sigmoid(k (max(0, L_{t-1} - L_t) - gamma)), the
binary cross-entropy of the gates of steps 2..T, and the masking of ignored positions."""

import math

import pytest
import torch

from looplm import Objective
from looplm.losses import IGNORE_INDEX, gate_targets, stage2_gate_loss, stage2_loss
from looplm.modeling import LMHead


def python_targets(losses: list[list[float]], k: float, gamma: float) -> list[list[float]]:
    """w[t-1][i] for t = 2..T, one float at a time."""
    return [
        [
            1.0 / (1.0 + math.exp(-k * (max(0.0, before - after) - gamma)))
            for before, after in zip(losses[t - 1], losses[t], strict=True)
        ]
        for t in range(1, len(losses))
    ]


def python_gate_loss(losses, gate_logits, k: float, gamma: float) -> float:
    """(1/T) sum_{t=2..T} -mean_i [w log(1 - lambda) + (1 - w) log lambda], lambda = sigmoid(z)."""
    steps, total = len(losses), 0.0
    for t, row in enumerate(python_targets(losses, k, gamma), start=1):
        terms = []
        for i, w in enumerate(row):
            lam = 1.0 / (1.0 + math.exp(-gate_logits[i][t]))
            terms.append(-(w * math.log(1.0 - lam) + (1.0 - w) * math.log(lam)))
        total += sum(terms) / len(terms)
    return total / steps


def test_targets_by_hand():
    """k = 50, gamma = 0.005: no improvement, a worsening, exactly gamma, and a large one."""
    ce_TN = torch.tensor([[3.0, 3.0, 3.0, 3.0], [3.0, 3.2, 2.995, 2.0]], dtype=torch.float64)
    w = gate_targets(ce_TN, 50.0, 0.005)
    sigmoid_minus_quarter = 1.0 / (1.0 + math.exp(0.25))  # I = 0: sigmoid(-50 x 0.005)
    expected = [sigmoid_minus_quarter, sigmoid_minus_quarter, 0.5, 1.0 / (1.0 + math.exp(-49.75))]
    assert w.shape == (1, 4)
    assert w[0].tolist() == pytest.approx(expected, abs=1e-12)
    assert w[0, 1] == w[0, 0], "a step that makes a token worse counts as no improvement"


@pytest.mark.parametrize("k,gamma", [(50.0, 0.005), (10.0, 0.1), (200.0, 0.0)])
def test_targets_and_loss_match_plain_python(k, gamma):
    gen = torch.Generator().manual_seed(3)
    ce_TN = 2.0 + 0.3 * torch.randn(4, 7, generator=gen, dtype=torch.float64)
    z_NT = 2.0 * torch.randn(7, 4, generator=gen, dtype=torch.float64)
    losses, logits = ce_TN.tolist(), z_NT.tolist()
    w = gate_targets(ce_TN, k, gamma)
    for row, expected in zip(w.tolist(), python_targets(losses, k, gamma), strict=True):
        assert row == pytest.approx(expected, abs=1e-13)
    loss = stage2_gate_loss(ce_TN, z_NT, k, gamma)
    assert loss.item() == pytest.approx(python_gate_loss(losses, logits, k, gamma), abs=1e-12)


def test_one_step_has_no_gate_loss():
    z_NT = torch.zeros(3, 1, dtype=torch.float64, requires_grad=True)
    loss = stage2_gate_loss(torch.ones(1, 3, dtype=torch.float64), z_NT, 50.0, 0.005)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(z_NT.grad, torch.zeros_like(z_NT))


def test_stage2_loss_masks_ignored_positions_and_trains_only_the_gate_logits():
    """The whole Stage II loss on a [2, 3] batch with two ignored positions: the per-step
    cross-entropy, the targets and the gate loss come from the four labelled positions only."""
    gen = torch.Generator().manual_seed(5)
    steps, vocab, hidden = 3, 11, 6
    head = LMHead(hidden, vocab, bias=False).double()
    torch.nn.init.normal_(head.weight, generator=gen)
    step_hidden = [torch.randn(2, 3, hidden, generator=gen, dtype=torch.float64) for _ in range(3)]
    z_BST = torch.randn(2, 3, steps, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[4, IGNORE_INDEX, 9], [IGNORE_INDEX, 0, 2]])
    objective = Objective(kind="stage2", gate_k=20.0, gate_gamma=0.05, chunk_tokens=2)
    out = stage2_loss(step_hidden, z_BST, labels, head, objective)

    positions = [(0, 0), (0, 2), (1, 1), (1, 2)]
    weight = head.weight.detach().tolist()
    losses = []
    for h in step_hidden:
        row = []
        for b, s in positions:
            logits = [sum(x * y for x, y in zip(h[b, s].tolist(), w, strict=True)) for w in weight]
            top = max(logits)
            log_sum = top + math.log(sum(math.exp(v - top) for v in logits))
            row.append(log_sum - logits[int(labels[b, s])])
        losses.append(row)
    logits_NT = [z_BST[b, s].tolist() for b, s in positions]
    expected = python_gate_loss(losses, logits_NT, 20.0, 0.05)
    assert out.num_tokens == 4
    assert out.loss.item() == pytest.approx(expected, abs=1e-12)
    assert out.loss_per_step.tolist() == pytest.approx([sum(r) / 4 for r in losses], abs=1e-12)
    out.loss.backward()
    assert head.weight.grad is None, "the per-step losses carry no gradient"
    ignored = z_BST.grad[labels == IGNORE_INDEX]
    assert torch.equal(ignored, torch.zeros_like(ignored))
    assert torch.equal(z_BST.grad[..., 0], torch.zeros(2, 3, dtype=torch.float64))
    assert z_BST.grad[labels != IGNORE_INDEX][:, 1:].abs().min() > 0
