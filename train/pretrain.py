"""The pre-training job: ``python -m train.pretrain`` (or ``looplm-pretrain``), under torchrun.

    torchrun --nproc_per_node 2 -m train.pretrain model=tiny data=embedded deepspeed=zero2 \
        run_dir=runs/tiny train.max_steps=300

Re-running the same command on the same ``run_dir`` resumes from its latest complete
checkpoint, exactly: the per-step losses of a resumed run equal the uninterrupted run's.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from data_pipelines.loader import build_data_loader
from looplm import Objective
from train.checkpointing import CheckpointManager, rng_state, set_rng_state
from train.config import (
    PretrainConfig,
    gradient_accumulation,
    register_configs,
    to_object,
    validate,
)
from train.engine import build_engine, build_model
from train.metrics import MetricsLogger, device_peak_flops, training_flops_per_token
from train.schedule import exit_beta, learning_rate
from train.stability import SpikeDetector

logger = logging.getLogger("looplm.pretrain")
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


@dataclass
class TrainerState:
    """What the trainer itself needs to continue, besides the engine and the data loader."""

    step: int = 0
    tokens: int = 0
    world_size: int = 1
    loss_window: list[float] = field(default_factory=list)  # the spike guard's accepted losses


def _environment() -> tuple[int, int, int]:
    return (
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
        int(os.environ.get("LOCAL_RANK", 0)),
    )


def _check_run_dir(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write_probe_{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"run_dir {run_dir} is not writable: {e}") from e


class _StopSignal:
    """Turns SIGTERM (a cluster's preemption) into a request to save and stop."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def agreed(self) -> bool:
        """True on every rank once any rank was signalled."""
        flag = torch.tensor([1.0 if self.requested else 0.0])
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


class _NaNGradient(torch.autograd.Function):
    """Identity whose gradient is NaN: a finite loss with non-finite gradients."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


def _mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    values = values.detach().double().cpu()
    if dist.is_initialized():
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


class Trainer:
    """Runs the optimization loop of one rank."""

    def __init__(self, cfg: PretrainConfig):
        self.cfg = cfg
        self.rank, self.world_size, local_rank = _environment()
        validate(cfg, self.world_size)
        self.run_dir = Path(cfg.run_dir)
        _check_run_dir(self.run_dir)
        self._init_distributed(local_rank)
        self.accumulation = gradient_accumulation(cfg.train, cfg.data.seq_len, self.world_size)
        torch.manual_seed(cfg.seed)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True)
        self.checkpoints = CheckpointManager(self.run_dir, cfg.checkpoint.keep_last, self.rank)
        self.checkpoints.remove_partial()
        self.latest = self.checkpoints.latest()
        saved_ranks = (
            self.checkpoints.saved_world_size(self.latest) if self.latest else self.world_size
        )
        self.reshaped = saved_ranks != self.world_size
        self.model = build_model(cfg)
        self.num_steps = cfg.train.num_recurrent_steps or self.model.config.total_ut_steps
        self.engine, self.precision = build_engine(
            cfg, self.model, self.accumulation, self.reshaped
        )
        self.objective = Objective(
            beta=cfg.train.beta,
            prior=cfg.train.prior,
            prior_param=cfg.train.prior_param,
            regularizer=cfg.train.regularizer,
        )
        self.state = TrainerState(world_size=self.world_size)
        self.spikes = SpikeDetector(cfg.stability)
        rank_state = self._resume()
        self.loader = self._build_loader(rank_state)
        self.batches = iter(self.loader)
        self.metrics = MetricsLogger(
            self.run_dir, self.rank == 0, self.state.step, cfg.train.log_every, cfg.train.max_steps
        )
        peak = device_peak_flops()
        flops = training_flops_per_token(self.model.config, cfg.data.seq_len, self.num_steps)
        self.flops_per_token, self.peak_flops = flops, peak

    def _init_distributed(self, local_rank: int) -> None:
        import deepspeed

        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend)

    def _resume(self) -> dict | None:
        """Restores the engine and trainer state from the latest checkpoint; returns this
        rank's saved state (None when there is none or the number of ranks changed)."""
        if self.latest is None:
            return None
        trainer_state, rank_state = self.checkpoints.load(
            self.engine, self.latest, self.world_size, self.model.config
        )
        self.state = TrainerState(**{**trainer_state, "world_size": self.world_size})
        self.spikes.load_state_dict({"history": self.state.loss_window})
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

    def _build_loader(self, rank_state: dict | None):
        cfg = self.cfg
        data_cfg = cfg.data
        if self.reshaped:
            # The streams are split by rank: their saved positions do not carry over to
            # another number of ranks, so the streams start anew under a seed of this step.
            data_cfg = replace(cfg.data, seed=cfg.data.seed + self.state.step)
            if self.rank == 0:
                logger.warning(
                    "resuming %d-rank checkpoint on %d ranks through DeepSpeed's universal "
                    "checkpoint: the data order changes (streams restart with seed %d)",
                    self.checkpoints.saved_world_size(self.latest),
                    self.world_size,
                    data_cfg.seed,
                )
        loader = build_data_loader(
            data_cfg,
            rank=self.rank,
            world_size=self.world_size,
            micro_batch_size=cfg.train.micro_batch_size,
        )
        if rank_state is not None:
            loader.load_state_dict(rank_state["data"])
        return loader

    def save(self) -> Path:
        rank_state = {"data": self.loader.state_dict(), "rng": rng_state()}
        self.state.loss_window = self.spikes.state_dict()["history"]
        return self.checkpoints.save(
            self.engine, self.state.step, asdict(self.state), rank_state, self.model.config
        )

    def train(self) -> None:
        """Optimizer steps until train.max_steps or a stop signal."""
        cfg = self.cfg
        if self.rank == 0 and cfg.logging.wandb:
            self.metrics.attach_wandb(
                self.run_dir, cfg.logging.wandb_project, cfg.logging.wandb_mode, asdict(cfg)
            )
        stop = _StopSignal()
        while self.state.step < cfg.train.max_steps:
            record = self.train_step(self.batches)
            self.metrics.log(record)
            stopping = stop.agreed()
            last = self.state.step == cfg.train.max_steps
            if stopping or last or self.state.step % cfg.checkpoint.every_steps == 0:
                self.save()
            if stopping:
                if self.rank == 0:
                    logger.warning("stop requested: saved step %d and stopping", self.state.step)
                break

    def train_step(self, batches) -> dict:
        """One optimizer step: gradient accumulation over micro-batches, the spike guard's
        verdict on the step's loss (before its last backward), then the update."""
        cfg, engine = self.cfg, self.engine
        start = time.time()
        lr = learning_rate(self.state.step, cfg.optim.lr, cfg.train.max_steps, cfg.schedule)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        beta = exit_beta(self.state.step, cfg.train.max_steps, cfg.train)
        objective = replace(self.objective, beta=beta)
        sums = torch.zeros(2 + 2 * self.num_steps, dtype=torch.float64)
        skipped_before, spike = engine.skipped_steps, None
        for micro in range(self.accumulation):
            batch = next(batches)
            out = engine(
                batch["input_ids"].to(engine.device),
                position_ids=batch["position_ids"].to(engine.device),
                labels=batch["labels"].to(engine.device),
                num_steps=self.num_steps,
                objective=objective,
            )
            loss = out.loss
            last = micro == self.accumulation - 1
            if last:
                loss = self._inject_faults(loss)
            sums += torch.cat(
                [
                    loss.detach().double().cpu().view(1),
                    out.exit_entropy.double().cpu().view(1),
                    out.loss_per_step.double().cpu(),
                    out.exit_pdf_mean.double().cpu(),
                ]
            )
            if last:
                means = _mean_over_ranks(sums / self.accumulation)
                spike = self.spikes.judge(means[0].item())
                if spike is not None:
                    # Non-finite gradients make DeepSpeed skip the update on every rank.
                    loss = _NaNGradient.apply(loss)
            engine.backward(loss)
            engine.step()
        self.state.step += 1
        self.state.tokens += cfg.train.global_batch_tokens
        skipped = engine.skipped_steps > skipped_before
        if not skipped:
            self.spikes.accept(means[0].item())
        if spike is not None and self.rank == 0:
            logger.warning("step %d skipped: %s", self.state.step, spike)
        elapsed = time.time() - start
        tokens_per_s = cfg.train.global_batch_tokens / elapsed
        t = self.num_steps
        grad_norm = engine.get_global_grad_norm()
        return {
            "step": self.state.step,
            "tokens": self.state.tokens,
            "loss": means[0].item(),
            "loss_per_step": means[2 : 2 + t].tolist(),
            "exit_pdf_mean": means[2 + t :].tolist(),
            "exit_entropy": means[1].item(),
            "mean_depth": sum((i + 1) * p for i, p in enumerate(means[2 + t :].tolist())),
            "beta": beta,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "lr": lr,
            "skipped": skipped,
            "skip_reason": spike if spike is not None else ("non-finite" if skipped else None),
            "tokens_per_s": tokens_per_s,
            "mfu": self._mfu(tokens_per_s),
        }

    def _inject_faults(self, loss: torch.Tensor) -> torch.Tensor:
        """The configured faults of this step, on rank 0 only."""
        step, faults = self.state.step + 1, self.cfg.faults
        if self.rank != 0:
            return loss
        if step in faults.nan_loss_at_steps:
            return loss * float("nan")
        if step in faults.nan_grad_at_steps:
            return _NaNGradient.apply(loss)
        if step in faults.spike_loss_at_steps:
            return loss * faults.spike_factor
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
        if self.rank == 0 and self.cfg.logging.plot_at_end:
            try:
                from launch.plotting import plot_run

                plot_run(self.run_dir)
            except Exception as e:  # a plot must never fail a finished run
                logger.warning("could not draw the run's plots: %s", e)
        if dist.is_initialized():
            dist.barrier()


register_configs()


@hydra.main(config_path=CONFIG_DIR, config_name="pretrain", version_base=None)
def main(raw: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = to_object(raw)
    trainer = Trainer(cfg)
    if trainer.rank == 0:
        (Path(cfg.run_dir) / "config.yaml").write_text(OmegaConf.to_yaml(raw))
    try:
        trainer.train()
    finally:
        trainer.close()
    trainer.finish()


if __name__ == "__main__":
    main()
