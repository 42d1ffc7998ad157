"""torch.compile of the decoder layers (``compile_layers``): the float64 reference's outputs,
eager's training losses, and no new graph when T, the sequence length or the micro-batch
change (the curriculum changes all three between stages)."""

import pytest
import torch
from torch._dynamo.utils import counters

from looplm import LoopLMConfig, LoopLMForCausalLM, Objective
from tests.unit.test_model_numerics import close, reference_forward, tiny_model, token_ids

VOCAB = 256


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def fp32_model(seed: int = 0) -> LoopLMForCausalLM:
    torch.manual_seed(seed)
    cfg = LoopLMConfig.from_preset("tiny", vocab_size=VOCAB, hidden_size=64, intermediate_size=128)
    return LoopLMForCausalLM(cfg)


def packed_positions(batch: int, seq: int) -> torch.Tensor:
    """Two documents per row: the second restarts its positions at 0."""
    first = seq // 3
    return torch.cat([torch.arange(first), torch.arange(seq - first)]).expand(batch, -1)


def train_losses(model: LoopLMForCausalLM, steps: int) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(7)
    losses = []
    for _ in range(steps):
        start = torch.randint(0, VOCAB, (2, 1), generator=gen)
        ids = (start + torch.arange(48)) % VOCAB  # counting: learnt within the 20 steps
        out = model(ids, packed_positions(2, 48), ids.roll(-1, 1), objective=Objective(beta=0.1))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    return losses


def test_compiled_layers_match_the_float64_reference():
    model = tiny_model()
    model.compile_layers()
    ids = token_ids(2, 24)
    positions = packed_positions(2, 24)
    torch._dynamo.reset()
    before = graphs()
    out = model(ids, positions, return_all_steps=True)
    assert graphs() > before, "nothing was compiled"
    step_logits, gate_logits = reference_forward(model, ids, positions)
    close(out.step_logits, step_logits)
    close(out.gate_logits, gate_logits)


def test_compiled_layers_train_as_eager_does_for_twenty_steps():
    eager, compiled = fp32_model(), fp32_model()
    compiled.compile_layers()
    compiled.set_gradient_checkpointing(True)
    torch._dynamo.reset()
    before = graphs()
    expected, actual = train_losses(eager, 20), train_losses(compiled, 20)
    assert graphs() > before, "nothing was compiled"
    assert expected[-1] < expected[0] - 0.1  # the run learns, so the comparison means something
    for step, (a, e) in enumerate(zip(actual, expected, strict=True), 1):
        assert abs(a - e) <= 1e-5 * abs(e), f"step {step}: compiled {a}, eager {e}"


def test_new_steps_lengths_and_micro_batches_compile_nothing_new():
    torch._dynamo.reset()  # forget the graphs of the tests before
    model = fp32_model()
    model.compile_layers()

    def step(batch: int, seq: int, num_steps: int, packed: bool) -> None:
        ids = torch.randint(0, VOCAB, (batch, seq))
        positions = packed_positions(batch, seq) if packed else None
        model(ids, positions, ids.roll(-1, 1), num_steps=num_steps).loss.backward()

    before = graphs()
    step(2, 64, 4, packed=False)
    step(2, 64, 4, packed=True)
    warm = graphs()
    assert warm == before + 2  # causal and packed attention: one graph each, shared by the layers
    for batch, seq, num_steps in [(3, 48, 2), (4, 96, 1), (2, 128, 3), (2, 80, 8)]:
        for packed in (False, True):
            step(batch, seq, num_steps, packed)
    assert graphs() == warm


def test_evaluation_and_decoding_run_eagerly_and_the_format_is_unchanged():
    eager, compiled = fp32_model(), fp32_model()
    compiled.compile_layers()
    assert list(compiled.state_dict()) == list(eager.state_dict())
    prompt = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    before = graphs()
    with torch.no_grad():
        expected = eager.generate(prompt[:1], 5)
        actual = compiled.generate(prompt[:1], 5)
        scored = compiled(prompt, packed_positions(2, 6), prompt.roll(-1, 1)).loss
        reference = eager(prompt, packed_positions(2, 6), prompt.roll(-1, 1)).loss
    assert graphs() == before
    assert torch.equal(actual, expected)
    assert torch.equal(scored, reference)


def test_compiling_refuses_the_fused_kernels():
    model = fp32_model()
    model.model.layers[0].mlp.kernels = "liger"  # what set_kernels("liger") does on a GPU
    with pytest.raises(ValueError, match="compile_layers fuses RMSNorm, SwiGLU and RoPE itself"):
        model.compile_layers()
    assert model.model.compiled_layers is None
