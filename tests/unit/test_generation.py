import pytest
import torch

from looplm import LoopKVCache, LoopLMConfig, LoopLMForCausalLM


def model(**changes) -> LoopLMForCausalLM:
    torch.manual_seed(0)
    cfg = LoopLMConfig.from_preset(
        "tiny", vocab_size=61, hidden_size=32, intermediate_size=64, **changes
    )
    return LoopLMForCausalLM(cfg).double().eval()


def cached_step_logits(m, ids, cache, pieces):
    """Step logits of ids fed through the cache in pieces (prefill, then chunks)."""
    outs, start = [], 0
    for size in pieces:
        outs.append(
            m(
                ids[:, start : start + size], past_key_values=cache, return_all_steps=True
            ).step_logits
        )
        start += size
    return torch.cat(outs, dim=2)


@pytest.mark.parametrize("pieces", [(5, 1, 1, 1, 1), (3, 3, 3), (9,)])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_cached_full_mode_equals_the_uncached_forward(pieces, kv_heads):
    m = model(num_key_value_heads=kv_heads)
    ids = torch.randint(0, 61, (2, 9))
    expected = m(ids, return_all_steps=True).step_logits
    cache = LoopKVCache(4, 2, "full")
    got = cached_step_logits(m, ids, cache, pieces)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    assert cache.seen_tokens == 9 and len(cache.per_step) == 4 * 2


def test_greedy_generation_equals_argmax_of_the_uncached_forward():
    m = model()
    prompt = torch.randint(0, 61, (2, 4))
    out = m.generate(prompt, 6, eos_token_id=[])
    tokens = prompt
    for _ in range(6):
        tokens = torch.cat((tokens, m(tokens).logits[:, -1:].argmax(-1)), dim=1)
    assert torch.equal(out, tokens)


@pytest.mark.parametrize("mode", ["last", "average"])
def test_shared_modes_keep_the_prefill_and_cut_decode_memory_by_t(mode):
    m = model()
    ids = torch.randint(0, 61, (2, 8))
    full, shared = LoopKVCache(4, 2, "full"), LoopKVCache(4, 2, mode)
    prefill_full = m(ids[:, :5], past_key_values=full, return_all_steps=True).step_logits
    prefill_shared = m(ids[:, :5], past_key_values=shared, return_all_steps=True).step_logits
    assert torch.equal(prefill_full, prefill_shared)
    decoded = [
        m(ids[:, i : i + 1], past_key_values=shared, return_all_steps=True) for i in range(5, 8)
    ]
    for i in range(5, 8):
        m(ids[:, i : i + 1], past_key_values=full)
    assert full.num_bytes() == 4 * shared.num_bytes()
    exact = m(ids, return_all_steps=True).step_logits[:, :, 5:]
    got = torch.cat([d.step_logits for d in decoded], dim=2)
    assert not torch.allclose(got, exact)  # sharing is an approximation at T > 1 ...
    assert (got.softmax(-1) - exact.softmax(-1)).abs().max() < 0.5  # ... of the same model


def test_shared_modes_are_exact_with_a_single_step():
    m = model(total_ut_steps=1)
    prompt = torch.randint(0, 61, (2, 4))
    full = m.generate(prompt, 5, eos_token_id=[])
    for mode in ("last", "average"):
        assert torch.equal(m.generate(prompt, 5, eos_token_id=[], kv_sharing=mode), full)


def test_last_mode_decodes_against_the_last_steps_keys():
    """After the prefill, `last` keeps exactly the last step's keys and values of every layer,
    and `average` their mean over the steps."""
    m = model(total_ut_steps=3)
    ids = torch.randint(0, 61, (1, 6))
    shared = LoopKVCache(3, 2, "last")
    m(ids[:, :5], past_key_values=shared)
    full = LoopKVCache(3, 2, "full")
    m(ids[:, :5], past_key_values=full)
    for layer in range(2):
        assert torch.equal(shared.shared[layer][0], full.per_step[(2, layer)][0])
        assert torch.equal(shared.shared[layer][1], full.per_step[(2, layer)][1])
    average = LoopKVCache(3, 2, "average")
    m(ids[:, :5], past_key_values=average)
    mean_k = torch.stack([full.per_step[(s, 0)][0] for s in range(3)]).mean(0)
    torch.testing.assert_close(average.shared[0][0], mean_k, rtol=0, atol=1e-14)


