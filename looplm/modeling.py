"""The Ouro LoopLM: one decoder stack applied T times, read out after every step.

Shape legend: T recurrent steps, t steps run so far (or before an early exit), B batch,
S sequence, H hidden, V vocab, N heads, G key/value heads, D head dim, L layers.

    h = embed(ids)
    for step in 1..T:                       # the same layers every step
        for layer in layers: h = layer(h)   # sandwich norms, attention, SwiGLU
        h = norm(h)                         # the normed h is read out and feeds the next step
        logits_t = lm_head(h); lambda_t = sigmoid(early_exit_gate(h))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.fx.experimental._config as fx_config
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from looplm import kernels
from looplm.attention import (
    AttentionLayout,
    SequenceParallel,
    apply_rope,
    attend,
    document_ids,
    resolve_attn_implementation,
    rope_cos_sin,
)
from looplm.config import LoopLMConfig
from looplm.kernels import check_kernels
from looplm.losses import (
    IGNORE_INDEX,
    LossOutput,
    Objective,
    exit_log_pdf,
    last_step_loss,
    q_exit_steps,
    stage1_loss,
    stage2_loss,
    weighted_lm_cross_entropy,
)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 (or float64); returns ``weight * x_normed`` in the input dtype."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.kernels = "torch"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels == "liger":
            return kernels.rms_norm(x, self.weight, self.eps)
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: LoopLMConfig, implementation: str):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.implementation = implementation
        h, q, kv = (
            config.hidden_size,
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
        )
        self.q_proj = nn.Linear(h, q, bias=False)
        self.k_proj = nn.Linear(h, kv, bias=False)
        self.v_proj = nn.Linear(h, kv, bias=False)
        self.o_proj = nn.Linear(q, h, bias=False)
        self.kernels = "torch"

    def forward(self, x_BSH, cos, sin, layout: AttentionLayout, cache_slot=None):
        b, s, _ = x_BSH.shape
        q = self.q_proj(x_BSH).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x_BSH).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x_BSH).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.kernels == "liger":
            q, k = kernels.rope(q, k, cos, sin)
        else:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache_slot is not None:
            k, v = cache_slot(k, v)
        sp = layout.sequence_parallel
        if sp is not None:
            q, k, v = sp.heads_to_sequence(q), sp.heads_to_sequence(k), sp.heads_to_sequence(v)
        out_BSND = attend(q, k, v, layout, self.implementation)
        if sp is not None:
            out_BSND = sp.sequence_to_heads(out_BSND)
        return self.o_proj(out_BSND.reshape(b, s, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LoopLMConfig):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)
        self.kernels = "torch"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels == "liger":
            return self.down_proj(kernels.silu_mul(self.gate_proj(x), self.up_proj(x)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """A transformer block with Ouro's sandwich norms (four RMSNorms)."""

    def __init__(self, config: LoopLMConfig, implementation: str):
        super().__init__()
        eps = config.rms_norm_eps
        self.self_attn = Attention(config, implementation)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        self.input_layernorm_2 = RMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm_2 = RMSNorm(config.hidden_size, eps)

    def forward(self, h, cos, sin, layout, cache_slot=None):
        h = h + self.input_layernorm_2(
            self.self_attn(self.input_layernorm(h), cos, sin, layout, cache_slot)
        )
        return h + self.post_attention_layernorm_2(self.mlp(self.post_attention_layernorm(h)))


class _CompiledLayer:
    """A decoder layer under torch.compile with dynamic shapes. Duck shaping is off while it
    compiles: it would give the sequence length the symbol of an equal static size (a sequence
    of 64 tokens in a model 64 wide), so that another length would recompile."""

    def __init__(self, layer: DecoderLayer):
        self.compiled = torch.compile(layer, dynamic=True)

    def __call__(self, *args):
        with fx_config.patch(use_duck_shape=False):
            return self.compiled(*args)


class LMHead(nn.Linear):
    """The output projection. Called with ``targets``, it returns the fused, chunked
    cross-entropy instead of logits (see ``losses.weighted_lm_cross_entropy``); being a
    module call, sharded-parameter hooks gather its weight either way."""

    def forward(self, hidden, targets=None, token_weights=None, chunk_tokens=None, rows=None):
        if targets is None:
            return super().forward(hidden)
        return weighted_lm_cross_entropy(
            hidden, self.weight, targets, token_weights, chunk_tokens, rows
        )


