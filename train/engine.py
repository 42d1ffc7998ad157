"""Building the model, the optimizer and the DeepSpeed engine from a training config."""

from __future__ import annotations

import logging

import torch

from looplm import LoopLMForCausalLM
from train.config import PretrainConfig

logger = logging.getLogger(__name__)


def resolve_precision(setting: str) -> str:
    """bf16 or fp32: ``auto`` takes bf16 where the device computes it natively."""
    if setting != "auto":
        return setting
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


def build_model(cfg: PretrainConfig) -> LoopLMForCausalLM:
    """A fresh model from ``cfg.model``, or the weights of ``cfg.init_from``."""
    if cfg.init_from:
        model = LoopLMForCausalLM.from_pretrained(
            cfg.init_from, dtype=torch.float32, attn_implementation=cfg.model.attn_implementation
        )
    else:
        model = LoopLMForCausalLM(cfg.model.build_config(), cfg.model.attn_implementation)
    model.set_gradient_checkpointing(cfg.model.gradient_checkpointing)
    return model


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices; none on norms, biases and the gate bias."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def deepspeed_config(
    cfg: PretrainConfig, accumulation: int, precision: str, load_universal: bool = False
) -> dict:
    ds = cfg.deepspeed
    zero: dict = {
        "stage": ds.zero_stage,
        "overlap_comm": ds.overlap_comm and torch.cuda.is_available(),
        "contiguous_gradients": True,
        "reduce_bucket_size": ds.reduce_bucket_size,
    }
    if ds.zero_stage == 3:
        zero["stage3_prefetch_bucket_size"] = ds.stage3_prefetch_bucket_size
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    if ds.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.offload_param == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        # A non-finite gradient norm on any rank skips the update on every rank, leaving weights
        # and optimizer state untouched (fp32 and ZeRO-3 check it regardless).
        "bf16": {"enabled": precision == "bf16", "check_grad_overflow": True},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "checkpoint": {"load_universal": load_universal},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def build_engine(
    cfg: PretrainConfig, model: torch.nn.Module, accumulation: int, load_universal: bool = False
):
    """The DeepSpeed engine around ``model`` with AdamW; ``load_universal`` prepares it to load
    a checkpoint written by another number of ranks."""
    import deepspeed

    precision = resolve_precision(cfg.deepspeed.precision)
    o = cfg.optim
    optimizer = torch.optim.AdamW(
        parameter_groups(model, o.weight_decay),
        lr=o.lr,
        betas=tuple(o.betas),
        eps=o.eps,
        fused=torch.cuda.is_available() or None,
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        config=deepspeed_config(cfg, accumulation, precision, load_universal),
    )
    return engine, precision
