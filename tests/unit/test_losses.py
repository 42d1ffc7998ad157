"""The exit distribution, the fused chunked LM-head loss and the Stage I / Stage II objectives
against the independent float64 reference (tests/unit/reference.py) and hand-computed values."""

import math

import pytest
import torch

from looplm import LoopLMConfig, LoopLMForCausalLM, Objective, exit_pdf, q_exit_steps
from looplm.losses import gate_targets, stage2_gate_loss, weighted_lm_cross_entropy
from tests.unit import reference as ref
from tests.unit.test_model_numerics import close, reference_forward, tiny_model, token_ids

F64_ATOL = 1e-10
GATE = ("model.early_exit_gate.weight", "model.early_exit_gate.bias")


def gate_logits(shape, seed=0, scale=3.0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)


def batch(seed=7):
    """Inputs and already-shifted labels with ignored positions (-100), 2 x 8."""
    ids = token_ids(2, 8, seed=seed)
    labels = token_ids(2, 8, seed=seed + 1)
    labels[0, :2] = -100
    labels[1, 5] = -100
    labels[1, -1] = -100
    return ids, labels


def reference_loss_and_grads(model, ids, labels, loss_fn, trainable=None):
    """The reference loss on the model's weights, and its autograd gradients for the
    parameters named in ``trainable`` (default: all), in float64."""
    state = {
        name: p.detach().to(torch.float64).requires_grad_(trainable is None or name in trainable)
        for name, p in model.named_parameters()
    }
    step_logits, gate_logits_BST = reference_forward(model, ids, state=state)
    out = loss_fn(step_logits, gate_logits_BST, labels)
    loss = out["loss"] if isinstance(out, dict) else out
    loss.backward()
    return out, {name: t.grad for name, t in state.items()}


# ---- the exit distribution ---------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_exit_pdf_matches_reference(steps):
    z = gate_logits((5, 7, steps))
    z[0, 0] = 30.0  # near-certain exits and continuations must not lose the mass
    z[0, 1] = -30.0
    pdf = exit_pdf(z)
    close(pdf, ref.exit_pdf(z), atol=1e-12)
    close(pdf.sum(-1), torch.ones(5, 7, dtype=torch.float64), atol=1e-12)
    close(exit_pdf(z.float()), ref.exit_pdf(z), atol=1e-6)
    if steps > 1:
        assert pdf[0, 0, 0] > 0.999 and pdf[0, 1, -1] > 0.999


def test_q_exit_steps_matches_reference():
    z = gate_logits((6, 9, 4), seed=1)
    seen = set()
    for q in (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0):
        expected = ref.q_exit_steps(z, q)
        seen.update(expected.unique().tolist())
        assert torch.equal(q_exit_steps(z, q).long(), expected), q
    assert seen == {0, 1, 2, 3}
    assert (q_exit_steps(z, 0.0) == 0).all() and (q_exit_steps(z, 1.0) == 3).all()


# ---- the fused, chunked LM-head cross-entropy ----------------------------------------------


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_weighted_lm_cross_entropy_matches_naive(dtype, atol, chunk):
    gen = torch.Generator().manual_seed(3)
    m, h, v = 10, 6, 13
    hidden = torch.randn(m, h, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, v, (m,), generator=gen)
    weights = torch.rand(m, generator=gen, dtype=torch.float64)
    weights[4] = 0.0

    naive_h, naive_w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    naive_ce = torch.nn.functional.cross_entropy(naive_h @ naive_w.T, targets, reduction="none")
    naive_total = (weights * naive_ce).sum()
    naive_total.backward()

    fused_h = hidden.to(dtype).requires_grad_()
    fused_w = weight.to(dtype).requires_grad_()
    total, ce = weighted_lm_cross_entropy(fused_h, fused_w, targets, weights.to(dtype), chunk)
    (2.0 * total).backward()  # the incoming gradient must scale both results
    close(total, naive_total, atol=atol)
    close(ce, naive_ce.detach(), atol=atol)
    assert not ce.requires_grad
    close(fused_h.grad, 2.0 * naive_h.grad, atol=atol)
    close(fused_w.grad, 2.0 * naive_w.grad, atol=atol)

    with torch.no_grad():
        total_ng, ce_ng = weighted_lm_cross_entropy(
            hidden.to(dtype), weight.to(dtype), targets, weights.to(dtype), chunk
        )
    close(total_ng, naive_total, atol=atol)
    close(ce_ng, naive_ce.detach(), atol=atol)


# ---- Stage I ---------------------------------------------------------------------------------

STAGE1 = {
    "beta0": dict(beta=0.0),
    "entropy": dict(beta=0.1),
    "kl_uniform": dict(beta=0.1, regularizer="kl"),
    "kl_geometric": dict(beta=0.3, regularizer="kl", prior="geometric", prior_param=0.3),
    "no_prior": dict(beta=0.1, prior="none"),
}


def reference_stage1(settings):
    return lambda logits, z, labels: ref.stage1_loss(logits, z, labels, **settings)


