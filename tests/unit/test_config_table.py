"""Every numeric setting of every job's schema is validated before any process group starts.

The table below holds, for each numeric field, a value it must refuse. The test walks every
numeric leaf of the composed job configs (pre-training with a curriculum, SFT, gate tuning):
a field missing from the table fails it, so a new setting cannot go unvalidated.
"""

from __future__ import annotations

import copy
import re
from dataclasses import asdict

import pytest
from hydra import compose, initialize_config_dir

from looplm import LoopLMConfig
from tests.unit.test_train_config import CONFIGS, composed
from train.config import config_problems, to_object
from train.gate_tuning import gate_tuning_problems
from train.gate_tuning import register_configs as register_gate_tuning
from train.resume_settings import flatten
from train.sft import register_configs as register_sft
from train.sft import sft_problems

register_sft()
register_gate_tuning()

# field (list items as index 0) -> a value it must refuse, and overrides that make it matter
BAD: dict[str, tuple] = {
    "seed": (-1,),
    "model.vocab_size": (0,),
    "model.hidden_size": (0,),
    "model.intermediate_size": (0,),
    "model.num_hidden_layers": (0,),
    "model.num_attention_heads": (0,),
    "model.num_key_value_heads": (0,),
    "model.head_dim": (0,),
    "model.rope_theta": (0.0,),
    "model.max_position_embeddings": (0,),
    "model.total_ut_steps": (0,),
    "data.sources.0.weight": (-1.0,),
    "data.seq_len": (1,),
    "data.num_workers": (-1,),
    "data.prefetch_factor": (0,),
    "data.seed": (-1,),
    "data.shuffle_window": (0,),
    "data.window_tokens": (0,),
    "data.tokenize_once_mb": (-1.0,),
    "data.max_document_chars": (0,),
    "data.max_retries": (0,),
    "data.retry_backoff_s": (-1.0,),
    "optim.lr": (0.0,),
    "optim.betas.0": (1.0,),
    "optim.betas.1": (-0.1,),
    "optim.weight_decay": (-1.0,),
    "optim.eps": (0.0,),
    "optim.grad_clip": (-1.0,),
    "schedule.warmup_steps": (-1,),
    "schedule.decay_fraction": (1.5,),
    "schedule.min_lr_ratio": (-0.1,),
    "deepspeed.zero_stage": (4,),
    "deepspeed.sequence_parallel_size": (0,),
    "deepspeed.reduce_bucket_size": (0,),
    "deepspeed.stage3_prefetch_bucket_size": (0,),
    "train.global_batch_tokens": (0,),
    "train.micro_batch_size": (0,),
    "train.max_steps": (0,),
    "train.num_recurrent_steps": (0,),
    "train.beta": (-1.0,),
    "train.beta_final": (-1.0,),
    "train.prior_param": (1.5, {"train.prior": "geometric", "train.regularizer": "kl"}),
    "train.log_every": (0,),
    "checkpoint.every_steps": (0,),
    "checkpoint.keep_last": (0,),
    "stability.window": (1,),
    "stability.min_history": (0,),
    "stability.z_threshold": (0.0,),
    "stability.ratio_threshold": (1.0,),
    "stability.min_rise": (-0.1,),
    "stability.grad_norm_min_rise": (-0.5,),
    "stability.grad_norm_z_threshold": (-1.0,),
    "stability.grad_norm_ratio_threshold": (0.5,),
    "stability.rollback_after": (-1,),
    "stability.rollback_within": (0,),
    "stability.max_rollbacks": (-1,),
    "stability.lr_factor": (1.5,),
    "stability.lr_factor_steps": (-1,),
    "stability.grad_norm_patience": (-1,),
    "stability.max_consecutive_skips": (0,),
    "faults.spike_factor": (0.0,),
    "faults.checkpoint_fault_at_step": (0,),
    "faults.checkpoint_fault_rank": (5,),
    "faults.pause_after_step": (0,),
    "eval.every_steps": (0,),
    "eval.tasks.0.num_items": (0,),
    "eval.num_items": (0,),
    "eval.extra_steps": (-1,),
    "eval.thresholds.0": (1.5,),
    "eval.batch_size": (0,),
    "curriculum.stages.0.tokens": (0,),
    "curriculum.stages.0.weights.python_stdlib": (-1.0,),
    "curriculum.stages.0.seq_len": (1,),
    "curriculum.stages.0.global_batch_tokens": (0,),
    "curriculum.stages.0.batch_ramp_from": (0,),
    "curriculum.stages.0.batch_ramp_tokens": (-1,),
    "curriculum.stages.0.lr": (0.0,),
    "curriculum.stages.0.lr_final": (-1.0,),
    "curriculum.stages.0.warmup_tokens": (-1,),
    "curriculum.stages.0.beta": (-1.0,),
    "curriculum.stages.0.beta_final": (-1.0,),
    "curriculum.stages.0.num_recurrent_steps": (0,),
    "curriculum.stages.0.rope_theta": (0.0,),
    "sft.epochs": (0.0,),
    "sft.dataset_tokens": (0,),
    "stage2.k": (0.0,),
    "stage2.gamma": (-1.0,),
}

