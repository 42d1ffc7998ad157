"""Every shipped config composes; bad configs fail before any process group starts."""

import functools
import importlib
import logging
import math
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from tests.conftest import OURO_TINY
from train.config import (
    _model_config,
    build_curriculum,
    config_problems,
    config_warnings,
    register_configs,
    to_object,
    validate,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
register_configs()


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return compose("pretrain", overrides=["run_dir=/tmp/unused", *overrides])


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


GROUPS = ("model", "data", "optim", "schedule", "deepspeed", "logging", "stability", "curriculum")
GROUPS += ("eval",)


@functools.cache
def experiment_choices() -> dict[str, dict[str, str]]:
    """Each shipped experiment's choice in each config group, composed on its job's config."""
    importlib.import_module("train.sft")  # registers the SFT job's schema
    choices = {}
    for name in group_options("experiment"):
        config = "sft" if "sft" in name else "pretrain"
        with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
            cfg = compose(config, [f"experiment={name}"], return_hydra_config=True)
        choices[name] = dict(cfg.hydra.runtime.choices)
    return choices


def checked_experiments() -> set[str]:
    """The experiments named in a documented command whose job checks a test runs: the README's
    commands, and the `torchrun` and `python -m launch` lines of the configs and modules."""
    from tests.unit.test_launch import documented_launch_commands
    from tests.unit.test_readme_commands import documented_job_commands, readme_commands

    commands = [w for _, w in documented_launch_commands() + documented_job_commands()]
    words = [word for command in commands + readme_commands() for word in command]
    return {word.split("=", 1)[1] for word in words if word.startswith("experiment=")}


def test_every_experiment_has_a_documented_command_whose_checks_pass():
    assert set(group_options("experiment")) <= checked_experiments()


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in group_options(g)])
def test_every_shipped_option_passes_the_real_checks(group, option):
    """On the pre-training job's defaults at 2 ranks; an option made for a larger setting (a
    4K-token mixture, a 64K curriculum) passes them inside the experiment that chooses it,
    whose documented command is checked (above). Only placeholders for the user's files may
    remain (``/data/...``)."""
    from tests.unit.test_launch import USER_FILES

    cfg = to_object(composed(f"{group}={option}"))
    problems = [p for p in config_problems(cfg, world_size=2) if not USER_FILES.search(p)]
    if problems:
        chosen_by = [e for e, c in experiment_choices().items() if c.get(group) == option]
        assert chosen_by, f"{group}={option}: {problems}"


def test_the_main_job_config_is_valid_for_two_ranks():
    cfg = to_object(composed("experiment=tiny_cpu"))
    assert config_problems(cfg, world_size=2) == []
    assert (cfg.model.preset, cfg.deepspeed.zero_stage, cfg.data.seq_len) == ("tiny", 2, 256)


@pytest.mark.parametrize("zero", ["zero1", "zero2", "zero3"])
def test_the_gradient_bucket_is_never_larger_than_the_model(zero):
    from train.engine import deepspeed_config

    cfg = to_object(composed("experiment=tiny_cpu", f"deepspeed={zero}"))
    setting = cfg.deepspeed.reduce_bucket_size
    bucket = {
        params: deepspeed_config(cfg, 1, "bf16", params=params)["zero_optimization"][
            "reduce_bucket_size"
        ]
        for params in (1_122_945, setting, 3 * setting)
    }
    assert bucket == {1_122_945: 1_122_945, setting: setting, 3 * setting: setting}
    smaller = to_object(composed("experiment=tiny_cpu", "deepspeed.reduce_bucket_size=1000"))
    assert (
        deepspeed_config(smaller, 1, "bf16", params=10**6)["zero_optimization"][
            "reduce_bucket_size"
        ]
        == 1000
    )


def test_unknown_keys_and_wrong_types_fail_at_compose_time():
    with pytest.raises(ConfigCompositionException):
        composed("train.max_stepz=3")
    with pytest.raises((ValidationError, ConfigCompositionException)):
        composed("train.max_steps=many")
    with pytest.raises(ConfigCompositionException):
        composed("deepspeed=zero4")


