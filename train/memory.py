"""Per-GPU memory of a LoopLM training job: the estimate, whether it fits, the largest micro
batch, and a measured CPU forward-backward to check it against (`scripts/estimate_memory.py`
is the command line).

Assumptions. P parameters, P_L of them in the looped layer stack; ZeRO shards over the
N = dp x sp ranks (the sequence-parallel ranks hold the same parameters); B micro batch,
s = S / sp tokens per rank of an S-token sequence; H hidden, Q = heads x head_dim,
K = kv heads x head_dim, I intermediate, V vocab, D head dim, T recurrent steps, L layers;
p bytes per element: 2 under bf16 (DeepSpeed's mixed precision: bf16 weights, gradients and
activations, fp32 master weights and Adam moments), 4 under fp32.

- Weights: p P; ZeRO-3: p P / N; with ``--offload-param`` none on the GPU.
- Gradients: p P; ZeRO-2/3: p P / N; with ``--offload-optimizer`` (ZeRO-2/3) none on the GPU.
- Optimizer states: bf16: 16 bytes per parameter (fp32 master, Adam m and v, and the fp32
  gradient partition the step reads), fp32: 8 (m and v; the weights are the master);
  divided by N from ZeRO-1 on; on the CPU with ``--offload-optimizer``. Stage 0 counts
  nothing as sharded.
- ZeRO-3 gathers a module's full weights for its forward and backward:
  p (largest module + ``--prefetch-bucket`` elements).
- Communication buckets (ZeRO >= 1): 2 x ``--reduce-bucket`` elements of p bytes, at most 2 P
  (the job gives DeepSpeed a bucket no larger than the model: `reduce_bucket_elements`).
- Activations, per rank. Ulysses sequence parallelism splits the sequence over the sp ranks
  everywhere but inside attention, where an all-to-all splits the heads instead, so every
  per-token term counts s tokens; heads, kv heads and S must be divisible by sp.
  One layer keeps, per token, A = 4 (9H + 3Q + 2K' + 4I) bytes under fp32 (the sandwich
  norms' outputs and normed values, attention's rotated q, k', v' and output and its
  reshaped copy, SwiGLU's four I-wide tensors) or 24H + 2 (2H + 3Q + 2K' + 4I) under bf16
  (the four RMSNorms keep float32 copies of their inputs), besides its input; K' = Q where
  SDPA repeats grouped kv heads, else K. Counted from looplm's autograd graph and checked by
  ``--measure``.
  With per-(step, layer) checkpointing (default) the job keeps only the input of every
  (step, layer), T L B s H p, the last step's output B s H p and the fused head's gradient of
  every step's hidden state, T B s H p; on top of that, the larger of
  forward: the head's fp32 weight-gradient accumulator 4 V H and one chunk of C tokens'
  fp32 logits held twice, 8 C V (C = min(B s, looplm's chunk of ~128 MiB of logits) -- the
  fused head never materializes T x tokens x V logits), and
  backward: one (step, layer) recomputed, B s (A + 8H) (8H: the fp32 gradients inside an
  RMSNorm's backward), plus the gradients of the looped weights, which autograd sums over
  their T uses before any ZeRO hook sees them (T >= 2), p P_L at every ZeRO stage, plus one
  weight gradient in flight.
  Without checkpointing every (step, layer) keeps A (and under fp32 its input, 4H), and every
  step its final norm's tensors and head gradient (fp32 12H, bf16 10H bytes per token).
  RoPE's cos and sin: 2 B s D p. SDPA on packed documents builds a boolean mask of B S^2
  bytes (``--attention sdpa``); flash-attn's varlen kernel needs none (default).
- A reserve for the CUDA context, NCCL and allocator fragmentation: ``--reserve-gib``.

``--measure`` runs one forward and backward of the model (random weights, CPU, SDPA,
unpacked) and compares the peak of the bytes its tensors hold, parameters and their
gradients excluded, with the estimate's activations.
"""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from looplm import LoopLMConfig, LoopLMForCausalLM

GIB = 2**30
PRECISIONS = {"bf16": 2, "fp32": 4}
ATTENTIONS = ("flash", "sdpa")
_HEAD_CHUNK_BYTES = 128 * 2**20  # looplm.losses._auto_chunk: ~128 MiB of fp32 logits