def test_generation_stops_at_eos_and_pads_finished_rows():
    m = model()
    prompt = torch.randint(0, 61, (2, 4))
    free = m.generate(prompt, 6, eos_token_id=[])
    eos = int(free[0, 5])  # the second token row 0 generates
    out = m.generate(prompt, 6, eos_token_id=eos, pad_token_id=60)
    row0 = out[0, 4:].tolist()
    assert row0[: row0.index(eos) + 1] == free[0, 4 : 4 + row0.index(eos) + 1].tolist()
    assert all(t == 60 for t in row0[row0.index(eos) + 1 :])
    if eos not in free[1, 4:].tolist():
        assert torch.equal(out[1], free[1, : out.shape[1]])


def test_generation_ends_early_when_every_row_is_done():
    m = model()
    prompt = torch.randint(0, 61, (1, 4))
    first = int(m.generate(prompt, 1, eos_token_id=[])[0, -1])
    assert m.generate(prompt, 10, eos_token_id=first).shape == (1, 5)


def test_sampling_is_reproducible_and_top_k_1_is_greedy():
    m = model()
    prompt = torch.randint(0, 61, (2, 3))
    kwargs = dict(do_sample=True, temperature=0.8, top_p=0.9, eos_token_id=[])
    a = m.generate(prompt, 8, generator=torch.Generator().manual_seed(1), **kwargs)
    b = m.generate(prompt, 8, generator=torch.Generator().manual_seed(1), **kwargs)
    assert torch.equal(a, b)
    greedy = m.generate(prompt, 8, eos_token_id=[])
    top1 = m.generate(
        prompt, 8, do_sample=True, top_k=1, eos_token_id=[], generator=torch.Generator()
    )
    assert torch.equal(top1, greedy)


def test_q_exit_decoding_uses_the_chosen_step():
    m = model()
    prompt = torch.randint(0, 61, (2, 4))
    at_first = m.generate(prompt, 5, eos_token_id=[], exit_at_step=1)
    assert torch.equal(m.generate(prompt, 5, eos_token_id=[], exit_threshold=0.0), at_first)
    at_last = m.generate(prompt, 5, eos_token_id=[], exit_at_step=4)
    assert torch.equal(m.generate(prompt, 5, eos_token_id=[], exit_threshold=1.0), at_last)


def test_bad_generation_arguments():
    m = model()
    with pytest.raises(ValueError, match="KV sharing mode"):
        m.generate(torch.zeros(1, 2, dtype=torch.long), 2, kv_sharing="first-only")
    with pytest.raises(ValueError, match="temperature"):
        m.generate(torch.zeros(1, 2, dtype=torch.long), 2, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="non-empty"):
        m.generate(torch.zeros(1, 0, dtype=torch.long), 2)


@pytest.mark.parametrize("mode", ["full", "last"])
def test_left_padded_batches_decode_like_each_prompt_alone(mode):
    m = model()
    prompts = [torch.randint(1, 61, (n,)) for n in (3, 6, 5)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :], mask[row, width - len(p) :] = p, 1
    batched = m.generate(ids, 5, eos_token_id=[], kv_sharing=mode, attention_mask=mask)
    for row, p in enumerate(prompts):
        alone = m.generate(p[None], 5, eos_token_id=[], kv_sharing=mode)
        assert torch.equal(batched[row, width:], alone[0, len(p) :])


def test_padding_does_not_change_the_logits_of_real_tokens():
    m = model()
    ids = torch.randint(1, 61, (1, 6))
    padded = torch.cat((torch.zeros(1, 3, dtype=torch.long), ids), dim=1)
    mask = torch.cat((torch.zeros(1, 3), torch.ones(1, 6)), dim=1)
    out = m(padded, attention_mask=mask, return_all_steps=True)
    torch.testing.assert_close(out.step_logits[:, :, 3:], m(ids, return_all_steps=True).step_logits)
    assert torch.isfinite(out.step_logits).all()


def test_an_attention_mask_of_the_wrong_length_is_refused():
    with pytest.raises(ValueError, match="must cover the cached and the new tokens"):
        model()(torch.zeros(2, 4, dtype=torch.long), attention_mask=torch.ones(2, 3))
