"""The trainer every training job runs: the DeepSpeed engine, the step plan (curriculum or
one stage), the spike guards and rollbacks, checkpoints that resume exactly, metrics and the
console. `run_job` runs a composed job with it; `train/pretrain.py`, `train/sft.py` and
`train/gate_tuning.py` are the jobs, each a Hydra app (the last two derive their trainers).

Re-running the same command on the same ``run_dir`` resumes from its latest complete
checkpoint, exactly: the per-step losses of a resumed run equal the uninterrupted run's.
"""

from __future__ import annotations

import faulthandler
import gc
import logging
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from data_pipelines.config import rendering
from data_pipelines.loader import build_data_loader
from looplm import LoopLMForCausalLM, Objective
from train.checkpointing import CheckpointManager, rng_state, set_rng_state
from train.config import (
    PretrainConfig,
    build_curriculum,
    data_parallel_size,
    register_configs,
    validate,
)
from train.curriculum import Stage, StepPlan, trainable_mask
from train.engine import (
    build_engine,
    build_model,
    clipped_grad_norm,
    pre_step_grad_norm,
    set_accumulation,
    step_skipping_update,
)
from train.faults import CheckpointFault, pause_after
from train.metrics import (
    MetricsLogger,
    compiled_graphs,
    device_peak_flops,
    step_flops_per_token,
)
from train.resume_settings import check_resume_settings
from train.run_lock import RunLock, exit_with_launcher
from train.sequence_parallel import local_slice, sequence_parallel_group, token_share
from train.stability import StabilityGuard, Verdict
from train.validation import Validator, append_record, console_line, wandb_values

logger = logging.getLogger("looplm.pretrain")
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


@dataclass
class TrainerState:
    """What the trainer itself needs to continue, besides the engine and the data loader."""

    step: int = 0
    tokens: int = 0
    """Tokens consumed (all ranks); the curriculum's position is a function of it."""
    world_size: int = 1
    stage: str | None = None
    """Name of the curriculum stage in force (for the record; recomputed from tokens)."""
    # The stability guard's state as of the last save (StabilityGuard.state_dict, which owns
    # it while training): accepted values, rollback record, skips and grad-norm spikes in a row.
    loss_window: list[float] = field(default_factory=list)
    grad_norm_window: list[float] = field(default_factory=list)
    guard: dict = field(default_factory=dict)
    consecutive_skips: int = 0
    grad_spike_run: int = 0
    skipped_steps: int = 0
    """Updates skipped so far (non-finite values and spikes)."""
    good: bool = True
    """No spike in the recent past when saved: a checkpoint a rollback may return to."""
    data_seed_offset: int = 0
    """Added to `data.seed`: the step at which the data streams last restarted, on resuming
    with another number of ranks, so that later resumes keep reading those streams."""


def _environment() -> tuple[int, int, int]:
    return (
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
        int(os.environ.get("LOCAL_RANK", 0)),
    )


def _skip_inference_shm_op() -> None:
    """Keeps DeepSpeed from building its shared-memory all-reduce for CPU ranks as it starts
    the process group: a C++ op compiled on the first start on a machine (37 s on 2
    cores) and loaded on every start after ("deepspeed_shm_comm_op built successfully", once
    a rank), for its inference tensor parallelism alone (``inference_all_reduce``). Training
    all-reduces through the gloo process group either way. DeepSpeed keeps the ops it may
    build in one dict (``deepspeed.ops.__compatible_ops__``, probed on first use; the same
    dict as ``git_version_info.compatible_ops`` before 0.19); the op is marked as one it may
    not. A DeepSpeed without that dict builds the op as before."""
    import deepspeed.ops

    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(compatible, dict):
        compatible["deepspeed_shm_comm"] = False


def devices(world_size: int, backend: str) -> str:
    """A job's ranks and backend, as in ``2 CPU ranks, gloo``."""
    kind = "GPU" if backend == "nccl" else "CPU"
    return f"{world_size} {kind} rank{'' if world_size == 1 else 's'}, {backend}"