@dataclass
class Setup:
    """One training job's memory-relevant settings."""

    config: LoopLMConfig
    seq_len: int
    micro_batch_size: int = 1
    num_recurrent_steps: int | None = None
    """T while training (default: the config's total_ut_steps)."""
    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_param: bool = False
    data_parallel: int = 1
    sequence_parallel: int = 1
    gradient_checkpointing: bool = True
    precision: str = "bf16"
    attention: str = "flash"
    packed: bool = True
    """Packed documents (SFT and pre-training data): SDPA then needs a mask."""
    gpu_memory_gib: float = 80.0
    reserve_gib: float = 2.0
    reduce_bucket_size: int = 50_000_000
    prefetch_bucket_size: int = 50_000_000

    @property
    def steps(self) -> int:
        return self.num_recurrent_steps or self.config.total_ut_steps


@dataclass
class Estimate:
    """Bytes per GPU, by kind; ``activations`` itemized in ``activation_terms``."""

    weights: int
    gradients: int
    optimizer: int
    zero3_gathered: int
    buckets: int
    activations: int
    reserve: int
    activation_terms: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(
            getattr(self, f.name)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), int)
        )


class DoesNotFit(ValueError):
    """Not even one sequence per rank fits the GPU."""


def setup_problems(setup: Setup) -> list[str]:
    """Every inconsistency of a setup (empty when it can be estimated)."""
    c, sp = setup.config, setup.sequence_parallel
    p = []
    checks = [
        (setup.seq_len < 1, f"seq_len must be >= 1, got {setup.seq_len}"),
        (setup.micro_batch_size < 1, f"micro batch must be >= 1, got {setup.micro_batch_size}"),
        (setup.steps < 1, f"recurrent steps must be >= 1, got {setup.steps}"),
        (setup.data_parallel < 1, f"data-parallel size must be >= 1, got {setup.data_parallel}"),
        (sp < 1, f"sequence-parallel size must be >= 1, got {sp}"),
        (setup.zero_stage not in (0, 1, 2, 3), f"ZeRO stage must be 0-3, got {setup.zero_stage}"),
        (
            setup.offload_optimizer and setup.zero_stage < 2,
            "optimizer offload needs ZeRO stage 2 or 3",
        ),
        (setup.offload_param and setup.zero_stage != 3, "parameter offload needs ZeRO stage 3"),
        (setup.precision not in PRECISIONS, f"precision must be one of {sorted(PRECISIONS)}"),
        (setup.attention not in ATTENTIONS, f"attention must be one of {ATTENTIONS}"),
        (setup.gpu_memory_gib <= 0, f"GPU memory must be > 0, got {setup.gpu_memory_gib}"),
        (
            setup.seq_len > c.max_position_embeddings,
            f"seq_len {setup.seq_len} exceeds the model's max_position_embeddings "
            f"({c.max_position_embeddings})",
        ),
    ]
    p += [message for failed, message in checks if failed]
    if sp >= 1:
        for name, count in (
            ("num_attention_heads", c.num_attention_heads),
            ("num_key_value_heads", c.num_key_value_heads),
            ("seq_len", setup.seq_len),
        ):
            if count % sp:
                p.append(
                    f"sequence parallelism splits {name} ({count}) over {sp} ranks: "
                    "it must be divisible"
                )
    return p


# ---- the terms ---------------------------------------------------------------------------


def layer_parameters(c: LoopLMConfig) -> int:
    """Parameters of one decoder layer."""
    q, k = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    return 2 * c.hidden_size * (q + k) + 3 * c.hidden_size * c.intermediate_size + 4 * c.hidden_size


def layer_activation_bytes(c: LoopLMConfig, precision: str, attention: str) -> int:
    """A: bytes per token that one layer keeps for its backward, its input excluded."""
    h, i = c.hidden_size, c.intermediate_size
    q = c.num_attention_heads * c.head_dim
    repeats_kv = attention == "sdpa" and c.num_key_value_heads < c.num_attention_heads
    kv = q if repeats_kv else c.num_key_value_heads * c.head_dim
    if precision == "fp32":
        return 4 * (9 * h + 3 * q + 2 * kv + 4 * i)
    return 24 * h + 2 * (2 * h + 3 * q + 2 * kv + 4 * i)


