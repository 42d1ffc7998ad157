"""Incremental decoding with a KV cache per (recurrent step, layer), and KV sharing.

Shape legend: B batch, S new tokens, G key/value heads, K cached tokens, D head dim, T steps,
L layers.

Sharing modes (OURO.md §2, decode-time KV sharing):
- ``full``: one cache per (step, layer), slot ``step * L + layer``, as the release keeps it.
- ``last`` / ``average``: the prompt is prefilled with every step's own cache (sharing during
  prefill costs >10 points); afterwards each layer keeps one cache, holding the last step's
  K/V (or the mean over steps) of every token. At a decode step t, the new token attends to
  that shared cache plus its own step-t K/V. Decode KV memory is 1/T of ``full``.

Early exit (``generate(..., early_exit=True)``): the prompt still runs every step; each decoded
token then stops at its exit step (``exit_at_step`` or Q-exit), and a forward stops the loop
once every row has exited, skipping the remaining steps. Rows of a batch that exited before
the others keep being computed with the batch (dense tensors, no re-gathering of the cache),
but nothing of those later steps is kept: their logits come from the exit step, and their
K/V are treated as those of skipped steps, so that a row decodes the same alone or in any batch.
Only a forward whose rows all exit early saves compute. The K/V of a token past its exit step:
- ``full``: every later step's slot gets a copy of the exit step's K/V, so that every
  (step, layer) cache keeps one entry per token and later tokens attend at every step.
- ``last``: the shared cache gets the exit step's K/V (the last step computed for the token).
- ``average``: the shared cache gets the mean over the steps computed for the token, from
  the first step to its exit step.
A token that exits at the last step is cached exactly as without early exit. Later tokens
attend to these filled entries, so after the first early exit the stream may differ from the
one decoded with all steps; the step that exits yields the same logits either way.
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

    def end_forward(self, new_tokens: int, exit_steps_BS: torch.Tensor | None = None) -> None:
        """Called by the model once the loop is over the new tokens. ``exit_steps_BS`` [B, S]:
        the 0-based exit step of each new token when the loop may have stopped early (the steps
        after it are filled as the module docstring says); None when every step ran."""
        exits = _ExitSteps(exit_steps_BS) if exit_steps_BS is not None else None
        if self.mode == "full":
            if exits is not None:
                self._fill_after_exit(new_tokens, exits)
        elif self.sharing:
            for layer in range(self.num_layers):
                (old_k, old_v), (new_k, new_v) = (
                    self.shared[layer],
                    self._combine(self.pending, layer, exits),
                )
                self.shared[layer] = (
                    torch.cat((old_k, new_k), 2),
                    torch.cat((old_v, new_v), 2),
                )
        else:
            self.shared = {
                layer: self._combine(self.per_step, layer, exits)
                for layer in range(self.num_layers)
            }
            self.per_step = {}
        self.pending = {}
        self.seen_tokens += new_tokens

    def _combine(self, caches, layer: int, exits: _ExitSteps | None):
        """The shared K/V of the new tokens: their exit step's (last) or the mean up to it."""
        steps = [caches[(s, layer)] for s in range(self.num_steps) if (s, layer) in caches]
        if exits is None:
            if len(steps) != self.num_steps:
                raise ValueError(
                    f"the cache was made for {self.num_steps} steps but the forward ran "
                    f"{len(steps)}"
                )
            exits = _ExitSteps.at_last(self.num_steps)
        if self.mode == "last":
            return exits.select(steps.__getitem__)

        def mean_up_to(step: int):
            keys = torch.stack([k for k, _ in steps[: step + 1]]).mean(0)
            values = torch.stack([v for _, v in steps[: step + 1]]).mean(0)
            return keys, values

        return exits.select(mean_up_to)

    def _fill_after_exit(self, new_tokens: int, exits: _ExitSteps) -> None:
        """Full mode: at every step after a new token's exit step, that token's K/V become a
        copy of its exit step's K/V, in slots of steps that ran and of steps that were skipped."""
        past = self.seen_tokens
        for layer in range(self.num_layers):
            computed = [
                self.per_step[(s, layer)]
                for s in range(self.num_steps)
                if (s, layer) in self.per_step and self.per_step[(s, layer)][0].shape[2] > past
            ]
            new_kv = [(k[:, :, past:], v[:, :, past:]) for k, v in computed]
            exit_k, exit_v = exits.select(new_kv.__getitem__)
            for step in range(self.num_steps):
                if step < len(computed):
                    if step <= exits.steps[0]:
                        continue
                    after_exit = (exits.steps_BS < step)[:, None, :, None]
                    new_k = torch.where(after_exit, exit_k, new_kv[step][0])
                    new_v = torch.where(after_exit, exit_v, new_kv[step][1])
                else:
                    new_k, new_v = exit_k, exit_v
                old_k, old_v = self.per_step.get(
                    (step, layer), (exit_k[:, :, :0], exit_v[:, :, :0])
                )
                self.per_step[(step, layer)] = (
                    torch.cat((old_k[:, :, :past], new_k), dim=2),
                    torch.cat((old_v[:, :, :past], new_v), dim=2),
                )

    def num_bytes(self) -> int:
        """Memory held by cached keys and values."""
        tensors = [t for kv in (*self.per_step.values(), *self.shared.values()) for t in kv]
        return sum(t.numel() * t.element_size() for t in tensors)


class _ExitSteps:
    """The 0-based exit step of every new token [B, S], and the distinct ones in order."""

    def __init__(self, steps_BS: torch.Tensor | None, steps: list[int] | None = None):
        self.steps_BS = steps_BS
        self.steps = steps if steps is not None else steps_BS.unique().tolist()

    @classmethod
    def at_last(cls, num_steps: int) -> _ExitSteps:
        """Every token read out at the last step."""
        return cls(None, [num_steps - 1])

    def select(self, kv_of_step):
        """K/V [B, G, S, D] holding, for every token, ``kv_of_step(e)`` at its exit step e."""
        keys, values = kv_of_step(self.steps[-1])
        for step in self.steps[:-1]:
            here = (self.steps_BS == step)[:, None, :, None]
            step_k, step_v = kv_of_step(step)
            keys, values = torch.where(here, step_k, keys), torch.where(here, step_v, values)
        return keys, values


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
    early_exit: bool = False,
    generator: torch.Generator | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decodes up to ``max_new_tokens`` after the prompts ``input_ids`` [B, S].

    Prompts of different lengths are left-padded, with ``attention_mask`` [B, S] 0 at padding.

    Greedy by default, else sampling (temperature, top-k, top-p). A sequence stops at any of the
    EOS ids (default: the config's); finished rows are padded with ``pad_token_id`` (default: the
    first EOS id). The token at each position comes from the step chosen by ``exit_at_step`` or
    Q-exit with ``exit_threshold`` (default: the config's threshold). With ``early_exit`` a
    decoded token skips the steps after its exit (see the module docstring); the prompt always
    runs every step. Returns [B, S + new].
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
            early_exit=early_exit and cache.seen_tokens > 0,
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
