"""Early exit in decoding: skipped steps, their K/V, and what must not change."""

import copy

import pytest
import torch

from looplm import LoopKVCache, LoopLMConfig, LoopLMForCausalLM

STEPS, LAYERS = 4, 2
MODES = ("full", "last", "average")
MIXED = dict(exit_threshold=0.5)  # with the sharpened gate, rows of a batch exit at different steps


def model() -> LoopLMForCausalLM:
    """A float64 tiny model whose gate is sharpened so that Q-exit picks varied steps."""
    torch.manual_seed(0)
    cfg = LoopLMConfig.from_preset(
        "tiny", vocab_size=61, hidden_size=32, intermediate_size=64, total_ut_steps=STEPS
    )
    m = LoopLMForCausalLM(cfg).double().eval()
    with torch.no_grad():
        m.model.early_exit_gate.weight.mul_(10.0)
    return m


def prompt(batch: int = 4, length: int = 5) -> torch.Tensor:
    return torch.randint(0, 61, (batch, length), generator=torch.Generator().manual_seed(1))


def prefilled(m, ids, mode: str) -> LoopKVCache:
    cache = LoopKVCache(STEPS, LAYERS, mode)
    m(ids, past_key_values=cache)
    return cache


def count_steps(m):
    """A list that grows by one entry each time the first layer runs, i.e. once per step."""
    calls = []
    m.model.layers[0].register_forward_hook(lambda *_: calls.append(1))
    return calls


@torch.no_grad()
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rule", [dict(exit_threshold=1.0), dict(exit_at_step=STEPS)])
def test_without_an_early_exit_decoding_is_bit_identical(mode, rule):
    m, ids = model(), prompt()
    expected = m.generate(ids, 6, eos_token_id=[], kv_sharing=mode, **rule)
    got = m.generate(ids, 6, eos_token_id=[], kv_sharing=mode, early_exit=True, **rule)
    assert torch.equal(got, expected)
    plain, early = prefilled(m, ids, mode), prefilled(m, ids, mode)
    for token in expected[:, ids.shape[1] :].T:
        a = m(token[:, None], past_key_values=plain, **rule)
        b = m(token[:, None], past_key_values=early, early_exit=True, **rule)
        assert (a.exit_steps == STEPS - 1).all()
        assert torch.equal(a.logits, b.logits) and torch.equal(a.exit_pdf, b.exit_pdf)
    for kept, other in ((plain.per_step, early.per_step), (plain.shared, early.shared)):
        assert kept.keys() == other.keys()
        assert all(all(map(torch.equal, kept[key], other[key])) for key in kept)


@torch.no_grad()
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rule", [dict(exit_at_step=1), dict(exit_at_step=2), MIXED])
def test_a_decode_step_that_exits_early_gives_the_all_steps_logits(mode, rule):
    m, ids = model(), prompt()
    cache = prefilled(m, ids[:, :4], mode)
    plain = m(ids[:, 4:], past_key_values=copy.deepcopy(cache), return_all_steps=True, **rule)
    early = m(ids[:, 4:], past_key_values=cache, return_all_steps=True, early_exit=True, **rule)
    ran = int(plain.exit_steps.max()) + 1
    assert ran < STEPS  # the loop did stop early
    assert torch.equal(early.exit_steps, plain.exit_steps)
    assert torch.equal(early.logits, plain.logits)
    assert torch.equal(early.step_logits, plain.step_logits[:ran])
    assert early.exit_pdf is None and early.gate_logits.shape[-1] == ran


@torch.no_grad()
@pytest.mark.parametrize("mode", MODES)
def test_generate_gives_the_all_steps_tokens_up_to_the_first_early_exit(mode):
    """The prompt runs every step; the first decode forward exits early under MIXED."""
    m, ids = model(), prompt()
    kwargs = dict(eos_token_id=[], kv_sharing=mode, **MIXED)
    early = m.generate(ids, 6, early_exit=True, **kwargs)
    plain = m.generate(ids, 6, **kwargs)
    assert torch.equal(early[:, : ids.shape[1] + 2], plain[:, : ids.shape[1] + 2])


