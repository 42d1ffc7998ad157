"""looplm: the Ouro Looped Language Model and its training objectives (pure PyTorch)."""

from looplm.config import PRESETS, LoopLMConfig
from looplm.generation import LoopKVCache, generate
from looplm.losses import Objective, exit_pdf, q_exit_steps, stage1_loss, stage2_gate_loss
from looplm.modeling import LoopLMForCausalLM, LoopLMOutput

__all__ = [
    "PRESETS",
    "LoopKVCache",
    "LoopLMConfig",
    "LoopLMForCausalLM",
    "LoopLMOutput",
    "Objective",
    "exit_pdf",
    "generate",
    "q_exit_steps",
    "stage1_loss",
    "stage2_gate_loss",
]