@dataclass
class LoopLMBodyOutput:
    step_hidden: list[torch.Tensor]  # t x [B, S, H] normed hidden state after each step run
    gate_logits: torch.Tensor  # [B, S, t] exit-gate logits z_t (lambda_t = sigmoid(z_t))


class LoopLMModel(nn.Module):
    """Embedding, the shared layer stack, the final norm and the exit gate."""

    def __init__(self, config: LoopLMConfig, implementation: str):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, implementation) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.early_exit_gate = nn.Linear(config.hidden_size, 1, bias=True)
        self.implementation = implementation
        self.gradient_checkpointing = False
        self.compiled_layers: list[Callable] | None = None
        """The layers compiled by ``LoopLMForCausalLM.compile_layers``, which serve the
        forward passes run with gradients enabled; evaluation and decoding run eager."""

    def forward(
        self,
        input_ids_BS,
        position_ids_BS,
        num_steps: int,
        cache=None,
        key_mask_BK=None,
        exit_rule: Callable[[torch.Tensor], torch.Tensor] | None = None,
        *,
        rope_theta: float | None = None,
        sequence_parallel: SequenceParallel | None = None,
    ) -> LoopLMBodyOutput:
        """Runs up to ``num_steps`` steps. ``exit_rule`` maps the gate logits [B, S, t] of the
        steps run so far to each token's 0-based exit step (t for a token that has not exited);
        given, the loop stops once every token has exited and the cache learns the exit steps.
        ``rope_theta`` overrides the config's RoPE base (a training stage's); with
        ``sequence_parallel`` every sequence is split over its ranks (Ulysses)."""
        past = cache.seen_tokens if cache is not None else 0
        sp = sequence_parallel
        if sp is not None and (cache is not None or key_mask_BK is not None):
            raise ValueError("sequence parallelism is for training: no KV cache, no padding mask")
        whole_BS = position_ids_BS if sp is None else sp.gather_positions(position_ids_BS)
        packed = key_mask_BK is None and bool((document_ids(whole_BS)[:, -1] > 0).any())
        if packed and cache is not None:
            raise ValueError("packed sequences (restarting position_ids) cannot use a KV cache")
        layout = AttentionLayout.build(whole_BS, past, packed, self.implementation, key_mask_BK)
        layout.sequence_parallel = sp
        h = self.embed_tokens(input_ids_BS)
        cos, sin = rope_cos_sin(
            position_ids_BS,
            self.config.head_dim,
            self.config.rope_theta if rope_theta is None else rope_theta,
            h.dtype,
        )
        step_hidden, gate_logits, exit_steps_BS = [], [], None
        last = len(self.layers) - 1
        for step in range(num_steps):
            for index in range(len(self.layers)):
                slot = cache.slot(step, index) if cache is not None else None
                h = self._run_layer(index, h, cos, sin, layout, slot, final_norm=index == last)
            step_hidden.append(h)
            gate_logits.append(self.early_exit_gate(h).squeeze(-1))
            if exit_rule is not None:
                exit_steps_BS = exit_rule(torch.stack(gate_logits, dim=-1))
                if bool((exit_steps_BS <= step).all()):
                    break
        if cache is not None:
            cache.end_forward(input_ids_BS.shape[1], exit_steps_BS)
        return LoopLMBodyOutput(step_hidden, torch.stack(gate_logits, dim=-1))

    def _run_layer(self, index: int, h, cos, sin, layout, slot, final_norm: bool):
        """One layer; the last one of a step also applies the final norm, inside the same
        checkpoint, so that per (step, layer) only the layer input is saved."""
        # Dynamo guards on grad mode: a no_grad call would compile graphs of its own.
        compiled = self.compiled_layers is not None and slot is None and torch.is_grad_enabled()
        layer = self.compiled_layers[index] if compiled else self.layers[index]

        def run(h, cos, sin, layout, slot):
            out = layer(h, cos, sin, layout, slot)
            return self.norm(out) if final_norm else out

        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(run, h, cos, sin, layout, slot, use_reentrant=False)
        return run(h, cos, sin, layout, slot)