@torch.no_grad()
@pytest.mark.parametrize("mode", MODES)
def test_an_early_exit_over_several_tokens_waits_for_all_of_them(mode):
    m, ids = model(), prompt()
    cache = LoopKVCache(STEPS, LAYERS, mode)
    early = m(ids, past_key_values=cache, early_exit=True, **MIXED)
    plain = m(ids, **MIXED)
    assert torch.equal(early.logits, plain.logits)
    assert early.gate_logits.shape[-1] == int(plain.exit_steps.max()) + 1
    lengths = [k.shape[2] for kv in (*cache.per_step.values(), *cache.shared.values()) for k in kv]
    assert lengths == [ids.shape[1]] * (2 * LAYERS * (STEPS if mode == "full" else 1))
    m(ids[:, :1], past_key_values=cache, early_exit=True, **MIXED)
    assert cache.seen_tokens == ids.shape[1] + 1


@torch.no_grad()
def test_the_mixed_rule_exits_at_different_steps_within_a_batch():
    """The premise of the mixed-batch tests below."""
    m, ids = model(), prompt()
    exits_B = m(ids, **MIXED).exit_steps[:, -1]
    assert len(exits_B.unique()) > 1 and int(exits_B.max()) < STEPS - 1


@torch.no_grad()
def test_the_loop_stops_once_every_row_has_exited():
    m, ids = model(), prompt()
    calls = count_steps(m)
    cache = prefilled(m, ids[:, :4], "full")
    assert len(calls) == STEPS  # the prompt runs every step
    for rule, expected in ((dict(exit_at_step=1), 1), (dict(exit_threshold=1.0), STEPS)):
        calls.clear()
        m(ids[:, 4:], past_key_values=copy.deepcopy(cache), early_exit=True, **rule)
        assert len(calls) == expected
    calls.clear()
    out = m(ids[:, 4:], past_key_values=cache, early_exit=True, **MIXED)
    assert len(calls) == int(out.exit_steps.max()) + 1  # the deepest row sets the depth
    calls.clear()
    m.generate(ids, 5, eos_token_id=[], exit_at_step=2, early_exit=True)
    assert len(calls) == STEPS + 4 * 2


@torch.no_grad()
def test_full_mode_copies_the_exit_steps_kv_into_every_later_step():
    m, ids = model(), prompt()
    cache = prefilled(m, ids[:, :4], "full")
    plain = copy.deepcopy(cache)
    exits = m(ids[:, 4:], past_key_values=plain, **MIXED).exit_steps[:, 0].tolist()
    m(ids[:, 4:], past_key_values=cache, early_exit=True, **MIXED)
    assert sorted(cache.per_step) == sorted(plain.per_step)
    for (step, layer), (k, v) in cache.per_step.items():
        assert k.shape == v.shape == plain.per_step[(step, layer)][0].shape  # 5 tokens each
        assert torch.equal(k[:, :, :4], plain.per_step[(step, layer)][0][:, :, :4])
        assert torch.equal(v[:, :, :4], plain.per_step[(step, layer)][1][:, :, :4])
        for row, exit_step in enumerate(exits):
            source = plain.per_step[(min(step, exit_step), layer)]
            assert torch.equal(k[row, :, 4], source[0][row, :, 4])
            assert torch.equal(v[row, :, 4], source[1][row, :, 4])


class RecordingCache(LoopKVCache):
    """Keeps the per-step K/V of the last decoded tokens, which the cache drops."""

    def end_forward(self, new_tokens, exit_steps_BS=None):
        self.last_pending = dict(self.pending)
        super().end_forward(new_tokens, exit_steps_BS)


