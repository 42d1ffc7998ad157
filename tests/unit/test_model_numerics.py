"""The model's forward pass against the independent float64 reference (tests/unit/reference.py)
and against the golden outputs of the released Ouro code (tests/assets/ouro-tiny)."""

import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from looplm import LoopLMConfig, LoopLMForCausalLM, Objective, attention
from looplm.attention import AttentionLayout, attend
from tests.unit import reference as ref

OURO_TINY = os.path.join(os.path.dirname(__file__), "..", "assets", "ouro-tiny")
F64_ATOL = 1e-10
VOCAB = 97


def tiny_model(
    *, kv_heads: int = 4, attn: str = "sdpa", steps: int = 3, seed: int = 0, **changes
) -> LoopLMForCausalLM:
    """A float64 model with weights large enough that attention, norms and gates all matter
    (the default 0.02 init leaves every exit pdf near 1/2, 1/4, ...)."""
    cfg = LoopLMConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        rope_theta=1000.0,
        max_position_embeddings=64,
        total_ut_steps=steps,
        **changes,
    )
    model = LoopLMForCausalLM(cfg, attn_implementation=attn).double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.3 * noise)
    return model


def reference_forward(model, ids, position_ids=None, num_steps=None, state=None, rope_theta=None):
    """The reference's (step_logits, gate_logits) with the model's weights (or ``state``)."""
    cfg = model.config
    return ref.forward(
        model.state_dict() if state is None else state,
        ids,
        num_heads=cfg.num_attention_heads,
        num_steps=num_steps or cfg.total_ut_steps,
        rope_theta=rope_theta or cfg.rope_theta,
        eps=cfg.rms_norm_eps,
        position_ids_BS=position_ids,
    )


def token_ids(batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def close(actual, expected, atol=F64_ATOL, rtol=0.0):
    torch.testing.assert_close(actual, expected.to(actual.dtype), atol=atol, rtol=rtol)


# ---- per-step outputs ------------------------------------------------------------------

ARCHS = [(4, "sdpa"), (4, "eager"), (2, "sdpa"), (2, "eager")]  # MHA and GQA


@pytest.mark.parametrize(
    "kv_heads,attn,head_dim", [(*a, None) for a in ARCHS] + [(1, "sdpa", 12), (2, "eager", 6)]
)
def test_step_logits_and_exit_pdf_match_reference(kv_heads, attn, head_dim):
    model = tiny_model(kv_heads=kv_heads, attn=attn, head_dim=head_dim)
    ids = token_ids(2, 11)
    out = model(ids, return_all_steps=True)
    step_logits, gate_logits = reference_forward(model, ids)
    assert out.step_logits.shape == (3, 2, 11, VOCAB)
    close(out.step_logits, step_logits)
    close(out.gate_logits, gate_logits)
    pdf = ref.exit_pdf(gate_logits)
    close(out.exit_pdf, pdf)
    close(out.exit_pdf.sum(-1), torch.ones(2, 11, dtype=torch.float64), atol=1e-12)
    # The steps really differ, and the exit distribution is far from uniform.
    assert (step_logits[0] - step_logits[-1]).abs().max() > 0.1
    assert pdf.max() > 0.8 and pdf.min() < 0.05


def test_q_exit_and_exit_at_step_logits_match_reference():
    model = tiny_model(kv_heads=2, early_exit_threshold=0.6)
    ids = token_ids(2, 13, seed=2)
    step_logits, gate_logits = reference_forward(model, ids)
    chosen_counts = set()
    for q in (0.0, 0.2, 0.5, 0.6, 0.9, 1.0):
        steps = ref.q_exit_steps(gate_logits, q)
        chosen_counts.add(len(steps.unique()))
        out = model(ids, exit_threshold=q)
        close(out.logits, ref.select_steps(step_logits, steps))
    assert max(chosen_counts) == 3  # some threshold sends tokens to every step
    default = model(ids)
    close(default.logits, ref.select_steps(step_logits, ref.q_exit_steps(gate_logits, 0.6)))
    for step in (1, 2, 3):
        out = model(ids, exit_at_step=step)
        close(out.logits, step_logits[step - 1])


@pytest.mark.parametrize("num_steps", [1, 2, 5])
def test_num_steps_override_matches_reference(num_steps):
    model = tiny_model(kv_heads=2)
    ids = token_ids(1, 9, seed=3)
    out = model(ids, num_steps=num_steps, return_all_steps=True)
    step_logits, gate_logits = reference_forward(model, ids, num_steps=num_steps)
    assert out.step_logits.shape[0] == num_steps and out.exit_pdf.shape[-1] == num_steps
    close(out.step_logits, step_logits)
    close(out.exit_pdf, ref.exit_pdf(gate_logits))
    close(out.logits, step_logits[-1])  # config threshold 1.0: the last step
    # The first steps do not depend on how many follow.
    common = min(num_steps, 3)
    close(out.step_logits[:common], model(ids, return_all_steps=True).step_logits[:common])


# ---- the golden checkpoint of the released code -------------------------------------------


def golden():
    expected = load_file(os.path.join(OURO_TINY, "expected_outputs.safetensors"))
    weights = load_file(os.path.join(OURO_TINY, "model.safetensors"))
    with open(os.path.join(OURO_TINY, "config.json")) as f:
        config = json.load(f)
    return expected, weights, config


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-5), (torch.float32, 1e-4)])
def test_golden_checkpoint_outputs(dtype, atol):
    expected, _, _ = golden()
    model = LoopLMForCausalLM.from_pretrained(OURO_TINY, dtype=dtype)
    assert model.lm_head.weight.dtype == dtype
    ids = expected["input_ids"]
    with torch.no_grad():
        out = model(ids, return_all_steps=True)
        q05 = model(ids, exit_threshold=0.5)
    close(out.step_logits, expected["step_logits"], atol=atol)
    close(out.exit_pdf, expected["exit_pdf"], atol=atol)
    close(out.logits, expected["logits_default"], atol=atol)
    close(q05.logits, expected["logits_q0.5"], atol=atol)
    assert (expected["logits_q0.5"] - expected["logits_default"]).abs().max() > 0.1


