"""LoopLMConfig: the Ouro config.json schema, validated, with presets.

Field names follow the released Ouro ``config.json`` exactly, so a released config loads
unchanged and a saved one is read by the Ouro modeling code and by vLLM.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODEL_TYPE = "ouro"
ARCHITECTURES = ["OuroForCausalLM"]

# Keys of Ouro/HF config.json files that carry no architecture we must honour: kept as they
# are for a faithful round trip. Keys outside this set and the dataclass fields are kept too,
# with a warning, so that a newer release still loads.
_PASSTHROUGH_KEYS = {
    "architectures",
    "model_type",
    "torch_dtype",
    "dtype",
    "use_cache",
    "attention_dropout",
    "use_sliding_window",
    "sliding_window",
    "max_window_layers",
    "layer_types",
    "initializer_range",
    "transformers_version",
    "auto_map",
    "rope_scaling",
    "attention_bias",
    "hidden_dropout",
    "_name_or_path",
}


@dataclass
class LoopLMConfig:
    """Architecture of a LoopLM, in the names of Ouro's config.json."""

    vocab_size: int = 49152
    hidden_size: int = 2048
    intermediate_size: int = 5632
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_key_value_heads: int = 16  # < num_attention_heads means grouped-query attention
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    hidden_act: str = "silu"  # SwiGLU; the only activation Ouro uses
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 65536
    total_ut_steps: int = 4  # T: how many times the layer stack is applied
    early_exit_threshold: float = 1.0  # Q-exit threshold q of the default output; 1.0 = last step
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 0
    pad_token_id: int | None = None
    torch_dtype: str = "float32"  # dtype of the stored weights
    extra: dict[str, Any] = field(default_factory=dict)  # other config.json keys, kept verbatim

    def __post_init__(self) -> None:
        if self.head_dim is None and self.num_attention_heads > 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        problems = self.problems()
        if problems:
            raise ValueError("invalid LoopLMConfig:\n  - " + "\n  - ".join(problems))

    def problems(self) -> list[str]:
        """Every inconsistency in the config, as readable sentences (empty when valid)."""
        p = []
        positive = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                p.append(f"{name} must be a positive integer, got {value!r}")
        if p:
            return p
        if self.hidden_size % self.num_attention_heads:
            p.append(
                f"hidden_size ({self.hidden_size}) is not divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            p.append(
                f"num_attention_heads ({self.num_attention_heads}) is not divisible by "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if not isinstance(self.head_dim, int) or self.head_dim < 2 or self.head_dim % 2:
            p.append(f"head_dim must be a positive even integer (RoPE), got {self.head_dim!r}")
        if not isinstance(self.total_ut_steps, int) or self.total_ut_steps < 1:
            p.append(f"total_ut_steps must be an integer >= 1, got {self.total_ut_steps!r}")
        if not 0.0 <= float(self.early_exit_threshold) <= 1.0:
            p.append(f"early_exit_threshold must lie in [0, 1], got {self.early_exit_threshold}")
        if self.hidden_act != "silu":
            p.append(f"hidden_act {self.hidden_act!r} is not supported (Ouro uses 'silu')")
        if self.rms_norm_eps <= 0:
            p.append(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if self.rope_theta <= 0:
            p.append(f"rope_theta must be > 0, got {self.rope_theta}")
        for name in ("bos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                p.append(f"{name} ({value}) is outside the vocabulary [0, {self.vocab_size})")
        eos = self.eos_token_id if isinstance(self.eos_token_id, list) else [self.eos_token_id]
        for value in eos:
            if value is not None and not 0 <= value < self.vocab_size:
                p.append(f"eos_token_id ({value}) is outside the vocabulary [0, {self.vocab_size})")
        step = self.extra.get("early_exit_step")
        if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
            p.append(f"early_exit_step must be a step index >= 0 or null, got {step!r}")
        if self.extra.get("use_sliding_window"):
            p.append("use_sliding_window=true is not supported: Ouro attends over full context")
        if self.extra.get("rope_scaling"):
            p.append(f"rope_scaling {self.extra['rope_scaling']!r} is not supported")
        if self.extra.get("attention_bias"):
            p.append("attention_bias=true is not supported: Ouro's projections have no biases")
        return p

    # ---- derived quantities ----------------------------------------------------------

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return (
            list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]
        )

    def num_parameters(self) -> int:
        """Parameter count, from the shapes alone (no model is built)."""
        h, q = self.hidden_size, self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h
        mlp = 3 * h * self.intermediate_size
        layer = attn + mlp + 4 * h
        embed = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return embed + head + self.num_hidden_layers * layer + h + (h + 1)

    # ---- JSON ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The config.json content: Ouro's keys, model_type and architectures included."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        d.update(self.extra)
        d["model_type"] = MODEL_TYPE
        d["architectures"] = list(ARCHITECTURES)
        return dict(sorted(d.items()))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoopLMConfig:
        """Builds a config from config.json content; rejects other model types."""
        model_type = d.get("model_type")
        if model_type != MODEL_TYPE:
            raise ValueError(
                f"config.json has model_type={model_type!r}; looplm reads only {MODEL_TYPE!r} "
                "checkpoints"
            )
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in d.items() if k in names}
        if kwargs.get("torch_dtype") is None:
            kwargs["torch_dtype"] = d.get("dtype") or "float32"
        extra = {
            k: v
            for k, v in d.items()
            if k not in names and k not in ("model_type", "architectures")
        }
        return cls(**kwargs, extra=extra)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> LoopLMConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
        return cls.from_dict(d)

    def replace(self, **changes: Any) -> LoopLMConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> LoopLMConfig:
        """One of PRESETS, with optional field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


_OURO_COMMON = dict(
    vocab_size=49152,
    hidden_size=2048,
    intermediate_size=5632,
    num_attention_heads=16,
    num_key_value_heads=16,
    head_dim=128,
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
    max_position_embeddings=65536,
    total_ut_steps=4,
    early_exit_threshold=1.0,
    tie_word_embeddings=False,
    torch_dtype="bfloat16",
)

PRESETS: dict[str, dict[str, Any]] = {
    # The released models (OURO.md §1).
    "ouro-1.4b": {**_OURO_COMMON, "num_hidden_layers": 24},
    "ouro-2.6b": {**_OURO_COMMON, "num_hidden_layers": 48},
    # CPU-sized models for tests, the embedded-corpus job and benchmarks.
    "tiny": dict(
        vocab_size=8192,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=10_000.0,
        max_position_embeddings=2048,
        total_ut_steps=4,
    ),
    "small": dict(
        vocab_size=32768,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        rope_theta=10_000.0,
        max_position_embeddings=4096,
        total_ut_steps=4,
    ),
}