JOBS = {
    "pretrain": (config_problems, "pretrain", ["experiment=tiny_ouro_1.4b"]),
    "sft": (sft_problems, "sft", ["experiment=tiny_thinking_sft"]),
    "gate_tuning": (gate_tuning_problems, "gate_tuning", []),
}


def job_config(job: str, source: str):
    _, name, overrides = JOBS[job]
    if name == "pretrain":
        return to_object(composed(*overrides))
    overrides = ["run_dir=/tmp/unused", f"init_from={source}", *overrides]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return to_object(compose(name, overrides=overrides))


def numeric_fields(cfg) -> list[str]:
    """Numeric (or unset numeric) leaves, list items as index 0 only."""
    keys = []
    for key, value in flatten(asdict(cfg)).items():
        if isinstance(value, bool) or not (value is None or isinstance(value, int | float)):
            continue
        if re.search(r"\.[1-9]\d*(\.|$)", key) or key.startswith("curriculum.stages.0.weights."):
            if key != "curriculum.stages.0.weights.python_stdlib":
                continue
        keys.append(key)
    return keys


def set_field(cfg, key: str, value) -> None:
    *path, last = key.split(".")
    node = cfg
    for part in path:
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    if isinstance(node, dict):
        node[last] = value
    elif last.isdigit():
        node[int(last)] = value
    else:
        setattr(node, last, value)


NOT_NUMBERS = {
    "init_from",
    "export_dir",
    "export_dtype",
    "model.tie_word_embeddings",
    "eval.tasks.0.path",
    "curriculum.stages.0.trainable",
}
"""Leaves left unset (None) that hold something other than a number."""


@pytest.mark.parametrize("job", sorted(JOBS))
def test_every_numeric_setting_has_a_value_it_refuses(job, tmp_path):
    LoopLMConfig.from_preset("tiny").save(tmp_path / "config.json")  # a source model
    cfg = job_config(job, str(tmp_path))
    problems, _, _ = JOBS[job]
    baseline = problems(cfg, 2)
    assert baseline == [], baseline
    unlisted, accepted = [], []
    for key in numeric_fields(cfg):
        if key in NOT_NUMBERS:
            continue
        if key not in BAD:
            unlisted.append(key)
            continue
        value, *extra = BAD[key]
        bad = copy.deepcopy(cfg)
        for other, setting in (extra[0] if extra else {}).items():
            set_field(bad, other, setting)
        set_field(bad, key, value)
        found = problems(bad, 2)
        parts = [part for part in key.split(".") if not part.isdigit()]
        leaf = "weights" if "weights" in parts else parts[-1]
        if not any(leaf in problem for problem in found):
            accepted.append(f"{key}={value!r} ({found})")
    assert unlisted == [], f"numeric settings with no refused value in BAD: {unlisted}"
    assert accepted == [], "bad values accepted:\n" + "\n".join(accepted)
