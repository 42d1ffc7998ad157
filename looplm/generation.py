"""Incremental decoding with a KV cache per (recurrent step, layer), and KV sharing.

Shape legend: B batch, G key/value heads, K cached tokens, D head dim, T steps, L layers.

Sharing modes (OURO.md §2, decode-time KV sharing):
- ``full``: one cache per (step, layer), slot ``step * L + layer``, as the release keeps it.
- ``last`` / ``average``: the prompt is prefilled with every step's own cache (sharing during
  prefill costs >10 points); afterwards each layer keeps one cache, holding the last step's
  K/V (or the mean over steps) of every token. At a decode step t, the new token attends to
  that shared cache plus its own step-t K/V. Decode KV memory is 1/T of ``full``.
"""

from __future__ import annotations

import torch

KV_SHARING_MODES = ("full", "last", "average")


class LoopKVCache:
    """Keys and values of all processed tokens, per (step, layer) or shared per layer."""

    def __init__(self, num_steps: int, num_layers: int, mode: str = "full"):
        if mode not in KV_SHARING_MODES:
            raise ValueError(f"unknown KV sharing mode {mode!r}; choose one of {KV_SHARING_MODES}")
        self.num_steps, self.num_layers, self.mode = num_steps, num_layers, mode
        self.per_step: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.shared: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.pending: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.seen_tokens = 0

    @property
    def sharing(self) -> bool:
        """True once the prompt is in and a shared mode has collapsed the per-step caches."""
        return self.mode != "full" and self.seen_tokens > 0

    def slot(self, step: int, layer: int):
        """The function an attention call uses to append its new K/V and get all K/V to attend."""
        if step >= self.num_steps:
            raise ValueError(f"this cache was made for {self.num_steps} steps, got step {step + 1}")

        def update(k_BGSD: torch.Tensor, v_BGSD: torch.Tensor):
            if self.sharing:
                self.pending[(step, layer)] = (k_BGSD, v_BGSD)
                past_k, past_v = self.shared[layer]
            else:
                past_k, past_v = self.per_step.get(
                    (step, layer), (k_BGSD[:, :, :0], v_BGSD[:, :, :0])
                )
                self.per_step[(step, layer)] = (
                    torch.cat((past_k, k_BGSD), dim=2),
                    torch.cat((past_v, v_BGSD), dim=2),
                )
                return self.per_step[(step, layer)]
            return torch.cat((past_k, k_BGSD), dim=2), torch.cat((past_v, v_BGSD), dim=2)

        return update

    def end_forward(self, new_tokens: int) -> None:
        """Called by the model after every step ran over the new tokens."""
        if self.mode != "full":
            if self.sharing:
                for layer in range(self.num_layers):
                    (old_k, old_v), (new_k, new_v) = (
                        self.shared[layer],
                        self._combine(self.pending, layer),
                    )
                    self.shared[layer] = (
                        torch.cat((old_k, new_k), 2),
                        torch.cat((old_v, new_v), 2),
                    )
            else:
                self.shared = {
                    layer: self._combine(self.per_step, layer) for layer in range(self.num_layers)
                }
                self.per_step = {}
            self.pending = {}
        self.seen_tokens += new_tokens

    def _combine(self, caches, layer: int):
        steps = [caches[(s, layer)] for s in range(self.num_steps) if (s, layer) in caches]
        if len(steps) != self.num_steps:
            raise ValueError(
                f"the cache was made for {self.num_steps} steps but the forward ran {len(steps)}"
            )
        if self.mode == "last":
            return steps[-1]
        keys = torch.stack([k for k, _ in steps]).mean(0)
        values = torch.stack([v for _, v in steps]).mean(0)
        return keys, values

    def num_bytes(self) -> int:
        """Memory held by cached keys and values."""
        tensors = [t for kv in (*self.per_step.values(), *self.shared.values()) for t in kv]
        return sum(t.numel() * t.element_size() for t in tensors)


def _sample(logits_BV: torch.Tensor, temperature: float, top_k: int, top_p: float, generator):
    logits = logits_BV.float() / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > top_p  # keep the token that crosses top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    kv_sharing: str = "full",
    num_steps: int | None = None,
    exit_at_step: int | None = None,
    exit_threshold: float | None = None,
    generator: torch.Generator | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decodes up to ``max_new_tokens`` after the prompts ``input_ids`` [B, S].

    Prompts of different lengths are left-padded, with ``attention_mask`` [B, S] 0 at padding.

    Greedy by default, else sampling (temperature, top-k, top-p). A sequence stops at any of the
    EOS ids (default: the config's); finished rows are padded with ``pad_token_id`` (default: the
    first EOS id). The token at each position comes from the step chosen by ``exit_at_step`` or
    Q-exit with ``exit_threshold`` (default: the config's threshold). Returns [B, S + new].
    """
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(
            f"input_ids must be a non-empty [batch, seq] tensor, got {tuple(input_ids.shape)}"
        )
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    cfg = model.config
    steps = num_steps or cfg.total_ut_steps
    eos = (
        cfg.eos_token_ids
        if eos_token_id is None
        else (eos_token_id if isinstance(eos_token_id, list) else [eos_token_id])
    )
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    cache = LoopKVCache(steps, cfg.num_hidden_layers, kv_sharing)
    eos_t = torch.tensor(eos, device=input_ids.device, dtype=torch.long)
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    tokens, step_input = input_ids, input_ids
    for _ in range(max_new_tokens):
        out = model(
            step_input,
            num_steps=steps,
            exit_at_step=exit_at_step,
            exit_threshold=exit_threshold,
            past_key_values=cache,
            attention_mask=attention_mask,
        )
        logits = out.logits[:, -1]
        nxt = (
            _sample(logits, temperature, top_k, top_p, generator)
            if do_sample
            else logits.argmax(-1)
        )
        nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
        tokens = torch.cat((tokens, nxt[:, None]), dim=1)
        finished |= torch.isin(nxt, eos_t)
        if finished.all():
            break
        step_input = nxt[:, None]
        if attention_mask is not None:
            attention_mask = torch.cat((attention_mask, torch.ones_like(step_input)), dim=1)
    return tokens