def device_problem(local_rank: int, gpus: int) -> str | None:
    """Why a rank has no GPU of its own (None: it has one, or the job runs on CPUs). Without
    this check the rank dies in ``torch.cuda.set_device`` on an invalid device ordinal."""
    if gpus == 0 or local_rank < gpus:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return (
        f"local rank {local_rank} has no GPU of its own: {gpus} GPU{'s' * (gpus > 1)} visible on "
        f"this machine{f' (CUDA_VISIBLE_DEVICES={visible})' if visible is not None else ''}; "
        f"start at most one rank per GPU (torchrun --nproc_per_node {gpus})"
    )


def _single_process_defaults() -> None:
    """A job started without a launcher (``python -m train.pretrain ...``) runs as one rank:
    the rendezvous variables a launcher would set, on this machine."""
    if "RANK" in os.environ or "WORLD_SIZE" in os.environ:
        return
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(
        RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    logger.info("no launcher: running as a single rank")


def _check_run_dir(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write_probe_{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"run_dir {run_dir} is not writable: {e}") from e


# `kill -USR1 <pid of a rank>` prints every thread's stack of that rank to the job's log,
# without stopping it: where a job that seems stuck waits (a collective, the data, a file).
STACK_DUMP_SIGNAL = signal.SIGUSR1


class _StopSignal:
    """Turns SIGTERM (a cluster's preemption) into a request to save and stop."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True


class _ScaledGradient(torch.autograd.Function):
    """Identity whose gradient is scaled by ``factor`` (NaN: non-finite gradients of a finite
    loss)."""

    @staticmethod
    def forward(ctx, x, factor: float):
        ctx.factor = factor
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def _mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    values = values.detach().double().cpu()
    if dist.is_initialized():
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


@dataclass
class StepStats:
    """A step's loss statistics: sums over its micro-batches (weighted by their token share),
    then ``mean`` over the micro-batches and ranks."""

    loss: torch.Tensor  # [1] float64
    exit_entropy: torch.Tensor  # [1]
    loss_per_step: torch.Tensor  # [T]
    exit_pdf_mean: torch.Tensor  # [T]

    @classmethod
    def zeros(cls, num_steps: int) -> StepStats:
        one, per_step = (
            torch.zeros(1, dtype=torch.float64),
            torch.zeros(num_steps, dtype=torch.float64),
        )
        return cls(one, one.clone(), per_step, per_step.clone())

    def add(self, loss: torch.Tensor, out, share: float) -> None:
        """One micro-batch: its (possibly fault-injected) loss and the model's statistics."""
        self.loss += share * loss.detach().double().cpu().view(1)
        self.exit_entropy += share * out.exit_entropy.double().cpu().view(1)
        self.loss_per_step += share * out.loss_per_step.double().cpu()
        self.exit_pdf_mean += share * out.exit_pdf_mean.double().cpu()

    def mean(self, accumulation: int, stop_requested: bool) -> tuple[StepStats, bool]:
        """The mean over ``accumulation`` micro-batches and every rank, and whether any rank
        was asked to stop: one all-reduce carries both."""
        fields = [self.loss, self.exit_entropy, self.loss_per_step, self.exit_pdf_mean]
        flag = torch.tensor([float(stop_requested)], dtype=torch.float64)
        means = _mean_over_ranks(torch.cat([*fields, flag]) / accumulation)
        *values, any_stop = means.split([*(len(f) for f in fields), 1])
        return StepStats(*values), bool(any_stop.item() > 0)


class Trainer:
    """Runs the optimization loop of one rank."""

    def __init__(self, cfg: PretrainConfig):
        self.cfg = cfg
        self.rank, self.world_size, local_rank = _environment()
        validate(cfg, self.world_size, warn=self.rank == 0)
        self.run_dir = Path(cfg.run_dir)
        _check_run_dir(self.run_dir)
        self.dp_size = data_parallel_size(cfg, self.world_size)
        self.dp_rank = self.rank // cfg.deepspeed.sequence_parallel_size
        if self.rank == 0 and cfg.eval.enabled:
            logger.info("preparing the held-out evaluation sets ...")
        self.validator = self._build_validator()
        self._init_distributed(local_rank)
        torch.manual_seed(cfg.seed)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True)
        self.checkpoints = CheckpointManager(
            self.run_dir,
            cfg.checkpoint.keep_last,
            self.rank,
            interrupt=CheckpointFault(cfg.faults, self.rank),
        )
        self.checkpoints.remove_partial()
        self.checkpoints.report_unknown()
        self.checkpoints.set_aside_damaged()
        self.latest = self.checkpoints.latest()
        self.state = TrainerState(world_size=self.world_size)
        if self.latest is not None:
            saved = self.checkpoints.trainer_state(self.latest)
            self.state = TrainerState(**{**saved, "world_size": self.world_size})
        self.reshaped = self.latest is not None and saved["world_size"] != self.world_size
        if self.reshaped:
            # The streams are split by rank: their saved positions do not carry over to
            # another number of ranks, so the streams start anew under a seed of this step.
            self.state.data_seed_offset = self.state.step
        self.sp = sequence_parallel_group(cfg.deepspeed.sequence_parallel_size)
        self._phase("building the model")
        self.model = self.build_model()
        self.objective = self.build_objective()
        self.curriculum = build_curriculum(cfg, self.model.config, self.world_size)
        self.stage: Stage | None = None
        # a finished run (re-launched) plans from its last stage's start: it trains nothing
        done = self.state.tokens >= self.curriculum.total_tokens
        plan = self.curriculum.plan(self.curriculum.stages[-1].start if done else self.state.tokens)
        self._apply_model_settings(plan.stage)
        self._phase(
            f"building the DeepSpeed engine ({self.model.config.num_parameters():,} parameters, "
            f"ZeRO-{cfg.deepspeed.zero_stage}, {devices(self.world_size, self.backend)})"
        )
        self.in_optimizer = {n for n, p in self.model.named_parameters() if p.requires_grad}
        """What the engine trains in some stage (a job may freeze the rest before it is built)."""
        self.engine, self.precision = build_engine(
            cfg, self.model, plan.accumulation, self.reshaped, self._stage_groups()
        )
        self.configured_groups = [
            {key: group[key] for key in ("weight_decay", "betas", "eps")}
            for group in self.engine.optimizer.param_groups
        ]
        """Each optimizer group's hyperparameters as configured (see _apply_optimizer_settings)."""
        self.guard = StabilityGuard(cfg.stability)
        rank_state = self._resume()
        self._phase(
            f"opening the data streams: {', '.join(s.name for s in cfg.data.sources)} "
            f"({rendering(cfg.data)})"
        )
        self.loader = self._build_loader(rank_state)
        self.batches = iter(self.loader)
        self.total_steps = self._total_steps()
        self.metrics = MetricsLogger(
            self.run_dir, self.rank == 0, self.state.step, cfg.train.log_every, self.total_steps
        )
        if self.validator is not None:
            self.validator.truncate_after(self.state.step)
        self.peak_flops = device_peak_flops()
        if self.curriculum.configured and self.rank == 0:
            for line in self.curriculum.describe():
                logger.info("curriculum: %s", line)
        self.already_finished = self.latest is not None and self.finished()
        """The run was complete before this job: it says so and changes nothing."""
        self.stop_signal: _StopSignal | None = None  # while train() runs
        self.stop_agreed = False
        """Whether any rank was asked to stop by the last step's exchange of statistics."""
        self.started = time.time()
        self.start_state = (self.state.step, self.state.tokens)

    def _phase(self, what: str) -> None:
        """A start-up line, so that no phase of a start is silent."""
        if self.rank == 0:
            logger.info("%s ...", what)

    def _build_validator(self) -> Validator | None:
        """The held-out tasks, built (and proven held out) before any process group starts."""
        if not self.cfg.eval.enabled:
            return None
        return Validator.build(
            self.cfg.eval, self.cfg.data, self.run_dir, self.dp_rank, self.dp_size, self.rank == 0
        )

    def evaluate(self) -> dict:
        """Evaluates the model on the held-out tasks at the current step (every rank)."""
        record = {"step": self.state.step, "tokens": self.state.tokens, "stage": self.state.stage}
        record["num_recurrent_steps"] = self.num_steps
        record.update(self.validator.evaluate(self.model, self.num_steps, self.sp, self.rope_theta))
        if self.rank == 0:
            append_record(self.validator.path, record)
            self.metrics.log_eval(record, wandb_values(record), console_line(record))
        return record

    def build_model(self) -> LoopLMForCausalLM:
        """The model to train (a job deriving from this trainer may freeze parts of it)."""
        return build_model(self.cfg)

    def build_objective(self) -> Objective:
        """The loss of every step; its beta is replaced by the plan's at each step."""
        t = self.cfg.train
        return Objective(
            kind=t.objective,
            beta=t.beta,
            prior=t.prior,
            prior_param=t.prior_param,
            regularizer=t.regularizer,
        )

    def _init_distributed(self, local_rank: int) -> None:
        import deepspeed

        faulthandler.register(STACK_DUMP_SIGNAL, all_threads=True)  # stacks to stderr, goes on
        if torch.cuda.is_available():
            problem = device_problem(local_rank, torch.cuda.device_count())
            if problem is not None:
                raise ValueError(problem)
            torch.cuda.set_device(local_rank)
        self.backend = "nccl" if torch.cuda.is_available() else "gloo"
        if not torch.distributed.is_initialized():  # SFT starts it before the trainer does
            rank, world_size, _ = _environment()
            if rank == 0:
                logger.info(
                    "starting the process group (%s) ...", devices(world_size, self.backend)
                )
            if self.backend == "gloo":
                _skip_inference_shm_op()
        deepspeed.init_distributed(dist_backend=self.backend)

    # ---- the plan of each step ----------------------------------------------------------

    def plan(self) -> StepPlan:
        """What the next optimizer step does: its stage, micro-batches, LR and beta."""
        return self.curriculum.plan(self.state.tokens)

    def _total_steps(self) -> int:
        limit = self.cfg.train.max_steps
        steps = self.curriculum.total_steps()
        return steps if limit is None else min(limit, steps)

    def finished(self) -> bool:
        limit = self.cfg.train.max_steps
        if limit is not None and self.state.step >= limit:
            return True
        return self.state.tokens >= self.curriculum.total_tokens

    def _stage_ended(self) -> bool:
        """Whether the last step ended a curriculum stage (its checkpoint is always written:
        a branch point, such as the 2.6B model's, and an exact boundary to resume at)."""
        if self.finished():
            return False
        return self.curriculum.stage_at(self.state.tokens).index != self.stage.index

    def _apply_model_settings(self, stage: Stage) -> None:
        """The stage's loop depth and RoPE base, passed to every forward (the model's config
        stays as built). Configured stages also write them into the config that checkpoints
        carry, so that exports serve the model as trained."""
        self.num_steps, self.rope_theta = stage.num_recurrent_steps, stage.rope_theta
        self.saved_config = self.model.config
        """The model config this stage's checkpoints carry."""
        if self.curriculum.configured:
            self.saved_config = self.model.config.replace(
                total_ut_steps=stage.num_recurrent_steps, rope_theta=stage.rope_theta
            )
        self.flops_per_token = step_flops_per_token(
            self.model.config, stage.seq_len, self.num_steps, self.objective
        )

    def _enter_stage(self, stage: Stage) -> None:
        """Switches data, depth, RoPE base and trainable parameters when a stage begins (or
        when a run starts or resumes inside it)."""
        if self.stage is not None and self.stage.index == stage.index:
            return
        entering = self.stage is not None or self.state.tokens == stage.start
        resuming = self.stage is None and self.latest is not None
        self.stage, self.state.stage = stage, stage.name
        saved = self.loader.stage
        self.loader.set_stage(stage.weights, stage.seq_len)
        if resuming and self.loader.stage is not saved and self.rank == 0:
            logger.warning(
                "the data stage changes at resume (step %d): weights %s -> %s, seq_len %d -> %d",
                self.state.step,
                saved.weights,
                self.loader.stage.weights,
                saved.seq_len,
                self.loader.stage.seq_len,
            )
        self._apply_model_settings(stage)
        if any(s.trainable for s in self.curriculum.stages):
            self._train_only(stage)
        if self.rank == 0 and self.curriculum.configured:
            logger.info(
                "%s stage %d %r at step %d, %d tokens (T %d, seq_len %d, rope_theta %g)",
                "entering" if entering else "resuming in",
                stage.index,
                stage.name,
                self.state.step,
                self.state.tokens,
                stage.num_recurrent_steps,
                stage.seq_len,
                stage.rope_theta,
            )

    def _train_only(self, stage: Stage) -> None:
        """Freezes the parameters the stage leaves out, by ``requires_grad``: no gradient is
        computed for them, and DeepSpeed reduces zeros in its place, so they add nothing to the
        gradient norm. The engine (built once, with every parameter some stage trains) still
        holds them in its optimizer, so their groups also get LR 0 (``_set_learning_rate``):
        Adam's moments would otherwise go on moving them."""
        named = list(self.model.named_parameters())
        mask = trainable_mask([name for name, _ in named], stage.trainable)
        for (name, param), trains in zip(named, mask, strict=True):
            param.requires_grad_(trains and name in self.in_optimizer)

    def _stage_groups(self) -> list[tuple[bool, ...]] | None:
        """For each parameter, whether it trains in each stage (None: always)."""
        if not any(s.trainable for s in self.curriculum.stages):
            return None
        names = [n for n, _ in self.model.named_parameters()]
        masks = [trainable_mask(names, s.trainable) for s in self.curriculum.stages]
        return [tuple(mask[i] for mask in masks) for i in range(len(names))]

    # ---- resume and save ----------------------------------------------------------------

    def _resume(self) -> dict | None:
        """Restores the engine and the guards from the latest checkpoint; returns this rank's
        saved state (None when there is none or the number of ranks changed)."""
        if self.latest is None:
            return None
        managed = ("total_ut_steps", "rope_theta") if self.curriculum.configured else ()
        rank_state = self.checkpoints.load(
            self.engine, self.latest, self.world_size, self.saved_config, managed
        )
        self._apply_optimizer_settings()
        self.guard.load_state_dict(asdict(self.state))
        if rank_state is not None:
            set_rng_state(rank_state["rng"])
        if self.rank == 0:
            logger.info(
                "resumed from %s (step %d, %d tokens)",
                self.latest,
                self.state.step,
                self.state.tokens,
            )
        return rank_state

    def _apply_optimizer_settings(self) -> None:
        """The configured weight decay, betas and eps, over those the checkpoint's optimizer
        state brought back with it (the learning rate is set at every step): each group gets
        the values it was built with, before the load."""
        groups = self.engine.optimizer.param_groups
        assert len(groups) == len(self.configured_groups)
        for group, configured in zip(groups, self.configured_groups, strict=True):
            group.update(configured)

    def _build_loader(self, rank_state: dict | None):
        cfg = self.cfg
        data_cfg = replace(cfg.data, seed=cfg.data.seed + self.state.data_seed_offset)
        if self.reshaped and self.rank == 0:
            logger.warning(
                "resuming %d-rank checkpoint on %d ranks through DeepSpeed's universal "
                "checkpoint: the data order changes (streams restart with seed %d)",
                self.checkpoints.saved_world_size(self.latest),
                self.world_size,
                data_cfg.seed,
            )
        loader = build_data_loader(
            data_cfg,
            rank=self.dp_rank,
            world_size=self.dp_size,
            micro_batch_size=cfg.train.micro_batch_size,
        )
        if rank_state is not None:
            loader.load_state_dict(rank_state["data"])
        return loader

    def save(self) -> Path:
        rank_state = {"data": self.loader.state_dict(), "rng": rng_state()}
        self.state = replace(
            self.state, **self.guard.state_dict(), good=self.guard.good(self.state.step)
        )
        return self.checkpoints.save(
            self.engine, self.state.step, asdict(self.state), rank_state, self.saved_config
        )

    # ---- the loop -----------------------------------------------------------------------

    def train(self) -> None:
        """Optimizer steps until the run's end (train.max_steps, the curriculum's last token)
        or a stop signal."""
        cfg = self.cfg
        if self.already_finished:
            if self.rank == 0:
                logger.warning(
                    "%s is already complete (step %d, %d tokens): nothing to train. Raise "
                    "train.max_steps (or add a curriculum stage) to go on, or use a new run_dir.",
                    self.run_dir,
                    self.state.step,
                    self.state.tokens,
                )
            return
        if self.rank == 0 and cfg.logging.wandb:
            self.metrics.attach_wandb(
                self.run_dir, cfg.logging.wandb_project, cfg.logging.wandb_mode, asdict(cfg)
            )
        self.stop_signal = _StopSignal()
        if cfg.model.compile:
            self._phase("compiling the decoder layers in the first step (seconds to minutes)")
        while not self.finished():
            record = self.train_step(self.batches)
            rolled_back = record["rollback"] is not None
            self.metrics.log(record)
            stopping = self.stop_agreed
            # Before the checkpoint: a crash after it would otherwise skip this evaluation.
            if self.validator is not None and self.validator.due(self.state.step, self.finished()):
                self.evaluate()
            due = self.state.step % cfg.checkpoint.every_steps == 0 or self._stage_ended()
            if stopping or rolled_back or self.finished() or due:
                self.save()
            pause_after(cfg.faults, self.state.step, self.rank)
            if stopping:
                if self.rank == 0:
                    logger.warning("stop requested: saved step %d and stopping", self.state.step)
                break

    def train_step(self, batches) -> dict:
        """One optimizer step: forward and backward over the plan's micro-batches, the guards'
        verdict on its loss and gradient norm, the update (or its skip, and a rollback when
        spikes keep coming), and the step's record."""
        start = time.time()
        plan = self.plan()
        self._enter_stage(plan.stage)
        lr = self._set_learning_rate(plan)
        stats = self._forward_backward(plan, batches)
        loss = stats.loss.item()
        # The grad-norm guard judges the norm before the update. Without it, the norm that
        # DeepSpeed's step computes for clipping is the same norm, at no collective of ours.
        judged = self.guard.grad_norm.enabled
        grad_norm = pre_step_grad_norm(self.engine) if judged else math.nan
        verdict = self.guard.judge(loss, grad_norm)
        skipped = self._update(verdict)
        if not judged:
            grad_norm = clipped_grad_norm(self.engine)
        self.state.step += 1
        self.state.tokens += plan.tokens
        self.state.skipped_steps += int(skipped)
        reason, rollback_due = self.guard.settle(self.state.step, verdict, loss, grad_norm, skipped)
        rollback = None
        if reason is not None:
            if self.rank == 0:
                logger.warning("step %d skipped: %s", self.state.step, reason)
            if rollback_due:
                rollback = self.roll_back()
        tokens_per_s = plan.tokens / (time.time() - start)
        exit_pdf = stats.exit_pdf_mean.tolist()
        record = {
            "step": self.state.step,
            "tokens": self.state.tokens,
            "stage": plan.stage.name,
            "loss": loss,
            "loss_per_step": stats.loss_per_step.tolist(),
            "exit_pdf_mean": exit_pdf,
            "exit_entropy": stats.exit_entropy.item(),
            "mean_depth": sum((i + 1) * p for i, p in enumerate(exit_pdf)),
            "beta": plan.beta,
            "grad_norm": grad_norm,
            "lr": lr,
            "batch_tokens": plan.tokens,
            "skipped": skipped,
            "skip_reason": reason,
            "skipped_steps": self.state.skipped_steps,
            "rollback": rollback,
            "rollbacks": len(self.guard.rollbacks),
            "tokens_per_s": tokens_per_s,
            "mfu": self._mfu(tokens_per_s),
        }
        if self.objective.kind == "stage2":
            del record["beta"]  # Stage II has no exit regularizer
        if self.cfg.model.compile:
            record["compiled_graphs"] = compiled_graphs()
        return record

    def _set_learning_rate(self, plan: StepPlan) -> float:
        """The plan's LR (lowered after a rollback) on every group the stage trains, 0 on the
        others; returns it."""
        lr = plan.lr * self.guard.lr_factor(self.state.step)
        for group in self.engine.optimizer.param_groups:
            trains = group.get("stage_trainable")
            group["lr"] = lr if trains is None or trains[plan.stage.index] else 0.0
        return lr

    def _forward_backward(self, plan: StepPlan, batches) -> StepStats:
        """Gradient accumulation over the plan's micro-batches; their statistics, averaged."""
        engine = self.engine
        set_accumulation(engine, plan.accumulation)
        objective = replace(self.objective, beta=plan.beta)
        stats = StepStats.zeros(self.num_steps)
        for micro in range(plan.accumulation):
            last = micro == plan.accumulation - 1
            engine.set_gradient_accumulation_boundary(last)
            batch = local_slice(next(batches), self.sp)
            out = engine(
                batch["input_ids"].to(engine.device),
                position_ids=batch["position_ids"].to(engine.device),
                labels=batch["labels"].to(engine.device),
                num_steps=self.num_steps,
                objective=objective,
                rope_theta=self.rope_theta,
                sequence_parallel=self.sp,
            )
            loss = self._inject_faults(out.loss) if last else out.loss
            share = token_share(batch["labels"], self.sp)
            stats.add(loss, out, share)
            engine.backward(loss * share if self.sp is not None else loss)
        # A SIGTERM is shared with the step's statistics: one collective fewer a step. One that
        # comes after this exchange stops the run after the next step.
        requested = self.stop_signal is not None and self.stop_signal.requested
        means, self.stop_agreed = stats.mean(plan.accumulation, requested)
        return means

    def _update(self, verdict: Verdict) -> bool:
        """The optimizer step, or its skip on a spike; whether the update was skipped (also
        when DeepSpeed skipped it for non-finite gradients)."""
        engine, skipped_before = self.engine, self.engine.skipped_steps
        if verdict.let_through and self.rank == 0:
            logger.warning(
                "step %d: %s, as on the %d steps before at unchanged weights; the (clipped) "
                "update proceeds",
                self.state.step + 1,
                verdict.let_through,
                self.cfg.stability.grad_norm_patience,
            )
        if verdict.spike is not None:
            step_skipping_update(engine)
        else:
            engine.step()
        return engine.skipped_steps > skipped_before

    def roll_back(self) -> dict:
        """Restores the weights and optimizer state of the last good checkpoint before the
        current run of spikes. The data stream stays where it is, so the steps since that
        checkpoint are never trained on again; the LR is lowered for a while. Without such a
        checkpoint (early in a run) the weights stay and only the LR is lowered."""
        rollbacks = self.guard.rollback_rule
        first_spike = rollbacks.spike_steps[0]
        target = self.checkpoints.latest_good(before_step=first_spike)
        factor = self.cfg.stability.lr_factor
        if target is None:
            self.guard.keep_weights(self.state.step)
            if self.rank == 0:
                logger.warning(
                    "step %d: %d spikes since step %d and no good checkpoint before them: the "
                    "weights stay (the spike windows start over at their level), LR x %g until "
                    "step %d",
                    self.state.step,
                    self.cfg.stability.rollback_after,
                    first_spike,
                    factor,
                    rollbacks.lowered_until,
                )
            return {"to_step": None, "skipped_tokens": 0, "lr_factor": factor}
        saved = self.checkpoints.trainer_state(target)
        skipped_tokens = self.state.tokens - saved["tokens"]
        rollbacks.rolled_back(self.state.step, saved["step"], skipped_tokens)
        self.checkpoints.load_weights(self.engine, target, self.world_size)
        self.guard.restore_windows(saved)
        if self.rank == 0:
            logger.warning(
                "step %d: rolled back to the weights of step %d (%s); %d tokens since then are "
                "skipped, LR x %g until step %d",
                self.state.step,
                saved["step"],
                target,
                skipped_tokens,
                factor,
                rollbacks.lowered_until,
            )
        return {"to_step": saved["step"], "skipped_tokens": skipped_tokens, "lr_factor": factor}

    def _inject_faults(self, loss: torch.Tensor) -> torch.Tensor:
        """The configured faults of this step, on rank 0 only."""
        step, faults = self.state.step + 1, self.cfg.faults
        if self.rank != 0:
            return loss
        if step in faults.nan_loss_at_steps:
            return loss * float("nan")
        if step in faults.nan_grad_at_steps:
            return _ScaledGradient.apply(loss, float("nan"))
        if step in faults.spike_loss_at_steps:
            return loss * faults.spike_factor
        if step in faults.spike_grad_at_steps:
            return _ScaledGradient.apply(loss, faults.spike_factor)
        return loss

    def _mfu(self, tokens_per_s: float) -> float | None:
        if self.peak_flops is None:
            return None
        return tokens_per_s * self.flops_per_token / (self.peak_flops * self.world_size)

    def close(self) -> None:
        """Ends the data-loader workers and the metrics writers, also after an error."""
        self.batches.close()
        self.metrics.close()

    def finish(self) -> None:
        """Plots and the end-of-run summary (rank 0); nothing for a run already complete."""
        if self.rank == 0 and self.cfg.logging.plot_at_end and not self.already_finished:
            try:
                from train.plotting import plot_run

                plot_run(self.run_dir)
            except Exception as e:  # a plot must never fail a finished run
                logger.warning("could not draw the run's plots: %s", e)
        if self.rank == 0 and not self.already_finished:
            self.metrics.console.print(self.summary())
        if dist.is_initialized():
            dist.barrier()

    def summary(self) -> str:
        """One screen on what this job did and where its outputs are."""
        step, tokens = self.start_state
        seconds = time.time() - self.started
        done = self.state.tokens - tokens
        from train.plotting import read_metrics

        try:
            records = read_metrics(self.run_dir / "metrics.jsonl")[-SUMMARY_WINDOW:]
        except (FileNotFoundError, ValueError):  # no step finished in this run
            records = []
        records = same_depth_tail(records)
        state = "complete" if self.finished() else "stopped (the same command resumes it)"
        lines = [
            f"run {state}: step {self.state.step}/{self.total_steps}, {self.state.tokens:,} tokens",
            f"this job: steps {step + 1}-{self.state.step}, {done:,} tokens in "
            f"{seconds / 60:.1f} min ({done / max(seconds, 1e-9):,.0f} tokens/s)",
        ]
        if records:
            t = len(records[-1]["loss_per_step"])
            per_step = [
                sum(r["loss_per_step"][i] for r in records) / len(records) for i in range(t)
            ]
            lines.append(
                f"loss by recurrent step, mean of the last {len(records)} steps: "
                + " ".join(f"{x:.3f}" for x in per_step)
            )
        if self.cfg.model.compile:
            lines.append(
                f"torch.compile: {compiled_graphs()} graphs of the decoder layers in this job "
                "(more than a few means recompiles: see compiled_graphs in metrics.jsonl)"
            )
        total = max(self.state.step, 1)
        lines.append(
            f"updates skipped: {self.state.skipped_steps} ({self.state.skipped_steps / total:.1%})"
            f", rollbacks: {len(self.guard.rollbacks)}"
        )
        latest = self.checkpoints.latest()
        lines.append(
            f"checkpoints: {self.run_dir / 'checkpoints'} (latest: {latest.name if latest else 'none'})"
        )
        outputs = [self.run_dir / "metrics.jsonl"]
        if self.validator is not None:
            outputs.append(self.validator.path)
        if self.cfg.logging.plot_at_end:
            outputs.append(self.run_dir / "plots")
        lines.append("outputs: " + ", ".join(str(path) for path in outputs))
        return "\n".join(["-" * 72, *lines, "-" * 72])


register_configs()


SUMMARY_WINDOW = 20
"""Steps whose mean loss per recurrent step the end-of-run summary gives."""


def same_depth_tail(records: list[dict]) -> list[dict]:
    """The last records that ran as many recurrent steps as the last one (a curriculum may
    change T), whose per-step losses can be averaged."""
    if not records:
        return []
    depth = len(records[-1]["loss_per_step"])
    tail = []
    for record in reversed(records):
        if len(record["loss_per_step"]) != depth:
            break
        tail.append(record)
    return tail[::-1]


def run_job(trainer_class: type[Trainer], raw: DictConfig) -> None:
    """Runs a composed job with ``trainer_class`` (this trainer or one derived from it): the
    config goes to run_dir/config.yaml, the loader and metrics close even after an error."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    exit_with_launcher()
    _single_process_defaults()
    cfg = OmegaConf.to_object(raw)
    lock = RunLock(Path(cfg.run_dir), _environment()[0]).acquire()
    try:
        _check_resumed_settings(raw, Path(cfg.run_dir))
        trainer = trainer_class(cfg)
        if trainer.rank == 0:
            (Path(trainer.cfg.run_dir) / "config.yaml").write_text(OmegaConf.to_yaml(raw))
        try:
            trainer.train()
        finally:
            trainer.close()
        trainer.finish()
    finally:
        lock.release()
    # Everything is written and closed. The interpreter's exit would now walk the garbage
    # collector over every object that torch, DeepSpeed and datasets made (about 2 s per rank
    # on a CPU, each job); frozen objects are left to the operating system instead.
    gc.freeze()


def _check_resumed_settings(raw: DictConfig, run_dir: Path) -> None:
    """A job resuming a run compares its composed config, as ``config.yaml`` records it, with
    the previous job's, before anything is built (see ``train.resume_settings``)."""
    latest = CheckpointManager(run_dir, keep_last=1, rank=0).latest()
    if latest is None:
        return
    current = OmegaConf.to_container(raw, resolve=True, throw_on_missing=False)
    step = int(latest.name.split("_")[-1])
    check_resume_settings(run_dir, current, step, log=_environment()[0] == 0)
