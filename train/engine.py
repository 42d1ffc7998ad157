"""Building the model, the optimizer and the DeepSpeed engine from a training config."""

from __future__ import annotations

import logging
import math
import warnings

import torch

from looplm import LoopLMForCausalLM
from train.config import PretrainConfig
from train.memory import reduce_bucket_elements

logger = logging.getLogger(__name__)


def resolve_precision(setting: str) -> str:
    """bf16 or fp32: ``auto`` takes bf16 where the device computes it natively."""
    if setting != "auto":
        return setting
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


def build_model(cfg: PretrainConfig) -> LoopLMForCausalLM:
    """A fresh model from ``cfg.model``, or the weights of ``cfg.init_from`` (an Ouro-format
    directory or hub id, or a looplm checkpoint or run directory)."""
    from train.export import load_model

    if cfg.init_from:
        model = load_model(cfg.init_from, torch.float32, cfg.model.attn_implementation)
    else:
        model = LoopLMForCausalLM(cfg.model.build_config(), cfg.model.attn_implementation)
    model.set_gradient_checkpointing(cfg.model.gradient_checkpointing)
    model.set_kernels(cfg.model.kernels)
    if cfg.model.compile:
        model.compile_layers()
    return model


def parameter_groups(
    model: torch.nn.Module,
    weight_decay: float,
    stage_trainable: list[tuple[bool, ...]] | None = None,
) -> list[dict]:
    """Weight decay on matrices; none on norms, biases and the gate bias.

    ``stage_trainable`` gives, per parameter, whether it trains in each curriculum stage; the
    groups are then split further so that each group trains in the same stages (its
    ``stage_trainable``), and the trainer gives a group LR 0 in the stages it sits out."""
    groups: dict[tuple, dict] = {}
    for index, param in enumerate(model.parameters()):
        if not param.requires_grad:
            continue
        decay = param.dim() >= 2
        stages = None if stage_trainable is None else stage_trainable[index]
        group = groups.setdefault(
            (decay, stages),
            {"params": [], "weight_decay": weight_decay if decay else 0.0},
        )
        if stages is not None:
            group["stage_trainable"] = list(stages)
        group["params"].append(param)
    return list(groups.values())


def deepspeed_config(
    cfg: PretrainConfig,
    accumulation: int,
    precision: str,
    params: int,
    load_universal: bool = False,
) -> dict:
    """DeepSpeed's config of the job; ``params``: the model's parameter count, which caps the
    gradient bucket (`reduce_bucket_elements`)."""
    ds = cfg.deepspeed
    zero: dict = {
        "stage": ds.zero_stage,
        "overlap_comm": ds.overlap_comm and torch.cuda.is_available(),
        "contiguous_gradients": True,
        "reduce_bucket_size": reduce_bucket_elements(ds.reduce_bucket_size, params),
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
    cfg: PretrainConfig,
    model: LoopLMForCausalLM,
    accumulation: int,
    load_universal: bool = False,
    stage_trainable: list[tuple[bool, ...]] | None = None,
):
    """The DeepSpeed engine around ``model`` with AdamW; ``load_universal`` prepares it to load
    a checkpoint written by another number of ranks; ``stage_trainable`` is as in
    ``parameter_groups``."""
    import deepspeed

    # ZeRO calls an all-gather that torch marks deprecated: DeepSpeed's to change, and noise
    # (once per rank) in the console of every run.
    warnings.filterwarnings(
        "ignore",
        message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
        category=FutureWarning,
    )
    precision = resolve_precision(cfg.deepspeed.precision)
    o = cfg.optim
    optimizer = torch.optim.AdamW(
        parameter_groups(model, o.weight_decay, stage_trainable),
        lr=o.lr,
        betas=tuple(o.betas),
        eps=o.eps,
        fused=torch.cuda.is_available() or None,
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        config=deepspeed_config(
            cfg, accumulation, precision, model.num_parameters(), load_universal
        ),
    )
    return engine, precision


def set_accumulation(engine, accumulation: int) -> None:
    """Micro-batches per rank of the next optimizer step (a curriculum's batch may change at
    every step). The trainer marks the accumulation boundary itself, so DeepSpeed's counter of
    micro-steps since the run began never decides where a step ends."""
    if engine.gradient_accumulation_steps() != accumulation:
        dp = engine.dp_world_size
        engine.set_train_batch_size(accumulation * engine.train_micro_batch_size_per_gpu() * dp)
        if hasattr(engine.optimizer, "gradient_accumulation_steps"):
            engine.optimizer.gradient_accumulation_steps = accumulation


def pre_step_grad_norm(engine) -> float:
    """Global L2 norm of the accumulated gradients after the step's last backward and before
    its update: what gradient clipping will see. Call on every rank."""
    import deepspeed
    from deepspeed.utils import safe_get_local_grad

    if engine.zero_optimization_stage() == 3:
        total = torch.zeros(1, dtype=torch.float64)
        for param in engine.module.parameters():
            grad = safe_get_local_grad(param)
            if grad is not None:
                total += grad.detach().double().pow(2).sum().cpu()
        deepspeed.comm.all_reduce(total)
        return total.sqrt().item()
    norm = float(engine.optimizer.scaled_global_norm())
    return norm / getattr(engine.optimizer, "loss_scale", 1.0) if norm >= 0 else float("nan")


def clipped_grad_norm(engine) -> float:
    """Global L2 norm of the gradients of the engine's last step before clipping, as its step
    computed it (the value ``pre_step_grad_norm`` gives before the step; inf: the update was
    skipped for non-finite gradients)."""
    norm = engine.get_global_grad_norm()
    return math.nan if norm is None else float(norm)


class _GuardSkipNotice(logging.Filter):
    """Drops DeepSpeed's "OVERFLOW! ... Gradients are non-finite" line for an update the
    guards skip on purpose (their gradients were finite; the trainer logs why)."""

    active = False

    def filter(self, record: logging.LogRecord) -> bool:
        return not (self.active and "OVERFLOW!" in record.getMessage())


GUARD_SKIP_NOTICE = _GuardSkipNotice()


def step_skipping_update(engine) -> None:
    """``engine.step()`` with its update skipped (see ``skip_update``), without DeepSpeed's
    overflow notice."""
    from deepspeed.utils import logger as deepspeed_logger

    if GUARD_SKIP_NOTICE not in deepspeed_logger.filters:
        deepspeed_logger.addFilter(GUARD_SKIP_NOTICE)
    skip_update(engine)
    GUARD_SKIP_NOTICE.active = True
    try:
        engine.step()
    finally:
        GUARD_SKIP_NOTICE.active = False


def skip_update(engine) -> None:
    """Makes the coming ``engine.step()`` skip its update on every rank, leaving weights and
    optimizer state untouched: a NaN gradient (in one small parameter) trips DeepSpeed's
    overflow check, which all ranks agree on."""
    from deepspeed.utils import safe_get_local_grad, safe_set_full_grad, safe_set_local_grad

    param = min(  # one the stage trains: a frozen one has no gradient to set
        (p for p in engine.module.parameters() if p.requires_grad),
        key=lambda p: p.ds_numel if hasattr(p, "ds_id") else p.numel(),
    )
    if hasattr(param, "ds_id"):
        grad = safe_get_local_grad(param)
        safe_set_local_grad(param, torch.full_like(grad, float("nan")))
    else:
        safe_set_full_grad(param, torch.full(param.shape, float("nan"), dtype=torch.float32))