def test_reference_agrees_with_golden_checkpoint():
    expected, weights, config = golden()
    step_logits, gate_logits = ref.forward(
        weights,
        expected["input_ids"],
        num_heads=config["num_attention_heads"],
        num_steps=config["total_ut_steps"],
        rope_theta=config["rope_theta"],
        eps=config["rms_norm_eps"],
    )
    close(step_logits, expected["step_logits"], atol=1e-5)
    close(ref.exit_pdf(gate_logits), expected["exit_pdf"], atol=1e-5)
    default = ref.select_steps(step_logits, ref.q_exit_steps(gate_logits, 1.0))
    close(default, expected["logits_default"], atol=1e-5)
    q05 = ref.select_steps(step_logits, ref.q_exit_steps(gate_logits, 0.5))
    close(q05, expected["logits_q0.5"], atol=1e-5)


# ---- packed documents --------------------------------------------------------------------


@pytest.mark.parametrize("kv_heads,attn", ARCHS)
def test_packed_documents_equal_separate_runs(kv_heads, attn):
    model = tiny_model(kv_heads=kv_heads, attn=attn)
    rows = [[5, 4, 3], [7, 5]]  # document lengths of each packed row of 12 tokens
    ids = token_ids(2, 12, seed=4)
    position_ids = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in rows])
    packed = model(ids, position_ids=position_ids, return_all_steps=True)
    for b, row in enumerate(rows):
        start = 0
        for n in row:
            alone = model(ids[b : b + 1, start : start + n], return_all_steps=True)
            close(packed.step_logits[:, b, start : start + n], alone.step_logits[:, 0])
            close(packed.gate_logits[b, start : start + n], alone.gate_logits[0])
            start += n
    step_logits, _ = reference_forward(model, ids, position_ids=position_ids)
    close(packed.step_logits, step_logits)
    # Without the document boundaries the later documents do change.
    unpacked = model(ids, return_all_steps=True)
    assert (unpacked.step_logits[:, :, 5:] - packed.step_logits[:, :, 5:]).abs().max() > 1e-3