def head_chunk_tokens(vocab_size: int, tokens: int) -> int:
    """Tokens per chunk of the fused head and cross-entropy (looplm.losses)."""
    return min(tokens, max(128, _HEAD_CHUNK_BYTES // (4 * vocab_size)))


def activation_terms(s: Setup) -> dict[str, int]:
    """The activation terms of one rank, in bytes; ``activations`` is their peak."""
    c, p, t, big_l = s.config, PRECISIONS[s.precision], s.steps, s.config.num_hidden_layers
    h, v = c.hidden_size, c.vocab_size
    tokens = s.micro_batch_size * s.seq_len // s.sequence_parallel
    layer = layer_activation_bytes(c, s.precision, s.attention)
    largest_weight = h * max(c.intermediate_size, c.num_attention_heads * c.head_dim)
    terms = {"rope": 2 * tokens * c.head_dim * p}
    if s.attention == "sdpa" and s.packed:
        terms["packed_mask"] = s.micro_batch_size * s.seq_len**2
    if s.gradient_checkpointing:
        terms["layer_inputs"] = t * big_l * tokens * h * p
        terms["last_output_and_head_grads"] = (1 + t) * tokens * h * p
        recompute = tokens * (layer + 8 * h)
    else:
        fp32 = s.precision == "fp32"
        layer_input = 4 * h if fp32 else 0
        step_extra = 12 * h if fp32 else 10 * h
        terms["all_layers"] = t * big_l * tokens * (layer + layer_input)
        terms["steps_final_norm_and_head_grads"] = t * tokens * step_extra
        recompute = 0
    chunk = head_chunk_tokens(v, tokens)
    forward = 4 * v * h + 8 * chunk * v
    looped_gradients = layer_parameters(c) * big_l if t > 1 else 0
    backward = recompute + (looped_gradients + largest_weight) * p
    terms["head_forward" if forward >= backward else "layer_backward"] = max(forward, backward)
    return terms


def reduce_bucket_elements(setting: int, params: int) -> int:
    """The gradient bucket the job gives DeepSpeed: ``deepspeed.reduce_bucket_size``, or the
    model's parameter count where that is smaller. ZeRO-1/2 allocate a bucket of that many
    elements at every micro-step, whatever the model's size, and under deterministic algorithms
    (``train.deterministic``) PyTorch fills each new tensor: the default 50M cost a model of 1.1M
    parameters 100 MB written at every micro-step (a 60-step 2-rank CPU job 25.3 s against
    18.0 s, the same losses; ``scripts/bench_bucket.py``: 1.69x a step). One bucket still holds
    every gradient, as the larger one did."""
    return max(1, min(setting, params))


def estimate(s: Setup) -> Estimate:
    """Bytes per GPU of ``s``; raises ValueError listing every problem of the setup."""
    problems = setup_problems(s)
    if problems:
        raise ValueError("invalid setup:\n  - " + "\n  - ".join(problems))
    c, p, n = s.config, PRECISIONS[s.precision], s.data_parallel * s.sequence_parallel
    params = c.num_parameters()
    stage = s.zero_stage
    weights = 0 if s.offload_param else (p * params // n if stage == 3 else p * params)
    if stage >= 2 and s.offload_optimizer:
        gradients = 0
    else:
        gradients = p * params // n if stage >= 2 else p * params
    per_param = 16 if s.precision == "bf16" else 8
    optimizer = 0 if s.offload_optimizer else per_param * params // (n if stage >= 1 else 1)
    largest_module = max(
        c.vocab_size * c.hidden_size,
        c.hidden_size * c.intermediate_size,
        c.hidden_size * c.num_attention_heads * c.head_dim,
    )
    gathered = p * (largest_module + s.prefetch_bucket_size) if stage == 3 else 0
    buckets = 2 * reduce_bucket_elements(s.reduce_bucket_size, params) * p if stage >= 1 else 0
    terms = activation_terms(s)
    return Estimate(
        weights=weights,
        gradients=gradients,
        optimizer=optimizer,
        zero3_gathered=gathered,
        buckets=buckets,
        activations=sum(terms.values()),
        reserve=int(s.reserve_gib * GIB),
        activation_terms=terms,
    )


def fits(s: Setup) -> bool:
    return estimate(s).total <= s.gpu_memory_gib * GIB


def max_micro_batch(s: Setup, limit: int = 1 << 20) -> int:
    """The largest micro batch that fits (0: none), up to ``limit``."""

    def ok(b: int) -> bool:
        return fits(dataclasses.replace(s, micro_batch_size=b))

    if not ok(1):
        return 0
    low, high = 1, 2
    while high <= limit and ok(high):
        low, high = high, high * 2
    high = min(high, limit + 1)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if ok(middle) else (low, middle)
    return low


def _alternatives(s: Setup) -> list[str]:
    """Changes with which one sequence per rank would fit."""
    found = []
    one = dataclasses.replace(s, micro_batch_size=1)
    heads = s.config.num_key_value_heads
    for sp in (2**k for k in range(1, heads.bit_length())):
        candidate = dataclasses.replace(one, sequence_parallel=sp)
        if not setup_problems(candidate) and fits(candidate):
            found.append(f"sequence parallelism over {sp} ranks ({s.data_parallel * sp} GPUs)")
            break
    offload = dataclasses.replace(one, zero_stage=3, offload_optimizer=True, offload_param=True)
    if fits(offload):
        found.append("ZeRO-3 with optimizer and parameter offload")
    if not s.gradient_checkpointing and fits(dataclasses.replace(one, gradient_checkpointing=True)):
        found.append("activation checkpointing")
    return found


def check_fits(s: Setup) -> tuple[Estimate, int]:
    """The estimate at ``s``'s micro batch and the largest micro batch that fits; raises
    DoesNotFit, naming what would fit, when not even one sequence per rank does."""
    result = estimate(s)
    largest = max_micro_batch(s)
    if largest == 0:
        one = estimate(dataclasses.replace(s, micro_batch_size=1))
        alternatives = _alternatives(s)
        raise DoesNotFit(
            f"{s.seq_len} tokens per sequence do not fit: {one.total / GIB:.1f} GiB per GPU at "
            f"micro batch 1 > {s.gpu_memory_gib:g} GiB ({describe(one)}). "
            + (
                "It fits with " + " or ".join(alternatives) + "."
                if alternatives
                else "Nothing tried fits (sequence parallelism, ZeRO-3 offload, checkpointing)."
            )
        )
    return result, largest


def describe(e: Estimate) -> str:
    parts = [
        f"{f.name} {getattr(e, f.name) / GIB:.2f}"
        for f in dataclasses.fields(e)
        if isinstance(getattr(e, f.name), int) and getattr(e, f.name)
    ]
    return ", ".join(parts) + " GiB"


# ---- measurement -------------------------------------------------------------------------


class _LiveBytes(TorchDispatchMode):
    """The bytes of the storages that ops create while it is active, and their peak."""

    def __init__(self, ignore: set[int]):
        super().__init__()
        self.ignore, self.live, self.current, self.peak = ignore, {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                if storage.nbytes() and key not in self.live and key not in self.ignore:
                    self.live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key)


def measure_activation_bytes(s: Setup, seed: int = 0) -> int:
    """Peak bytes held by the tensors of one training forward and backward of ``s``'s model on
    the CPU (random weights and tokens, SDPA, one unpacked sequence per row), its parameters
    and their gradients excluded: what ``estimate`` calls activations."""
    dtype = torch.bfloat16 if s.precision == "bf16" else torch.float32
    torch.manual_seed(seed)
    model = LoopLMForCausalLM(s.config, attn_implementation="sdpa").to(dtype).train()
    model.set_gradient_checkpointing(s.gradient_checkpointing)
    shape = (s.micro_batch_size, s.seq_len)
    input_ids = torch.randint(0, s.config.vocab_size, shape)
    labels = torch.randint(0, s.config.vocab_size, shape)
    model(input_ids, labels=labels, num_steps=s.steps).loss.backward()  # allocates the grads
    held = {t.untyped_storage().data_ptr() for p in model.parameters() for t in (p, p.grad)}
    with _LiveBytes(held) as tracker:
        model(input_ids, labels=labels, num_steps=s.steps).loss.backward()
    return tracker.peak