@pytest.mark.parametrize("name", list(STAGE1))
def test_stage1_loss_and_gradients_match_reference(name):
    model = tiny_model(kv_heads=2)
    ids, labels = batch()
    expected, grads = reference_loss_and_grads(model, ids, labels, reference_stage1(STAGE1[name]))
    for chunk in (1, 3, 1000):  # one token per chunk, uneven chunks, one chunk for all
        model.zero_grad(set_to_none=True)
        out = model(ids, labels=labels, objective=Objective(**STAGE1[name], chunk_tokens=chunk))
        out.loss.backward()
        assert out.num_tokens == int((labels != -100).sum()) == 12
        close(out.loss, expected["loss"])
        close(out.loss_per_step, expected["loss_per_step"])
        close(out.exit_pdf_mean, expected["exit_pdf_mean"])
        close(out.exit_entropy, expected["exit_entropy"])
        for param_name, p in model.named_parameters():
            assert grads[param_name].abs().max() > 0, param_name
            close(p.grad, grads[param_name], atol=F64_ATOL)


@pytest.mark.parametrize("trainable", [GATE, ("lm_head.weight", *GATE)])
def test_with_the_lm_frozen_the_gate_gets_the_gradients_of_the_full_model(trainable):
    """A curriculum stage that trains only the gate freezes the rest by ``requires_grad``: the
    head's loss then takes its path without gradients, which must not give the gate another."""
    model = tiny_model(kv_heads=2)
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
    ids, labels = batch(seed=23)
    objective = Objective(**STAGE1["entropy"], chunk_tokens=3)
    model(ids, labels=labels, objective=objective).loss.backward()
    loss_fn = reference_stage1(STAGE1["entropy"])
    _, grads = reference_loss_and_grads(model, ids, labels, loss_fn, trainable=trainable)
    for name, p in model.named_parameters():
        if name in trainable:
            assert grads[name].abs().max() > 0, name
            close(p.grad, grads[name], atol=F64_ATOL)
        else:
            assert p.grad is None, name


@pytest.mark.parametrize("name", ["entropy", "kl_geometric"])
def test_stage1_loss_and_gradients_float32(name):
    model = tiny_model(kv_heads=2).float()
    ids, labels = batch(seed=11)
    out = model(ids, labels=labels, objective=Objective(**STAGE1[name], chunk_tokens=4))
    out.loss.backward()
    expected, grads = reference_loss_and_grads(model, ids, labels, reference_stage1(STAGE1[name]))
    assert out.loss.dtype == torch.float32
    close(out.loss, expected["loss"], atol=1e-5)
    close(out.loss_per_step, expected["loss_per_step"], atol=1e-5)
    close(out.exit_pdf_mean, expected["exit_pdf_mean"], atol=1e-5)
    close(out.exit_entropy, expected["exit_entropy"], atol=1e-5)
    for param_name, p in model.named_parameters():
        close(p.grad, grads[param_name], atol=1e-5, rtol=1e-4)


def test_kl_uniform_is_entropy_form_plus_beta_log_t():
    model = tiny_model(kv_heads=2, steps=4)
    ids, labels = batch(seed=13)
    beta = 0.2
    entropy = model(ids, labels=labels, objective=Objective(beta=beta)).loss
    kl = model(ids, labels=labels, objective=Objective(beta=beta, regularizer="kl")).loss
    close(kl, entropy + beta * math.log(4), atol=1e-12)
    no_reg = model(ids, labels=labels, objective=Objective(beta=0.0)).loss
    assert abs(entropy - no_reg) > 1e-3  # the regularizer is not trivially zero


def test_stage1_loss_gradcheck():
    cfg = LoopLMConfig(
        vocab_size=7,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        rope_theta=100.0,
        max_position_embeddings=16,
        total_ut_steps=2,
    )
    model = LoopLMForCausalLM(cfg, attn_implementation="eager").double()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.5 * noise)
    ids = torch.tensor([[1, 4, 6, 2, 5]])
    labels = torch.tensor([[4, 6, -100, 5, 3]])
    names = ["model.embed_tokens.weight", "model.early_exit_gate.weight", "model.norm.weight"]
    params = dict(model.named_parameters())
    inputs = tuple(params[n].detach().clone().requires_grad_() for n in names)
    objective = Objective(beta=0.1, chunk_tokens=3)

    def loss(*tensors):
        kwargs = {"labels": labels, "objective": objective}
        return torch.func.functional_call(
            model, dict(zip(names, tensors, strict=True)), (ids,), kwargs
        ).loss

    assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


# ---- Stage II --------------------------------------------------------------------------------