# ---- activation checkpointing -------------------------------------------------------------


def loss_and_grads(model, ids, labels):
    """(loss, gradients, how many tensors autograd saved outside checkpointed regions)."""
    model.zero_grad(set_to_none=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(1) or t, lambda t: t):
        out = model(ids, labels=labels, objective=Objective(beta=0.1, chunk_tokens=5))
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return out.loss.detach(), grads, len(saved)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_activation_checkpointing_gives_identical_loss_and_gradients(attn):
    model = tiny_model(kv_heads=2, attn=attn).train()
    ids = token_ids(2, 10, seed=5)
    labels = token_ids(2, 10, seed=6)
    labels[0, :3] = -100
    loss_off, grads_off, saved_off = loss_and_grads(model, ids, labels)
    model.set_gradient_checkpointing(True)
    loss_on, grads_on, saved_on = loss_and_grads(model, ids, labels)
    model.set_gradient_checkpointing(False)
    assert saved_on < saved_off / 2  # the layers' activations really were not kept
    assert torch.equal(loss_on, loss_off)
    assert grads_on.keys() == grads_off.keys()
    for name, grad in grads_off.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grads_on[name], grad, atol=1e-14, rtol=0, msg=name)


def test_a_rope_base_passed_in_takes_effect_and_matches_the_reference():
    """A curriculum stage passes its RoPE base to every forward (long-context stages raise it
    10K -> 40K -> 1M); the config, as built, is left alone."""
    model, ids = tiny_model(), token_ids(2, 16)
    before = model(ids, return_all_steps=True).step_logits
    after = model(ids, return_all_steps=True, rope_theta=40000.0).step_logits
    assert model.config.rope_theta == 1000.0
    assert (before - after).abs().max() > 1e-3
    close(after, reference_forward(model, ids, rope_theta=40000.0)[0])
    close(before, reference_forward(model, ids)[0])
    with pytest.raises(ValueError, match="rope_theta must be > 0, got 0"):
        model(ids, rope_theta=0.0)


# ---- half-precision attention on a CPU ----------------------------------------------------


@pytest.mark.parametrize("packed", [True, False])
def test_bf16_sdpa_on_a_cpu_runs_in_float32_up_to_the_threshold(packed, monkeypatch):
    rows, keys = 2, 24
    positions = torch.arange(keys).repeat(rows, 1)
    if packed:
        positions = (positions % 7).contiguous()  # documents of 7 tokens
    layout = AttentionLayout.build(positions, 0, packed, "sdpa")
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(rows, 4, keys, 8, generator=gen, dtype=torch.float64) for _ in "qkv")
    exact = attend(q, k, v, layout, "eager")  # float64
    half = [x.to(torch.bfloat16).requires_grad_() for x in (q, k, v)]

    def float32_path():
        return attend(*(x.float() for x in half), layout, "sdpa").to(torch.bfloat16)

    out = attend(*half, layout, "sdpa")
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, float32_path())
    out.float().square().sum().backward()
    assert all(x.grad.dtype == torch.bfloat16 and x.grad.isfinite().all() for x in half)
    # The float32 path is within bf16's rounding of the output of the exact attention; its
    # inputs were rounded to bf16, hence the float64 reference on the same rounded inputs.
    exact_rounded = attend(*(x.detach().double() for x in half), layout, "eager")
    close(out.double(), exact_rounded, atol=2**-7, rtol=0)
    assert (out.double() - exact).abs().max() < 0.05
    # Above the threshold the inputs' precision is kept: PyTorch's bf16 SDPA, unchanged.
    monkeypatch.setattr(attention, "CPU_FLOAT32_SDPA_MAX_KEYS", keys - 1)
    kept = attend(*half, layout, "sdpa")
    mask = {"attn_mask": layout.mask} if packed else {"is_causal": True}
    assert torch.equal(kept, F.scaled_dot_product_attention(*half, **mask).transpose(1, 2))
    assert not torch.equal(kept, out)
