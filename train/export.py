"""Turning a training checkpoint into an Ouro-format model directory."""

from __future__ import annotations

from pathlib import Path

import torch

from looplm import LoopLMConfig, LoopLMForCausalLM
from train.checkpointing import DEEPSPEED_TAG, MODEL_CONFIG, CheckpointManager


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint step directory as it is, or the latest complete one of a run directory."""
    path = Path(path)
    if (path / MODEL_CONFIG).is_file():
        return path
    latest = CheckpointManager(path, keep_last=1, rank=0).latest()
    if latest is None:
        raise FileNotFoundError(f"{path} is neither a checkpoint nor a run directory with one")
    return latest


def is_run_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a looplm checkpoint or a run directory holding one (rather than an
    Ouro-format model directory)."""
    path = Path(path)
    return (path / MODEL_CONFIG).is_file() or (path / "checkpoints").is_dir()


def load_checkpoint_model(path: str | Path, attn_implementation: str = "sdpa") -> LoopLMForCausalLM:
    """The model of a checkpoint, with its float32 master weights (any ZeRO stage)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    checkpoint = resolve_checkpoint(path)
    config = LoopLMConfig.load(checkpoint / MODEL_CONFIG)
    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=DEEPSPEED_TAG)
    with torch.device("meta"):
        model = LoopLMForCausalLM(config, attn_implementation)
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def export_checkpoint(path: str | Path, out_dir: str | Path, dtype: str | None = None) -> Path:
    """Writes the checkpoint at ``path`` as an Ouro-format directory; returns ``out_dir``."""
    load_checkpoint_model(path).save_pretrained(out_dir, dtype=dtype)
    return Path(out_dir)