def test_stage2_hand_computed_example():
    """T = 3, two tokens, k = 50, gamma = 0.005, worked out by hand."""
    ce_TN = torch.tensor([[2.0, 1.0], [1.5, 1.2], [1.49, 0.7]], dtype=torch.float64)
    # improvements I_t = max(0, L_{t-1} - L_t): token 0: 0.5, 0.01; token 1: 0 (clamped), 0.5
    # targets w = sigmoid(50 (I - 0.005)): sigmoid(24.75), sigmoid(0.25); sigmoid(-0.25), ...
    w_big, w_plus, w_minus = 0.9999999999821676, 0.5621765008857981, 0.43782349911420193
    close(
        gate_targets(ce_TN, 50.0, 0.005),
        torch.tensor([[w_big, w_minus], [w_plus, w_big]], dtype=torch.float64),
        atol=1e-15,
    )
    # lambda: token 0: step 2 1/2, step 3 3/4; token 1: step 2 1/4, step 3 4/5 (step 1 unused)
    z_NT = torch.tensor(
        [[0.3, 0.0, math.log(3.0)], [-1.0, -math.log(3.0), math.log(4.0)]],
        dtype=torch.float64,
        requires_grad=True,
    )
    # BCE = -(w log(1 - lambda) + (1 - w) log lambda):
    # step 2: token 0: log 2 = 0.6931471805599453 (any w at lambda = 1/2);
    #         token 1: w_minus log(4/3) + (1 - w_minus) log 4 = 0.905296084725357
    # step 3: token 0: w_plus log 4 + (1 - w_plus) log(4/3) = 0.905296084725357;
    #         token 1: ~log 5 = 1.6094379124093796
    # means: 0.7992216326426511, 1.2573669985673683; total (1/T) sum = 0.6855295437366732
    loss = stage2_gate_loss(ce_TN, z_NT, 50.0, 0.005)
    close(loss, torch.tensor(0.6855295437366732, dtype=torch.float64), atol=1e-13)
    loss.backward()
    # d/dz BCE = lambda - (1 - w); the first step's gate gets nothing.
    lam = torch.tensor([[0.5, 0.75], [0.25, 0.8]], dtype=torch.float64)
    w = torch.tensor([[w_big, w_plus], [w_minus, w_big]], dtype=torch.float64)
    expected_grad = torch.zeros(2, 3, dtype=torch.float64)
    expected_grad[:, 1:] = (lam - (1 - w)) / (2 * 3)
    close(z_NT.grad, expected_grad, atol=1e-13)


def test_stage2_loss_matches_reference():
    model = tiny_model(kv_heads=2, steps=4)
    ids, labels = batch(seed=17)
    objective = Objective(kind="stage2", gate_k=50.0, gate_gamma=0.005, chunk_tokens=3)
    out = model(ids, labels=labels, objective=objective)
    out.loss.backward()

    def loss_fn(logits, z, labels_BS):
        return ref.stage2_loss(logits, z, labels_BS, k=50.0, gamma=0.005)

    expected, grads = reference_loss_and_grads(model, ids, labels, loss_fn, trainable=GATE)
    close(out.loss, expected)
    step_logits, z = reference_forward(model, ids)
    stats = ref.stage1_loss(step_logits, z, labels, beta=0.0)
    close(out.loss_per_step, stats["loss_per_step"])
    close(out.exit_pdf_mean, stats["exit_pdf_mean"])
    close(out.exit_entropy, stats["exit_entropy"])
    for name in GATE:
        assert grads[name].abs().max() > 0
        close(dict(model.named_parameters())[name].grad, grads[name])


def test_stage2_trains_only_the_gate():
    """OURO.md §2: in Stage II the LM is frozen and only the gate trains."""
    model = tiny_model(kv_heads=2)
    ids, labels = batch(seed=19)
    before = model(ids, return_all_steps=True).step_logits.detach()
    model(ids, labels=labels, objective=Objective(kind="stage2")).loss.backward()
    leaked = [
        name
        for name, p in model.named_parameters()
        if name not in GATE and p.grad is not None and p.grad.abs().max() > 0
    ]
    assert leaked == [], f"Stage II loss sends gradient into the LM: {leaked}"
    for name in GATE:
        assert dict(model.named_parameters())[name].grad.abs().max() > 0
    # A gate-only update leaves the token predictions unchanged.
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.5 * p.grad
    close(model(ids, return_all_steps=True).step_logits, before, atol=0.0)


# ---- the last step's loss alone (the looped_last ablation) --------------------------------


def test_last_step_loss_is_the_last_steps_cross_entropy_and_leaves_the_gate_untrained():
    model = tiny_model(kv_heads=2, steps=3)
    ids, labels = batch(seed=23)
    out = model(ids, labels=labels, objective=Objective(kind="last_step", chunk_tokens=5))
    out.loss.backward()

    def loss_fn(step_logits, z, labels_BS):
        keep = labels_BS != -100
        return torch.nn.functional.cross_entropy(step_logits[-1][keep], labels_BS[keep])

    expected, grads = reference_loss_and_grads(model, ids, labels, loss_fn)
    close(out.loss, expected)
    step_logits, z = reference_forward(model, ids)
    stats = ref.stage1_loss(step_logits, z, labels, beta=0.0)
    close(out.loss_per_step, stats["loss_per_step"])
    close(out.loss_per_step[-1], expected)
    close(out.exit_pdf_mean, stats["exit_pdf_mean"])
    for name, p in model.named_parameters():
        assert p.grad is not None, name  # every parameter takes part (ZeRO reduces them all)
        if name in GATE:  # the reference does not reach the gate at all
            assert grads[name] is None and not p.grad.any(), name
        else:
            assert p.grad.abs().max() > 0, name
            close(p.grad, grads[name], atol=F64_ATOL)