@dataclass
class LoopLMOutput:
    """What a forward returns; fields not asked for are None."""

    logits: torch.Tensor | None = None  # [B, S, V] at the chosen exit step of each token
    step_logits: torch.Tensor | None = None  # [t, B, S, V] (return_all_steps=True)
    exit_pdf: torch.Tensor | None = None  # [B, S, T], sums to 1 over T; None after an early exit
    gate_logits: torch.Tensor | None = None  # [B, S, t]
    exit_steps: torch.Tensor | None = None  # [B, S] 0-based step each token's logits come from
    loss: torch.Tensor | None = None
    loss_per_step: torch.Tensor | None = None  # [T]
    exit_pdf_mean: torch.Tensor | None = None  # [T]
    exit_entropy: torch.Tensor | None = None
    num_tokens: int | None = None
    past_key_values: object | None = None


class LoopLMForCausalLM(nn.Module):
    """A looped causal LM in Ouro's layout (``model.*`` body, untied ``lm_head``).

    Load released or saved weights with ``from_pretrained(path)``; write them with
    ``save_pretrained(path)``.
    """

    def __init__(self, config: LoopLMConfig, attn_implementation: str = "sdpa"):
        super().__init__()
        self.config = config
        self.attn_implementation = resolve_attn_implementation(attn_implementation)
        self.model = LoopLMModel(config, self.attn_implementation)
        self.lm_head = LMHead(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """Normal(0, std) linear and embedding weights, unit norms, zero gate bias."""
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each (step, layer) in the backward pass instead of storing its activations."""
        self.model.gradient_checkpointing = enabled

    def set_kernels(self, name: str = "torch") -> None:
        """RMSNorm, SwiGLU and RoPE in plain torch ("torch") or as fused GPU kernels ("liger",
        see looplm.kernels); the same math and the same parameters either way."""
        check_kernels(name)
        for module in self.modules():
            if isinstance(module, RMSNorm | MLP | Attention):
                module.kernels = name

    def compile_layers(self) -> None:
        """Compiles each decoder layer with torch.compile, never the loop over steps: every step
        calls the same compiled layers, so a change of T does not recompile, and their shapes
        are dynamic, so neither does a new sequence length or batch size. Each kind of call
        compiles once: causal or packed attention, and a batch or length of 1 (which dynamic
        shapes specialize). The compiled layers serve the forward passes run with gradients
        enabled; evaluation and decoding with a cache run eagerly. Parameter names and
        the checkpoint format are unchanged. Inductor fuses the norms, SwiGLU and RoPE itself,
        so the fused kernels of ``set_kernels`` are refused here."""
        if any(getattr(m, "kernels", "torch") != "torch" for m in self.modules()):
            raise ValueError(
                "compile_layers fuses RMSNorm, SwiGLU and RoPE itself; the liger kernels are for "
                "eager layers (model.kernels=torch with model.compile=true)"
            )
        self.model.compiled_layers = [_CompiledLayer(layer) for layer in self.model.layers]

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        num_steps: int | None = None,
        return_all_steps: bool = False,
        exit_at_step: int | None = None,
        exit_threshold: float | None = None,
        early_exit: bool = False,
        objective: Objective | None = None,
        past_key_values=None,
        attention_mask: torch.Tensor | None = None,
        rope_theta: float | None = None,
        sequence_parallel: SequenceParallel | None = None,
    ) -> LoopLMOutput:
        """Runs the loop.

        Args:
            input_ids: [B, S] token ids.
            position_ids: [B, S]; positions that restart mark packed documents, which never
                attend to each other. Default: 0..S-1 (after any cached tokens).
            labels: [B, S] targets already shifted (labels[:, i] follows position i),
                -100 to ignore. With labels the objective's loss is computed and no logits are
                materialized.
            num_steps: recurrent steps for this call (default: config.total_ut_steps).
            return_all_steps: also return ``step_logits`` [T, B, S, V].
            exit_at_step: 1-based step whose logits form ``logits``.
            exit_threshold: Q-exit threshold q for ``logits`` (default: the config's).
            early_exit: stop the loop once every token has exited by the rule above, skipping
                the remaining steps (inference only). ``step_logits`` then holds the steps
                that ran, and a cache fills the skipped steps' K/V (see looplm.generation).
            objective: the loss with labels (default: Stage I with beta 0.1).
            past_key_values: a ``LoopKVCache`` for incremental decoding.
            attention_mask: [B, cached + S], 0 at padding (e.g. left-padded prompts); positions
                then count only real tokens.
            rope_theta: the RoPE base for this call (default: config.rope_theta); a training
                stage passes its own, the config stays as built.
            sequence_parallel: the Ulysses group that splits every sequence over its ranks
                (training only: no cache, no padding mask).
        """
        steps = self.config.total_ut_steps if num_steps is None else num_steps
        if early_exit and labels is not None:
            raise ValueError("early_exit is for inference; a loss needs every step")
        if rope_theta is not None and not rope_theta > 0:
            raise ValueError(f"rope_theta must be > 0, got {rope_theta}")
        past = past_key_values.seen_tokens if past_key_values is not None else 0
        key_mask = self._check_attention_mask(attention_mask, input_ids, past)
        if position_ids is None and key_mask is not None:
            position_ids = (key_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        position_ids = self._check_inputs(
            input_ids, position_ids, labels, steps, exit_at_step, past
        )
        gate_only = labels is not None and objective is not None and objective.kind == "stage2"
        exit_rule = (
            partial(
                self._exit_steps,
                exit_at_step=exit_at_step,
                exit_threshold=exit_threshold,
                num_steps=steps,
            )
            if early_exit
            else None
        )
        body = self._body(
            input_ids,
            position_ids,
            steps,
            past_key_values,
            gate_only,
            key_mask,
            exit_rule,
            rope_theta=rope_theta,
            sequence_parallel=sequence_parallel,
        )
        ran_every_step = body.gate_logits.shape[-1] == steps
        out = LoopLMOutput(
            exit_pdf=exit_log_pdf(body.gate_logits).exp() if ran_every_step else None,
            gate_logits=body.gate_logits,
            past_key_values=past_key_values,
        )
        if labels is not None:
            losses = self.loss(body, labels, objective or Objective())
            out.loss, out.loss_per_step = losses.loss, losses.loss_per_step
            out.exit_pdf_mean, out.exit_entropy = losses.exit_pdf_mean, losses.exit_entropy
            out.num_tokens = losses.num_tokens
            return out
        step_hidden_TBSH = torch.stack(body.step_hidden)
        if return_all_steps:
            out.step_logits = self.lm_head(step_hidden_TBSH)
        out.exit_steps = self._exit_steps(body.gate_logits, exit_at_step, exit_threshold, steps)
        out.logits = self._logits_at(step_hidden_TBSH, out.exit_steps, out.step_logits)
        return out

    def _body(
        self,
        input_ids,
        position_ids,
        steps,
        cache,
        gate_only: bool,
        key_mask=None,
        exit_rule=None,
        **settings,
    ):
        """The loop. ``gate_only`` (Stage II) re-reads the gate from the detached hidden states,
        so that no gradient reaches the LM; freezing its parameters (``requires_grad``, as the
        gate-tuning job does before building its engine) also keeps a graph from being built."""
        body = self.model(input_ids, position_ids, steps, cache, key_mask, exit_rule, **settings)
        if not gate_only:
            return body
        gate = self.model.early_exit_gate
        gate_logits_BST = torch.stack(
            [gate(h.detach()).squeeze(-1) for h in body.step_hidden], dim=-1
        )
        return LoopLMBodyOutput(body.step_hidden, gate_logits_BST)

    def loss(
        self, body: LoopLMBodyOutput, labels: torch.Tensor, objective: Objective
    ) -> LossOutput:
        fn = {"stage1": stage1_loss, "stage2": stage2_loss, "last_step": last_step_loss}
        return fn[objective.kind](
            body.step_hidden, body.gate_logits, labels, self.lm_head, objective
        )

    def _exit_steps(self, gate_logits_BSt, exit_at_step, exit_threshold, num_steps: int):
        """0-based exit step [B, S] of every token: ``exit_at_step``, else Q-exit at
        ``exit_threshold``; with neither given, the config's ``early_exit_step`` (a 0-based step
        index of the released format, used when it is below ``num_steps``), else Q-exit at its
        ``early_exit_threshold``. Given the gate logits of only the first t < num_steps steps,
        a token not exited by then gets t."""
        ran = gate_logits_BSt.shape[-1]
        default = self.config.extra.get("early_exit_step")
        if exit_at_step is None and exit_threshold is None and default is not None:
            exit_at_step = default + 1 if default < num_steps else None
        if exit_at_step is not None:
            step = min(exit_at_step - 1, ran)
            return torch.full(gate_logits_BSt.shape[:2], step, device=gate_logits_BSt.device)
        q = self.config.early_exit_threshold if exit_threshold is None else exit_threshold
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"exit_threshold must lie in [0, 1], got {q}")
        if ran < num_steps:
            # Q-exit counts the CDF of its last column as 1: an extra column stands for "later".
            gate_logits_BSt = F.pad(gate_logits_BSt, (0, 1))
        return q_exit_steps(gate_logits_BSt, q)

    def _logits_at(self, step_hidden_TBSH, exit_steps_BS, step_logits_TBSV=None) -> torch.Tensor:
        index = exit_steps_BS[None, ..., None].long()
        if step_logits_TBSV is not None:
            index = index.expand(1, *step_logits_TBSV.shape[1:])
            return step_logits_TBSV.gather(0, index)[0]
        # The head is linear, so the logits of the selected hidden state are the selected logits.
        chosen = step_hidden_TBSH.gather(0, index.expand(1, *step_hidden_TBSH.shape[1:]))[0]
        return self.lm_head(chosen)

    @staticmethod
    def _check_attention_mask(attention_mask, input_ids, past: int) -> torch.Tensor | None:
        """The padding mask as bools [B, past + S], or None when there is no padding."""
        if attention_mask is None:
            return None
        expected = (input_ids.shape[0], past + input_ids.shape[1])
        if tuple(attention_mask.shape) != expected:
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)} must cover the cached and the new "
                f"tokens: {expected}"
            )
        key_mask = attention_mask.bool()
        return None if bool(key_mask.all()) else key_mask

    def _check_inputs(self, input_ids, position_ids, labels, steps, exit_at_step, past):
        cfg = self.config
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"input_ids must be an integer tensor [batch, seq], got {input_ids.dtype} "
                f"{tuple(input_ids.shape)}"
            )
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= cfg.vocab_size):
            bad = input_ids[(input_ids < 0) | (input_ids >= cfg.vocab_size)][0].item()
            raise ValueError(
                f"input_ids holds token id {bad}, outside the vocabulary [0, {cfg.vocab_size})"
            )
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"num_steps must be an integer >= 1, got {steps!r}")
        if exit_at_step is not None and not 1 <= exit_at_step <= steps:
            raise ValueError(f"exit_at_step must lie in [1, {steps}], got {exit_at_step}")
        if position_ids is None:
            position_ids = torch.arange(past, past + input_ids.shape[1], device=input_ids.device)
            position_ids = position_ids.expand_as(input_ids)
        elif position_ids.shape != input_ids.shape:
            raise ValueError(
                f"position_ids {tuple(position_ids.shape)} must have the shape of input_ids "
                f"{tuple(input_ids.shape)}"
            )
        if position_ids.numel() and int(position_ids.max()) >= cfg.max_position_embeddings:
            raise ValueError(
                f"position {int(position_ids.max())} exceeds max_position_embeddings "
                f"({cfg.max_position_embeddings})"
            )
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(
                    f"labels {tuple(labels.shape)} must have the shape of input_ids {tuple(input_ids.shape)}"
                )
            bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= cfg.vocab_size))
            if bad.any():
                raise ValueError(f"labels hold id {labels[bad][0].item()}, outside the vocabulary")
        return position_ids

    # ---- persistence (looplm.checkpoint holds the format) -------------------------------

    @classmethod
    def from_pretrained(cls, path, dtype=None, attn_implementation: str = "sdpa", device=None):
        """Loads an Ouro-format directory (config.json + safetensors, sharded or not) or a hub id.

        ``dtype``: a torch dtype, "auto" (the checkpoint's torch_dtype) or None (float32).
        """
        from looplm.checkpoint import load_pretrained

        return load_pretrained(
            cls, path, dtype=dtype, attn_implementation=attn_implementation, device=device
        )

    def save_pretrained(self, path, max_shard_size: int | str = "5GB", dtype=None) -> None:
        """Writes config.json, generation_config.json and safetensors weights in Ouro's format."""
        from looplm.checkpoint import save_pretrained

        save_pretrained(self, path, max_shard_size=max_shard_size, dtype=dtype)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
        """Decodes with a KV cache; see ``looplm.generation.generate`` for the options."""
        from looplm.generation import generate

        return generate(self, input_ids, max_new_tokens, **kwargs)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # a tied head is counted once
