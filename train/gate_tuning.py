"""Stage II gate tuning: ``python -m train.gate_tuning`` (or ``looplm-gate-tuning``), under torchrun.

    torchrun --nproc_per_node 2 -m train.gate_tuning init_from=runs/tiny run_dir=runs/tiny-gate \
        export_dir=runs/tiny-gate/model train.max_steps=200

The language model is frozen: every parameter but ``model.early_exit_gate.*`` is built with
``requires_grad=False``, so only the gate gets gradients and optimizer state. The per-step
losses are computed without gradients and the gate learns the Stage II targets of OURO.md §2
(``Objective(kind="stage2")``). Streams, checkpoints, exact resume, metrics and the spike
guards are the pre-training trainer's. At the end the tuned gate is written into a copy of the
source model directory in which every other tensor keeps its bits.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import hydra
import torch
import torch.distributed as dist
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig
from safetensors import safe_open
from safetensors.torch import save_file

from looplm import LoopLMForCausalLM, Objective
from looplm.checkpoint import INDEX_NAME, WEIGHTS_NAME, resolve_model_dir
from looplm.files import publishing
from train.checkpointing import read_json
from train.config import PretrainConfig, config_problems
from train.export import export_dir_problems, prepare_source
from train.trainer import CONFIG_DIR, Trainer, run_job

logger = logging.getLogger("looplm.gate_tuning")

GATE_PREFIX = "model.early_exit_gate."


@dataclass
class Stage2Settings:
    """The Stage II gate loss (OURO.md §2): continuation target w_t = sigmoid(k (I_t - gamma))
    of the detached per-token improvement I_t = max(0, L_{t-1} - L_t)."""

    k: float = 50.0
    """Slope of the target: how sharply it switches from exit to continue around gamma."""
    gamma: float = 0.005
    """Improvement (nats) at which the target is 1/2: tokens improving less learn to exit."""


@dataclass
class GateTuningConfig(PretrainConfig):
    """The Stage II job: the pre-training schema, a required source and the gate loss."""

    init_from: str = MISSING
    """The model whose gate is tuned: an Ouro-format directory (or hub id), a run directory
    (its latest complete checkpoint) or one checkpoint step directory."""
    stage2: Stage2Settings = field(default_factory=Stage2Settings)
    export_dir: str | None = None
    """Where the tuned model is written in Ouro's format once the run reaches its last step
    (None: only the run checkpoints are written)."""


def register_configs() -> None:
    ConfigStore.instance().store(name="gate_tuning_schema", node=GateTuningConfig)


# ---- the source model ------------------------------------------------------------------


def gate_tuning_problems(cfg: GateTuningConfig, world_size: int) -> list[str]:
    """Every problem of the config for a run on ``world_size`` ranks: the pre-training checks
    (which also resolve ``init_from``) and the job's own."""
    p = config_problems(cfg, world_size)
    if cfg.stage2.k <= 0:
        p.append(f"stage2.k must be > 0, got {cfg.stage2.k}")
    if cfg.stage2.gamma < 0:
        p.append(f"stage2.gamma must be >= 0 (an improvement in nats), got {cfg.stage2.gamma}")
    if cfg.curriculum.stages:
        p.append("curriculum.stages: gate tuning runs one stage (train.max_steps steps)")
    p += export_dir_problems(cfg.init_from, cfg.run_dir, cfg.export_dir)
    return p


def export_tuned_gate(source: str, gate: dict[str, torch.Tensor], out_dir: str | Path) -> Path:
    """Copies the source model directory to ``out_dir`` with the gate tensors replaced (cast to
    their stored dtype): every other tensor, the sharding, the configs and any other file keep
    their bytes (their modes are those the umask allows). Written to a sibling folder first and
    moved into place when complete."""
    source_dir, out_dir = resolve_model_dir(source), Path(out_dir)
    index = source_dir / INDEX_NAME
    if index.is_file():
        files = {source_dir / f for f in read_json(index)["weight_map"].values()}
    else:
        files = {source_dir / WEIGHTS_NAME}
    with publishing(out_dir) as partial:
        shutil.copytree(source_dir, partial, dirs_exist_ok=True)
        replaced = set()
        for file in sorted(files):
            with safe_open(file, framework="pt") as f:
                if not gate.keys() & set(f.keys()):
                    continue
                tensors = {name: f.get_tensor(name) for name in f.keys()}
                metadata = f.metadata()
            for name in gate.keys() & tensors.keys():
                stored = tensors[name]
                tensors[name] = gate[name].detach().to("cpu", stored.dtype).reshape(stored.shape)
                replaced.add(name)
            save_file(tensors, partial / file.name, metadata=metadata)
        missing = sorted(gate.keys() - replaced)
        if missing:
            raise ValueError(f"{source_dir} holds no tensors named {missing}")
    return out_dir


def _full_fp32(param: torch.nn.Parameter) -> torch.Tensor:
    """The float32 master value of a trained parameter (a collective: call on every rank)."""
    from deepspeed.utils import safe_get_full_fp32_param

    master = safe_get_full_fp32_param(param)
    return (param if master is None else master).detach().float().cpu()


# ---- the job ---------------------------------------------------------------------------


class GateTuner(Trainer):
    """The pre-training trainer with a frozen LM and the Stage II objective. In its step
    records, ``loss`` is the Stage II gate loss, ``loss_per_step`` the frozen LM's
    cross-entropy at each step and ``exit_pdf_mean`` the exit distribution of the gate being
    trained; there is no ``beta`` (Stage II has no exit regularizer)."""

    def __init__(self, cfg: GateTuningConfig):
        problems = gate_tuning_problems(cfg, int(os.environ.get("WORLD_SIZE", 1)))
        if problems:
            raise ValueError("invalid gate-tuning config:\n  - " + "\n  - ".join(problems))
        source = prepare_source(cfg.init_from, Path(cfg.run_dir))
        super().__init__(replace(cfg, init_from=source))

    def build_model(self) -> LoopLMForCausalLM:
        """The source model with every parameter but the gate's frozen."""
        model = super().build_model()
        for name, param in model.named_parameters():
            param.requires_grad_(name.startswith(GATE_PREFIX))
        return model

    def build_objective(self) -> Objective:
        """The Stage II gate loss with the configured k and gamma."""
        return Objective(kind="stage2", gate_k=self.cfg.stage2.k, gate_gamma=self.cfg.stage2.gamma)

    def finish(self) -> None:
        """Plots, then, once the run has reached its last step, the Ouro-format export."""
        super().finish()
        if self.cfg.export_dir is None or not self.finished():
            return
        if self.already_finished and Path(self.cfg.export_dir, "config.json").is_file():
            return  # exported when the run completed
        gate = {
            name: _full_fp32(param)
            for name, param in self.model.named_parameters()
            if name.startswith(GATE_PREFIX)
        }
        if self.rank == 0:
            out = export_tuned_gate(self.cfg.init_from, gate, self.cfg.export_dir)
            logger.info("wrote the model with the tuned gate to %s", out)
        if dist.is_initialized():
            dist.barrier()


register_configs()


@hydra.main(config_path=CONFIG_DIR, config_name="gate_tuning", version_base=None)
def main(raw: DictConfig) -> None:
    run_job(GateTuner, raw)


if __name__ == "__main__":
    main()
