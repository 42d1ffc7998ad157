"""Config schemas of the training jobs, registered with Hydra's ConfigStore, and their checks.

Each config group has one dataclass; every YAML file of a group starts from it
(``defaults: [schema, _self_]``), so an unknown key or a wrong type fails at compose time.
``config_problems`` runs the cross-field checks before any process group starts and
``validate`` raises once with every problem.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from data_pipelines.config import DataConfig, validate_data_config
from data_pipelines.tokenizer import is_local_tokenizer, tokenizer_summary
from looplm.config import PRESETS, LoopLMConfig
from looplm.kernels import kernels_problem
from looplm.losses import PRIORS, REGULARIZERS
from train.curriculum import Curriculum, CurriculumSettings, Stage, stage_problems
from train.stability import StabilitySettings, stability_problems
from train.validation import EvalSettings, eval_problems

SCHEDULES = ("wsd", "cosine", "constant")
BETA_SCHEDULES = ("constant", "linear", "cosine")
PRECISIONS = ("bf16", "fp32", "auto")
OFFLOAD_DEVICES = ("none", "cpu")
CHECKPOINT_FAULT_MOMENTS = ("mid_write", "before_complete", "before_rename")
FAULT_ACTIONS = ("kill", "pause")


@dataclass
class ModelSettings:
    """Which LoopLM to build when the run does not start from a checkpoint."""

    preset: str = "tiny"
    """A looplm preset (ouro-1.4b, ouro-2.6b, tiny, small); the fields below override it."""
    vocab_size: int | None = None
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rope_theta: float | None = None
    max_position_embeddings: int | None = None
    total_ut_steps: int | None = None
    tie_word_embeddings: bool | None = None
    attn_implementation: str = "auto"
    """auto (flash-attn when usable, else SDPA), sdpa, flash or eager."""
    gradient_checkpointing: bool = False
    """Recompute each (step, layer) in the backward pass."""
    kernels: str = "torch"
    """RMSNorm, SwiGLU and RoPE: torch, or liger (fused Triton kernels for eager layers; CUDA
    and the gpu extra, checked when a rank builds the model)."""
    compile: bool = False
    """torch.compile each decoder layer (never the loop over steps): T, the sequence length and
    the micro-batch may change across stages without recompiling (a micro-batch of 1 compiles
    once more). Off until measured on a GPU."""

    def build_config(self, **extra: Any) -> LoopLMConfig:
        architecture = {f.name for f in dataclasses.fields(LoopLMConfig)}
        overrides = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name in architecture and getattr(self, f.name) is not None
        }
        return LoopLMConfig.from_preset(self.preset, **overrides, **extra)


@dataclass
class OptimSettings:
    """AdamW."""

    lr: float = 3e-4
    """Peak learning rate."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.1
    """Applied to matrices only: not to norms, biases or the gate bias."""
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 disables)."""


@dataclass
class ScheduleSettings:
    """Learning-rate schedule over ``train.max_steps`` optimizer steps."""

    kind: str = "wsd"
    """wsd (warmup-stable-decay), cosine or constant; all with linear warmup."""
    warmup_steps: int = 100
    decay_fraction: float = 0.2
    """wsd: the last fraction of the steps decays linearly to min_lr_ratio * lr."""
    min_lr_ratio: float = 0.1
    """Final LR as a fraction of the peak (wsd and cosine)."""


@dataclass
class DeepSpeedSettings:
    """How DeepSpeed shards and computes."""

    zero_stage: int = 2
    offload_optimizer: str = "none"
    """none or cpu (ZeRO-Offload; stage 2 or 3)."""
    offload_param: str = "none"
    """none or cpu (stage 3 only)."""
    precision: str = "auto"
    """bf16, fp32, or auto: bf16 where the device supports it, else fp32."""
    sequence_parallel_size: int = 1
    """Ranks that split every sequence (DeepSpeed-Ulysses); the data-parallel size is the
    world size divided by it. Heads, key/value heads and seq_len must divide by it."""
    overlap_comm: bool = True
    reduce_bucket_size: int = 50_000_000
    stage3_prefetch_bucket_size: int = 50_000_000


@dataclass
class TrainSettings:
    """The optimization loop."""

    global_batch_tokens: int = 65536
    """Tokens per optimizer step over all data-parallel ranks:
    micro_batch_size x seq_len x gradient accumulation x data-parallel size."""
    micro_batch_size: int = 4
    """Sequences per rank per forward."""
    max_steps: int | None = 1000
    """Optimizer steps of the run; with a curriculum, a cap (None: run every stage)."""
    num_recurrent_steps: int | None = None
    """T while training (default: the model's total_ut_steps); may differ from a checkpoint's."""
    objective: str = "stage1"
    """stage1 (the paper's: expected loss over the exit distribution, plus beta R(p)) or
    last_step (the last step's loss alone, the exit gate untrained: an ablation)."""
    beta: float = 0.1
    """Weight of the exit-distribution regularizer (Stage I) at the start of the run."""
    beta_final: float | None = None
    """Weight at the end of the run (None: beta throughout)."""
    beta_schedule: str = "constant"
    """How beta moves from beta to beta_final over the run: constant, linear or cosine."""
    prior: str = "uniform"
    """Exit prior: uniform, geometric or none."""
    prior_param: float = 0.5
    regularizer: str = "entropy"
    """entropy (-beta H(p), the paper's) or kl (beta KL(p || prior))."""
    deterministic: bool = False
    """Deterministic kernels (for bit-exact reproduction; slower on GPU)."""
    log_every: int = 10
    """Console lines every N steps (metrics.jsonl gets every step)."""


@dataclass
class CheckpointSettings:
    every_steps: int = 500
    """Save every N optimizer steps (and at the end, and on SIGTERM)."""
    keep_last: int = 3
    """Complete checkpoints kept; older ones are deleted (never the newest complete one)."""


@dataclass
class LoggingSettings:
    wandb: bool = True
    """Log to Weights & Biases (offline when no credentials are configured)."""
    wandb_project: str = "looplm"
    wandb_mode: str = "auto"
    """auto (online with credentials, else offline), online, offline."""
    plot_at_end: bool = True
    """Draw the run's PNG charts into run_dir/plots when the run ends."""


@dataclass
class FaultSettings:
    """Faults injected at given optimizer steps (1-based), to rehearse the guards and crash
    recovery on a real run. The loss and gradient faults hit rank 0 only: every rank must then
    skip the update."""

    nan_loss_at_steps: list[int] = field(default_factory=list)
    """The step's loss becomes NaN."""
    nan_grad_at_steps: list[int] = field(default_factory=list)
    """The loss stays finite but its gradients become NaN."""
    spike_loss_at_steps: list[int] = field(default_factory=list)
    """The step's last micro-batch loss is multiplied by spike_factor."""
    spike_grad_at_steps: list[int] = field(default_factory=list)
    """The loss stays as it is but the gradients of its last micro-batch are multiplied by
    spike_factor."""
    spike_factor: float = 10.0
    checkpoint_fault_at_step: int | None = None
    """The checkpoint write of this step is interrupted (a crash rehearsal)."""
    checkpoint_fault_moment: str = "mid_write"
    """Where the write is interrupted: mid_write (DeepSpeed's files of the step written, the
    ranks' own state files not), before_complete (every file written, no COMPLETE marker yet)
    or before_rename (the marker written, the folder not yet renamed into place). The last two
    happen on rank 0, which alone writes the marker and renames."""
    checkpoint_fault_rank: int | None = None
    """The rank interrupted mid_write (None: every rank)."""
    checkpoint_fault_action: str = "kill"
    """kill: the rank kills itself with SIGKILL; pause: it logs that it paused and waits to be
    killed from outside (a test's SIGKILL of the job then lands at a certain moment)."""
    pause_after_step: int | None = None
    """After this step (and its checkpoint, if one is due) every rank logs that it paused and
    waits to be killed from outside."""


@dataclass
class PretrainConfig:
    """The pre-training job."""

    run_dir: str = MISSING
    """Checkpoints, metrics.jsonl and plots; re-running on the same run_dir resumes."""
    seed: int = 0
    init_from: str | None = None
    """An Ouro-format directory (or hub id), or a looplm checkpoint or run directory, whose
    weights start the run."""
    init_required: bool = False
    """Set by experiments that continue a trained model: init_from must then be given."""
    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimSettings = field(default_factory=OptimSettings)
    schedule: ScheduleSettings = field(default_factory=ScheduleSettings)
    deepspeed: DeepSpeedSettings = field(default_factory=DeepSpeedSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    stability: StabilitySettings = field(default_factory=StabilitySettings)
    faults: FaultSettings = field(default_factory=FaultSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    curriculum: CurriculumSettings = field(default_factory=CurriculumSettings)


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="pretrain_schema", node=PretrainConfig)
    cs.store(group="model", name="schema", node=ModelSettings)
    cs.store(group="optim", name="schema", node=OptimSettings)
    cs.store(group="schedule", name="schema", node=ScheduleSettings)
    cs.store(group="deepspeed", name="schema", node=DeepSpeedSettings)
    cs.store(group="logging", name="schema", node=LoggingSettings)
    cs.store(group="stability", name="schema", node=StabilitySettings)
    cs.store(group="curriculum", name="schema", node=CurriculumSettings)
    cs.store(group="eval", name="schema", node=EvalSettings)


def to_object(cfg: DictConfig) -> PretrainConfig:
    """The composed config as typed dataclasses."""
    return OmegaConf.to_object(cfg)


# ---- cross-field checks -------------------------------------------------------------------


def gradient_accumulation(train: TrainSettings, seq_len: int, dp_size: int) -> int:
    per_pass = train.micro_batch_size * seq_len * dp_size
    return train.global_batch_tokens // per_pass if per_pass else 0


def config_problems(cfg: PretrainConfig, world_size: int) -> list[str]:
    """Every problem of a composed config for a run on ``world_size`` ranks."""
    t, d, ds = cfg.train, cfg.data, cfg.deepspeed
    model_cfg, p = _model_config(cfg)
    if cfg.init_required and cfg.init_from is None:
        p.append("init_from is required: this experiment continues a trained model")
    if t.micro_batch_size < 1:
        p.append(f"train.micro_batch_size must be >= 1, got {t.micro_batch_size}")
    if t.global_batch_tokens < 1:
        p.append(f"train.global_batch_tokens must be >= 1, got {t.global_batch_tokens}")
    # Only the name here: the launch host may have no GPU; a rank checks the rest at build.
    kernels = kernels_problem(cfg.model.kernels, here=False)
    if kernels is not None:
        p.append(f"model.kernels: {kernels}")
    if cfg.model.compile and cfg.model.kernels != "torch":
        p.append(
            "model.compile=true fuses RMSNorm, SwiGLU and RoPE itself: use it with "
            f"model.kernels=torch (got {cfg.model.kernels})"
        )
    if cfg.seed < 0:
        p.append(f"seed must be >= 0 (numpy's generators take no negative seed), got {cfg.seed}")
    for name in ("reduce_bucket_size", "stage3_prefetch_bucket_size"):
        if getattr(ds, name) < 1:
            p.append(f"deepspeed.{name} must be >= 1, got {getattr(ds, name)}")
    if d.seq_len < 2:
        p.append(f"data.seq_len must be >= 2, got {d.seq_len}")
    stages = cfg.curriculum.stages
    sp = ds.sequence_parallel_size
    p += _sequence_parallel_problems(cfg, model_cfg, world_size)
    dp_size = world_size // sp if sp >= 1 and world_size % sp == 0 else world_size
    if t.micro_batch_size >= 1 and d.seq_len >= 1 and not stages:
        per_pass = t.micro_batch_size * d.seq_len * dp_size
        if t.global_batch_tokens < per_pass or t.global_batch_tokens % per_pass:
            p.append(
                f"train.global_batch_tokens ({t.global_batch_tokens}) must be a positive multiple "
                f"of micro_batch_size x seq_len x data-parallel size "
                f"({t.micro_batch_size} x {d.seq_len} x {dp_size} = {per_pass})"
            )
    if model_cfg is not None:
        if d.seq_len > model_cfg.max_position_embeddings:
            p.append(
                f"data.seq_len ({d.seq_len}) exceeds the model's max_position_embeddings "
                f"({model_cfg.max_position_embeddings})"
            )
        vocab = _tokenizer_vocab_size(d.tokenizer)
        if vocab is not None and vocab > model_cfg.vocab_size:
            p.append(
                f"the tokenizer {d.tokenizer!r} has {vocab} tokens, more than the model's "
                f"vocab_size ({model_cfg.vocab_size})"
            )
    if t.max_steps is None and not stages:
        p.append("train.max_steps is needed when the run has no curriculum stages")
    if t.max_steps is not None and t.max_steps < 1:
        p.append(f"train.max_steps must be >= 1, got {t.max_steps}")
    if t.num_recurrent_steps is not None and t.num_recurrent_steps < 1:
        p.append(f"train.num_recurrent_steps must be >= 1, got {t.num_recurrent_steps}")
    if t.beta < 0 or (t.beta_final is not None and t.beta_final < 0):
        p.append(f"train.beta and train.beta_final must be >= 0, got {t.beta}, {t.beta_final}")
    if t.beta_schedule not in BETA_SCHEDULES:
        p.append(f"train.beta_schedule must be one of {BETA_SCHEDULES}, got {t.beta_schedule!r}")
    if t.objective not in ("stage1", "last_step"):
        p.append(f"train.objective must be stage1 or last_step, got {t.objective!r}")
    if t.prior not in PRIORS:
        p.append(f"train.prior must be one of {PRIORS}, got {t.prior!r}")
    if t.prior == "geometric" and not 0.0 < t.prior_param < 1.0:
        p.append(f"train.prior_param must lie in (0, 1) for a geometric prior, got {t.prior_param}")
    if t.prior == "geometric" and t.regularizer == "entropy":
        p.append("train.prior=geometric needs train.regularizer=kl (the entropy form is uniform)")
    if t.log_every < 1:
        p.append(f"train.log_every must be >= 1, got {t.log_every}")
    if t.regularizer not in REGULARIZERS:
        p.append(f"train.regularizer must be one of {REGULARIZERS}, got {t.regularizer!r}")
    if ds.zero_stage == 0:
        p.append(
            "deepspeed.zero_stage=0 is not supported: the gradient norm the guards read and their"
            " skipped updates need a ZeRO optimizer (stage 1 partitions only the optimizer"
            " state, and costs a small model no more time)"
        )
    elif ds.zero_stage not in (1, 2, 3):
        p.append(f"deepspeed.zero_stage must be 1, 2 or 3, got {ds.zero_stage}")
    if ds.offload_optimizer not in OFFLOAD_DEVICES or ds.offload_param not in OFFLOAD_DEVICES:
        p.append(f"deepspeed offload devices must be one of {OFFLOAD_DEVICES}")
    if ds.offload_optimizer == "cpu" and ds.zero_stage < 2:
        p.append(
            f"deepspeed.offload_optimizer=cpu needs ZeRO stage 2 or 3, got stage {ds.zero_stage}"
        )
    if ds.offload_param == "cpu" and ds.zero_stage != 3:
        p.append(f"deepspeed.offload_param=cpu needs ZeRO stage 3, got stage {ds.zero_stage}")
    if ds.precision not in PRECISIONS:
        p.append(f"deepspeed.precision must be one of {PRECISIONS}, got {ds.precision!r}")
    p += _schedule_problems(cfg)
    if stages and t.micro_batch_size >= 1:
        p += stage_problems(
            stages,
            micro_batch_size=t.micro_batch_size,
            dp_size=dp_size,
            base=curriculum_base(cfg, model_cfg),
            sources=[source.name for source in d.sources],
            max_positions=model_cfg.max_position_embeddings if model_cfg else None,
            parameter_names=_parameter_names(model_cfg) if model_cfg else None,
        )
    p += stability_problems(cfg.stability)
    if cfg.checkpoint.every_steps < 1 or cfg.checkpoint.keep_last < 1:
        p.append("checkpoint.every_steps and checkpoint.keep_last must be >= 1")
    p += fault_problems(cfg.faults, world_size)
    p += eval_problems(cfg.eval, d)
    p += validate_data_config(d)
    return p


def _model_config(cfg: PretrainConfig) -> tuple[LoopLMConfig | None, list[str]]:
    """The architecture the run will train (from init_from's config.json, else the model
    settings), and the problems found on the way."""
    if cfg.init_from is not None:
        from train.export import MODEL_CONFIG, is_run_checkpoint, resolve_checkpoint

        path = Path(cfg.init_from)
        if path.is_dir():
            config = resolve_checkpoint(path) / MODEL_CONFIG if is_run_checkpoint(path) else path
            try:
                source = LoopLMConfig.load(config)
            except (OSError, ValueError) as e:
                return None, [f"init_from: {e}"]
            return source, _ignored_model_settings(cfg.model, source)
        hub_like = cfg.init_from.count("/") == 1 and not path.is_absolute()
        if hub_like and not path.parent.is_dir():
            return None, []  # a hub id (ORG/NAME), fetched when the run starts
        why = f" ({path.parent}/ is a folder here, so not a hub id)" if hub_like else ""
        return None, [f"init_from: no Ouro-format directory at {cfg.init_from}{why}"]
    if cfg.model.preset not in PRESETS:
        return None, [f"model.preset {cfg.model.preset!r} is unknown; known: {sorted(PRESETS)}"]
    try:
        return cfg.model.build_config(), []
    except ValueError as e:
        return None, [f"model: {e}"]


def _ignored_model_settings(model: ModelSettings, source: LoopLMConfig) -> list[str]:
    """Model settings given beside init_from that differ from the source's: the model comes
    from init_from, so they would be ignored."""
    architecture = {f.name for f in dataclasses.fields(LoopLMConfig)}
    return [
        f"model.{f.name}={getattr(model, f.name)} is set, but the model comes from init_from, "
        f"whose {f.name} is {getattr(source, f.name)}; remove the setting"
        for f in dataclasses.fields(model)
        if f.name in architecture
        and getattr(model, f.name) is not None
        and getattr(model, f.name) != getattr(source, f.name)
    ]


def _sequence_parallel_problems(
    cfg: PretrainConfig, model_cfg: LoopLMConfig | None, world_size: int
) -> list[str]:
    sp = cfg.deepspeed.sequence_parallel_size
    if sp < 1:
        return [f"deepspeed.sequence_parallel_size must be >= 1, got {sp}"]
    if sp == 1:
        return []
    p = []
    if world_size % sp:
        p.append(
            f"deepspeed.sequence_parallel_size ({sp}) must divide the number of ranks "
            f"({world_size})"
        )
    seq_lens = [cfg.data.seq_len] + [s.seq_len for s in cfg.curriculum.stages if s.seq_len]
    if any(length % sp for length in seq_lens):
        p.append(f"every seq_len ({seq_lens}) must divide by sequence_parallel_size ({sp})")
    if model_cfg is not None and (
        model_cfg.num_attention_heads % sp or model_cfg.num_key_value_heads % sp
    ):
        p.append(
            f"sequence_parallel_size ({sp}) must divide the attention heads "
            f"({model_cfg.num_attention_heads}) and key/value heads "
            f"({model_cfg.num_key_value_heads})"
        )
    return p


def data_parallel_size(cfg: PretrainConfig, world_size: int) -> int:
    """Ranks that read different data: the world size over the sequence-parallel size."""
    return world_size // cfg.deepspeed.sequence_parallel_size


def curriculum_base(cfg: PretrainConfig, model_cfg: LoopLMConfig | None) -> dict:
    """The run's own settings, which the first stage of a curriculum starts from."""
    t = cfg.train
    return {
        "seq_len": cfg.data.seq_len,
        "global_batch_tokens": t.global_batch_tokens,
        "lr": cfg.optim.lr,
        "beta": t.beta,
        "num_recurrent_steps": t.num_recurrent_steps
        or (model_cfg.total_ut_steps if model_cfg else 1),
        "rope_theta": model_cfg.rope_theta if model_cfg else 10000.0,
    }


def build_curriculum(cfg: PretrainConfig, model_cfg: LoopLMConfig, world_size: int) -> Curriculum:
    """The run's plan on ``world_size`` ranks: its curriculum stages, or one stage."""
    dp_size = data_parallel_size(cfg, world_size)
    micro = cfg.train.micro_batch_size
    if not cfg.curriculum.stages:
        return Curriculum([one_stage(cfg, model_cfg)], micro, dp_size, configured=False)
    base = curriculum_base(cfg, model_cfg)
    return Curriculum.resolve(cfg.curriculum.stages, base, micro, dp_size)


def one_stage(cfg: PretrainConfig, model_cfg: LoopLMConfig) -> Stage:
    """The one stage of a run without curriculum stages: ``train.max_steps`` batches of the
    configured mixture, the LR by the ``schedule`` group, beta by ``train.beta_*``."""
    t, s = cfg.train, cfg.schedule
    base = curriculum_base(cfg, model_cfg)  # seq_len, batch, lr, beta, T, RoPE base
    batch = base["global_batch_tokens"]
    return Stage(
        **base,
        index=0,
        name="main",
        start=0,
        end=t.max_steps * batch,
        # the configured mixture: a resume with changed weights applies them (logged)
        weights={source.name: source.weight for source in cfg.data.sources},
        batch_ramp_from=batch,
        batch_ramp_tokens=0,
        lr_final=base["lr"] * s.min_lr_ratio,
        lr_schedule=s.kind,
        warmup_tokens=s.warmup_steps * batch,
        beta_final=t.beta if t.beta_final is None else t.beta_final,
        beta_schedule=t.beta_schedule,
        trainable=None,
        decay_tokens=round(t.max_steps * s.decay_fraction) * batch if s.kind == "wsd" else 0,
    )


def _parameter_names(model_cfg: LoopLMConfig) -> list[str]:
    """Parameter names of the model (built on the meta device: no memory, no time)."""
    import torch

    from looplm import LoopLMForCausalLM

    with torch.device("meta"):
        return [name for name, _ in LoopLMForCausalLM(model_cfg).named_parameters()]


def _tokenizer_vocab_size(name: str) -> int | None:
    """The tokenizer's vocabulary size when it is on this machine, else None."""
    return tokenizer_summary(name).vocab_size if is_local_tokenizer(name) else None


def _schedule_problems(cfg: PretrainConfig) -> list[str]:
    s, o = cfg.schedule, cfg.optim
    p = []
    if s.kind not in SCHEDULES:
        p.append(f"schedule.kind must be one of {SCHEDULES}, got {s.kind!r}")
    if s.warmup_steps < 0:
        p.append(f"schedule.warmup_steps must be >= 0, got {s.warmup_steps}")
    if not 0.0 <= s.decay_fraction <= 1.0 or not 0.0 <= s.min_lr_ratio <= 1.0:
        p.append("schedule.decay_fraction and schedule.min_lr_ratio must lie in [0, 1]")
    if o.lr <= 0:
        p.append(f"optim.lr must be > 0, got {o.lr}")
    if o.eps <= 0:
        p.append(f"optim.eps must be > 0 (Adam divides by it), got {o.eps}")
    if o.weight_decay < 0:
        p.append(f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    if o.grad_clip < 0:
        p.append(f"optim.grad_clip must be >= 0 (0: no clipping), got {o.grad_clip}")

    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        p.append(f"optim.betas must be two numbers in [0, 1), got {list(o.betas)}")
    return p


def fault_problems(f: FaultSettings, world_size: int) -> list[str]:
    p = []
    if f.checkpoint_fault_moment not in CHECKPOINT_FAULT_MOMENTS:
        p.append(
            f"faults.checkpoint_fault_moment must be one of {CHECKPOINT_FAULT_MOMENTS}, "
            f"got {f.checkpoint_fault_moment!r}"
        )
    if f.checkpoint_fault_action not in FAULT_ACTIONS:
        p.append(
            f"faults.checkpoint_fault_action must be one of {FAULT_ACTIONS}, "
            f"got {f.checkpoint_fault_action!r}"
        )
    if f.checkpoint_fault_rank is not None:
        if not 0 <= f.checkpoint_fault_rank < world_size:
            p.append(
                f"faults.checkpoint_fault_rank must lie in [0, {world_size}), "
                f"got {f.checkpoint_fault_rank}"
            )
        elif f.checkpoint_fault_moment != "mid_write" and f.checkpoint_fault_rank != 0:
            p.append(
                f"faults.checkpoint_fault_moment={f.checkpoint_fault_moment} happens on rank 0 "
                f"only; checkpoint_fault_rank {f.checkpoint_fault_rank} would never fail"
            )
    if f.spike_factor <= 0:
        p.append(f"faults.spike_factor must be > 0, got {f.spike_factor}")
    for name in ("checkpoint_fault_at_step", "pause_after_step"):
        value = getattr(f, name)
        if value is not None and value < 1:
            p.append(f"faults.{name} must be >= 1, got {value}")
    return p


def config_warnings(cfg: PretrainConfig) -> list[str]:
    """Settings that run but are probably not meant (a smoke test may mean them)."""
    warnings, steps, warmup = [], cfg.train.max_steps, cfg.schedule.warmup_steps
    if steps is not None and not cfg.curriculum.stages and warmup > steps:
        warnings.append(
            f"schedule.warmup_steps ({warmup}) is longer than the run (train.max_steps={steps}): "
            "the LR never reaches optim.lr"
        )
    model_cfg, _ = _model_config(cfg)
    vocab = _tokenizer_vocab_size(cfg.data.tokenizer) if model_cfg is not None else None
    if vocab is not None and model_cfg.vocab_size > max(2 * vocab, vocab + 256):
        warnings.append(
            f"the model's vocab_size ({model_cfg.vocab_size}) is much larger than the tokenizer's "
            f"vocabulary ({vocab} tokens, {cfg.data.tokenizer}): {model_cfg.vocab_size - vocab} "
            "embedding rows never see a token; model.vocab_size sets the model's"
        )
    return warnings


def validate(cfg: PretrainConfig, world_size: int, warn: bool = True) -> None:
    """ValueError naming every problem of ``cfg``; its warnings logged where ``warn`` (one rank
    of a job says them, not every one)."""
    problems = config_problems(cfg, world_size)
    if problems:
        raise ValueError("invalid training config:\n  - " + "\n  - ".join(problems))
    for warning in config_warnings(cfg) if warn else ():
        logging.getLogger("looplm.config").warning(warning)