@torch.no_grad()
@pytest.mark.parametrize("mode", ["last", "average"])
def test_shared_modes_cache_the_exit_steps_kv_or_the_mean_up_to_it(mode):
    m, ids = model(), prompt()
    cache = RecordingCache(STEPS, LAYERS, mode)
    m(ids[:, :4], past_key_values=cache)
    exits = m(ids[:, 4:], past_key_values=cache, early_exit=True, **MIXED).exit_steps[:, 0]
    ran = int(exits.max()) + 1
    assert sorted(cache.last_pending) == [(s, i) for s in range(ran) for i in range(LAYERS)]
    for layer in range(LAYERS):
        for row, exit_step in enumerate(exits.tolist()):
            computed = [cache.last_pending[(s, layer)] for s in range(exit_step + 1)]
            for index in (0, 1):
                got = cache.shared[layer][index][row, :, 4]
                if mode == "last":
                    assert torch.equal(got, computed[-1][index][row, :, 0])
                else:
                    total = sum(kv[index][row, :, 0] for kv in computed)
                    torch.testing.assert_close(got, total / len(computed), rtol=0, atol=1e-15)


@torch.no_grad()
@pytest.mark.parametrize("exit_at_step", [1, 2, 3])
def test_a_fixed_exit_step_in_full_mode_decodes_the_all_steps_stream(exit_at_step):
    """Steps up to the exit step attend only to slots up to it, which the fill never touches."""
    m, ids = model(), prompt()
    kwargs = dict(eos_token_id=[], exit_at_step=exit_at_step)
    assert torch.equal(m.generate(ids, 8, early_exit=True, **kwargs), m.generate(ids, 8, **kwargs))


def overwrite_after_exit(cache: LoopKVCache, exit_steps_B: torch.Tensor) -> None:
    """The full-mode rule, applied to the last token of a cache that ran every step."""
    for (step, layer), kv in cache.per_step.items():
        for row, exit_step in enumerate(exit_steps_B.tolist()):
            if step > exit_step:
                for t, source in zip(kv, cache.per_step[(exit_step, layer)], strict=True):
                    t[row, :, -1] = source[row, :, -1]


@torch.no_grad()
def test_full_mode_decodes_as_all_steps_with_the_kv_overwritten_afterwards():
    m, ids = model(), prompt()
    tokens = m.generate(ids, 10, eos_token_id=[], early_exit=True, **MIXED)
    reference, early, plain = (prefilled(m, ids, "full") for _ in range(3))
    fill_changed_logits = False
    for index in range(ids.shape[1], tokens.shape[1] - 1):
        token = tokens[:, index : index + 1]
        expected = m(token, past_key_values=reference, **MIXED)
        overwrite_after_exit(reference, expected.exit_steps[:, 0])
        got = m(token, past_key_values=early, early_exit=True, **MIXED)
        assert torch.equal(got.logits, expected.logits)
        assert torch.equal(got.logits[:, 0].argmax(-1), tokens[:, index + 1])
        without_fill = m(token, past_key_values=plain, **MIXED).logits
        fill_changed_logits |= not torch.equal(without_fill, expected.logits)
    assert fill_changed_logits  # the reference is not the all-steps decode in disguise


@torch.no_grad()
@pytest.mark.parametrize("mode", MODES)
def test_a_row_decodes_the_same_alone_and_in_a_batch_with_mixed_exits(mode):
    m, ids = model(), prompt()
    kwargs = dict(eos_token_id=[], kv_sharing=mode, early_exit=True, **MIXED)
    batched = m.generate(ids, 8, **kwargs)
    for row in range(ids.shape[0]):
        assert torch.equal(batched[row], m.generate(ids[row : row + 1], 8, **kwargs)[0])


@torch.no_grad()
@pytest.mark.parametrize("mode", MODES)
def test_left_padded_batches_with_early_exit_decode_like_each_prompt_alone(mode):
    m = model()
    prompts = [
        torch.randint(1, 61, (n,), generator=torch.Generator().manual_seed(n)) for n in (3, 6, 5)
    ]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :], mask[row, width - len(p) :] = p, 1
    kwargs = dict(eos_token_id=[], kv_sharing=mode, early_exit=True, **MIXED)
    batched = m.generate(ids, 6, attention_mask=mask, **kwargs)
    for row, p in enumerate(prompts):
        assert torch.equal(batched[row, width:], m.generate(p[None], 6, **kwargs)[0, len(p) :])


def test_early_exit_is_refused_with_labels():
    ids = prompt()
    with pytest.raises(ValueError, match="early_exit is for inference"):
        model()(ids, labels=ids, early_exit=True)