BAD = [
    (
        ["train.global_batch_tokens=1000"],
        "must be a positive multiple of micro_batch_size x seq_len",
    ),
    (["deepspeed=zero1", "deepspeed.offload_optimizer=cpu"], "needs ZeRO stage 2 or 3"),
    (["deepspeed.offload_param=cpu"], "offload_param=cpu needs ZeRO stage 3"),
    (
        ["data.seq_len=4096", "train.global_batch_tokens=32768"],
        "exceeds the model's max_position_embeddings",
    ),
    (["model.num_key_value_heads=3"], "not divisible by num_key_value_heads"),
    (["model.preset=ouro-7b"], "model.preset 'ouro-7b' is unknown"),
    (["train.prior=poisson"], "train.prior must be one of"),
    (["schedule.kind=linear"], "schedule.kind must be one of"),
    (["optim.betas=[0.9]"], "optim.betas must be two numbers"),
    (["deepspeed.precision=fp8"], "deepspeed.precision"),
    (["init_from=/nonexistent/ouro"], "init_from: no Ouro-format directory"),
    (["train.max_steps=0"], "train.max_steps must be >= 1"),
    (["model.vocab_size=4096"], "has 8192 tokens, more than the model's vocab_size (4096)"),
    ([f"init_from={OURO_TINY}"], "more than the model's vocab_size (384)"),
    (["train.max_steps=null"], "train.max_steps is needed when the run has no curriculum"),
    (["deepspeed.sequence_parallel_size=3"], "sequence_parallel_size (3) must divide the number"),
    (
        [
            "deepspeed.sequence_parallel_size=2",
            "model.num_attention_heads=2",
            "model.num_key_value_heads=1",
        ],
        "must divide the attention heads (2) and key/value heads (1)",
    ),
    (
        [
            "deepspeed.sequence_parallel_size=2",
            "data.seq_len=255",
            "train.global_batch_tokens=2040",
        ],
        "every seq_len ([255]) must divide by sequence_parallel_size (2)",
    ),
    (
        ["deepspeed.sequence_parallel_size=2", "train.global_batch_tokens=1536"],
        "micro_batch_size x seq_len x data-parallel size (4 x 256 x 1 = 1024)",
    ),
    (["faults.checkpoint_fault_moment=after_rename"], "checkpoint_fault_moment must be one of"),
    (["faults.checkpoint_fault_action=stop"], "checkpoint_fault_action must be one of"),
    (["faults.checkpoint_fault_rank=2"], "checkpoint_fault_rank must lie in [0, 2)"),
    (
        ["faults.checkpoint_fault_moment=before_rename", "faults.checkpoint_fault_rank=1"],
        "happens on rank 0 only",
    ),
    (["faults.pause_after_step=0"], "faults.pause_after_step must be >= 1"),
    (["optim.eps=0"], "optim.eps must be > 0"),
    (["optim.weight_decay=-5"], "optim.weight_decay must be >= 0, got -5"),
    (["optim.grad_clip=-1"], "optim.grad_clip must be >= 0"),
    (["train.log_every=0"], "train.log_every must be >= 1"),
    (
        ["train.prior=geometric", "train.regularizer=kl", "train.prior_param=1.5"],
        "train.prior_param must lie in (0, 1)",
    ),
    (["train.prior=geometric"], "train.prior=geometric needs train.regularizer=kl"),
    (["train.objective=first_step"], "train.objective must be stage1 or last_step"),
    (["stability.max_consecutive_skips=0"], "stability.max_consecutive_skips must be >= 1"),
    (["deepspeed.zero_stage=0"], "deepspeed.zero_stage=0 is not supported"),
    (["deepspeed.zero_stage=4"], "deepspeed.zero_stage must be 1, 2 or 3, got 4"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD)
def test_bad_configs_are_reported_before_anything_starts(overrides, message):
    cfg = to_object(composed("experiment=tiny_cpu", *overrides))
    with pytest.raises(ValueError, match="invalid training config") as err:
        validate(cfg, world_size=2)
    assert message in str(err.value)


def test_every_problem_is_reported_at_once():
    chosen = [BAD[i] for i in (0, 2, 4, 6, 7)]
    cfg = to_object(
        composed("experiment=tiny_cpu", *[o for overrides, _ in chosen for o in overrides])
    )
    problems = "\n".join(config_problems(cfg, world_size=2))
    assert all(message in problems for _, message in chosen)


def run_plans(*overrides: str, world_size: int = 1) -> list:
    """Every step's plan of a run without curriculum stages (the tiny model, 64-token
    sequences, one micro-batch of 4 per rank: 256 tokens a pass)."""
    cfg = to_object(
        composed(
            "model=tiny",
            "data.seq_len=64",
            "train.micro_batch_size=4",
            "train.global_batch_tokens=1024",
            *overrides,
        )
    )
    model_cfg, problems = _model_config(cfg)
    assert not problems, problems
    curriculum = build_curriculum(cfg, model_cfg, world_size)
    assert [s.name for s in curriculum.stages] == ["main"] and not curriculum.configured
    plans, tokens = [], 0
    while tokens < curriculum.total_tokens:
        plans.append(curriculum.plan(tokens))
        tokens += plans[-1].tokens
    assert len(plans) == cfg.train.max_steps == curriculum.total_steps()
    return plans


def step_lr(step: int, peak: float, total: int, kind: str, warmup: int, decay: float) -> float:
    """The schedules written per optimizer step (0-based), as a reference."""
    final = 0.1 * peak
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    if kind == "constant":
        return peak
    if kind == "cosine":
        progress = (step - warmup) / max(total - warmup, 1)
        return final + (peak - final) * 0.5 * (1.0 + math.cos(math.pi * progress))
    decay_steps = round(total * decay)
    if step < total - decay_steps or decay_steps == 0:
        return peak
    return peak + (final - peak) * min((step - (total - decay_steps) + 1) / decay_steps, 1.0)


@pytest.mark.parametrize("kind", ["wsd", "cosine", "constant"])
@pytest.mark.parametrize("world_size", [1, 2])
def test_schedules_warm_up_linearly_and_end_where_configured(kind, world_size):
    plans = run_plans(
        f"schedule={kind}",
        "schedule.warmup_steps=10",
        "schedule.min_lr_ratio=0.1",
        "optim.lr=3e-3",
        "train.max_steps=100",
        world_size=world_size,
    )
    lrs = [plan.lr for plan in plans]
    assert all(plan.tokens == 1024 for plan in plans)
    assert all(plan.accumulation == 4 // world_size for plan in plans)
    # bit for bit the per-step formulas: 1024 tokens a step, a power of two
    assert lrs == [step_lr(s, 3e-3, 100, kind, 10, 0.2) for s in range(100)]
    assert lrs[:10] == pytest.approx([3e-3 * (i + 1) / 10 for i in range(10)])
    assert max(lrs) == pytest.approx(3e-3)
    final = {"wsd": 3e-4, "cosine": 3e-4, "constant": 3e-3}[kind]
    assert lrs[-1] == pytest.approx(final, rel=0.01)
    if kind == "wsd":
        assert lrs[10:80] == [3e-3] * 70 and lrs[80] < 3e-3


def test_a_batch_of_other_than_a_power_of_two_tokens_keeps_the_schedule_to_rounding():
    plans = run_plans(
        "schedule=cosine",
        "schedule.warmup_steps=7",
        "train.global_batch_tokens=768",
        "train.micro_batch_size=4",
        "data.seq_len=64",
        "train.max_steps=50",
        "optim.lr=1e-3",
    )
    expected = [step_lr(s, 1e-3, 50, "cosine", 7, 0.2) for s in range(50)]
    assert [plan.lr for plan in plans] == pytest.approx(expected, rel=1e-14, abs=0)


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
def test_beta_schedules_anneal_from_beta_to_beta_final(kind):
    plans = run_plans(
        "train.beta=0.1",
        "train.beta_final=0.05",
        f"train.beta_schedule={kind}",
        "train.max_steps=100",
    )
    betas = [plan.beta for plan in plans]
    # a function of the tokens consumed before the step: step / 100 of the way
    assert betas[0] == pytest.approx(0.1)
    assert betas[-1] == pytest.approx(0.1 if kind == "constant" else 0.05, abs=0.0011)
    if kind == "linear":
        assert betas[50] == pytest.approx(0.075)
    if kind == "cosine":
        assert betas[25] == pytest.approx(0.05 + 0.05 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert all(a >= b for a, b in zip(betas, betas[1:], strict=False))


def test_a_warmup_longer_than_the_run_is_a_warning(caplog):
    cfg = to_object(composed("experiment=tiny_cpu", "schedule.warmup_steps=400"))
    with caplog.at_level(logging.WARNING):
        validate(cfg, world_size=2, warn=False)  # another rank than the first: silent
    assert caplog.text == ""
    with caplog.at_level(logging.WARNING):
        validate(cfg, world_size=2)
    assert "schedule.warmup_steps (400) is longer than the run (train.max_steps=300)" in caplog.text


def test_a_model_vocabulary_much_larger_than_the_tokenizer_is_a_warning(tmp_path):
    from tokenizers import Tokenizer, models

    from data_pipelines.tokenizer import SPECIAL_TOKENS

    vocab = {token: index for index, token in enumerate([*SPECIAL_TOKENS, "a", "b"])}
    small = Tokenizer(models.WordLevel(vocab, unk_token="a"))
    small.add_special_tokens(list(SPECIAL_TOKENS))
    small.save(str(tmp_path / "tok.json"))
    cfg = to_object(composed("experiment=tiny_cpu", f"data.tokenizer={tmp_path / 'tok.json'}"))
    (warning,) = [w for w in config_warnings(cfg) if "vocab_size" in w]
    assert "vocab_size (8192) is much larger than the tokenizer's vocabulary (5 tokens" in warning
    assert not [
        w for w in config_warnings(to_object(composed("experiment=tiny_cpu"))) if "vocab" in w
    ]


def test_a_missing_local_init_from_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    """`runs/tiyn` has the shape of a hub id (ORG/NAME); with a folder `runs/` here it is a
    mistyped local path, reported before the run starts instead of failing at the download."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    problems = config_problems(to_object(composed("init_from=runs/tiyn")), world_size=1)
    assert "init_from: no Ouro-format directory at runs/tiyn (runs/ is a folder here" in (
        "\n".join(problems)
    )
    hub = config_problems(to_object(composed("init_from=ByteDance/Ouro-1.4B")), world_size=1)
    assert not [p for p in hub if p.startswith("init_from")]


def test_kernel_settings_are_checked_before_the_run():
    unknown = config_problems(to_object(composed("model.kernels=fast")), world_size=1)
    assert "model.kernels: unknown kernels 'fast'; choose one of ('torch', 'liger')" in unknown
    # The launch host need not have the GPU the ranks have: a rank checks CUDA and the package.
    liger = config_problems(to_object(composed("model.kernels=liger")), world_size=1)
    assert not [p for p in liger if "kernels" in p]
    both = config_problems(
        to_object(composed("model.kernels=liger", "model.compile=true")), world_size=1
    )
    assert [p for p in both if "kernels" in p] == [
        "model.compile=true fuses RMSNorm, SwiGLU and RoPE itself: use it with "
        "model.kernels=torch (got liger)"
    ]


def test_a_rank_without_a_gpu_of_its_own_is_named_before_the_process_group(monkeypatch):
    from train.trainer import device_problem

    assert device_problem(0, 0) is None and device_problem(5, 0) is None  # CPU ranks
    assert device_problem(0, 1) is None and device_problem(7, 8) is None
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert device_problem(1, 1) == (
        "local rank 1 has no GPU of its own: 1 GPU visible on this machine; "
        "start at most one rank per GPU (torchrun --nproc_per_node 1)"
    )
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert "2 GPUs visible on this machine (CUDA_VISIBLE_DEVICES=2,3)" in device_problem(2, 2)


def test_the_console_names_the_ranks_and_backend_of_a_job():
    from train.trainer import devices

    assert devices(2, "gloo") == "2 CPU ranks, gloo"
    assert devices(1, "nccl") == "1 GPU rank, nccl"
    assert devices(8, "nccl") == "8 GPU ranks, nccl"
