"""The curriculum's plan: stage boundaries in tokens, batch ramps, LR and beta segments, the
shipped recipe configs, and bad stage lists."""

import math

import pytest
from hydra import compose, initialize_config_dir

from train.config import _model_config, build_curriculum, config_problems, register_configs
from train.config import to_object as config_object
from train.curriculum import Curriculum, StageSettings, stage_problems, trainable_mask
from train.trainer import CONFIG_DIR

BASE = {
    "seq_len": 64,
    "global_batch_tokens": 1024,
    "lr": 1e-3,
    "beta": 0.1,
    "num_recurrent_steps": 4,
    "rope_theta": 10000.0,
}
MICRO, DP = 2, 2  # one micro-batch on every rank: 2 x 64 x 2 = 256 tokens


def curriculum(*stages: StageSettings) -> Curriculum:
    return Curriculum.resolve(list(stages), BASE, MICRO, DP)


def walk(c: Curriculum) -> list:
    """Every step's plan, from the first token to the last."""
    tokens, plans = 0, []
    while tokens < c.total_tokens:
        plans.append(c.plan(tokens))
        tokens += plans[-1].tokens
    return plans


def test_settings_carry_over_and_lr_and_beta_continue_where_the_stage_before_ended():
    c = curriculum(
        StageSettings(name="a", tokens=4096, lr=2e-3, lr_final=1e-3, lr_schedule="linear"),
        StageSettings(name="b", tokens=4096, seq_len=128, num_recurrent_steps=2, beta=0.05),
        StageSettings(name="c", tokens=4096, rope_theta=1e6, lr_final=1e-4, lr_schedule="cosine"),
    )
    a, b, s = c.stages
    assert (a.seq_len, a.num_recurrent_steps, a.lr, a.beta) == (64, 4, 2e-3, 0.1)
    assert (b.seq_len, b.num_recurrent_steps, b.lr, b.lr_final, b.beta) == (
        128,
        2,
        1e-3,
        1e-3,
        0.05,
    )
    assert (s.seq_len, s.num_recurrent_steps, s.rope_theta, s.lr, s.beta) == (
        128,
        2,
        1e6,
        1e-3,
        0.05,
    )
    assert (a.start, a.end, b.start, b.end, s.end) == (0, 4096, 4096, 8192, 12288)


def test_stages_end_at_their_budget_or_the_next_whole_micro_batch_on_every_rank():
    # 1000 tokens is not a multiple of 256: the stage runs to 1024; the second stage's 512
    # tokens at seq_len 128 (512 per pass) end exactly.
    c = curriculum(
        StageSettings(name="a", tokens=1000, global_batch_tokens=768),
        StageSettings(name="b", tokens=512, seq_len=128, global_batch_tokens=1024),
    )
    assert [(s.start, s.end) for s in c.stages] == [(0, 1024), (1024, 1536)]
    plans = walk(c)
    # stage a: 768 + 256 (the last step takes only the micro-batch left); stage b: 512.
    assert [(p.stage.name, p.tokens, p.accumulation) for p in plans] == [
        ("a", 768, 3),
        ("a", 256, 1),
        ("b", 512, 1),
    ]
    assert c.total_steps() == len(plans)


def test_a_batch_ramp_grows_linearly_in_whole_micro_batches():
    c = curriculum(
        StageSettings(
            name="a",
            tokens=16384,
            batch_ramp_from=256,
            global_batch_tokens=2048,
            batch_ramp_tokens=4096,
        )
    )
    plans = walk(c)
    tokens, expected = 0, []
    for plan in plans:
        target = 2048 if tokens >= 4096 else 256 + (2048 - 256) * tokens / 4096
        expected.append(min(int(target // 256) * 256, c.total_tokens - tokens))
        tokens += plan.tokens
    assert [p.tokens for p in plans] == expected
    assert expected[0] == 256 and max(expected) == expected[-2] == 2048
    body = expected[:-1]  # the last step takes what is left of the stage
    assert all(x <= y for x, y in zip(body, body[1:], strict=False))
    assert sum(expected) == 16384 and c.total_steps() == len(plans)


def test_lr_warms_up_then_follows_its_segment_and_beta_anneals():
    c = curriculum(
        StageSettings(
            name="a",
            tokens=25600,
            warmup_tokens=2560,
            lr=1e-3,
            lr_final=1e-4,
            lr_schedule="cosine",
            beta=0.2,
            beta_final=0.0,
            beta_schedule="linear",
            global_batch_tokens=256,
        )
    )
    plans = walk(c)
    assert len(plans) == 100
    for index, plan in enumerate(plans):
        into = index * 256
        if into < 2560:
            expected = 1e-3 * (into + 256) / 2560
        else:
            progress = (into - 2560) / (25600 - 2560)
            expected = 1e-4 + (1e-3 - 1e-4) * 0.5 * (1 + math.cos(math.pi * progress))
        assert plan.lr == pytest.approx(expected, rel=1e-12)
        assert plan.beta == pytest.approx(0.2 * (1 - into / 25600), abs=1e-12)
    assert plans[9].lr == pytest.approx(1e-3) and plans[-1].lr > 1e-4


def test_the_plan_past_the_last_stage_is_an_error():
    c = curriculum(StageSettings(name="a", tokens=256))
    assert c.stage_at(256) is None
    with pytest.raises(ValueError, match="ends at 256 tokens"):
        c.plan(256)


def test_trainable_patterns_select_parameters():
    names = ["model.layers.0.mlp.up_proj.weight", "model.early_exit_gate.weight", "lm_head.weight"]
    assert trainable_mask(names, None) == [True, True, True]
    assert trainable_mask(names, ("model.early_exit_gate.*",)) == [False, True, False]


@pytest.mark.parametrize(
    "stage, message",
    [
        ({"tokens": 0}, "tokens must be >= 1"),
        ({"seq_len": 4096}, "seq_len 4096 must lie in [2, 2048]"),
        ({"global_batch_tokens": 300}, "global_batch_tokens (300) must be a positive multiple"),
        ({"batch_ramp_from": 100, "batch_ramp_tokens": 512}, "batch_ramp_from (100)"),
        ({"warmup_tokens": 5000}, "warmup_tokens (5000) must be below tokens"),
        ({"lr": -1.0}, "lr must be > 0"),
        ({"beta_final": -0.1}, "beta and beta_final must be >= 0"),
        ({"lr_schedule": "wsd"}, "lr_schedule must be one of"),
        ({"num_recurrent_steps": 0}, "num_recurrent_steps must be >= 1"),
        ({"rope_theta": 0.0}, "rope_theta must be > 0"),
        ({"weights": {"web": 1.0}}, "weights name unknown sources ['web']"),
        ({"weights": {"code": 0.0}}, "weights must be >= 0 with a positive sum"),
        ({"trainable": ["model.nothing.*"]}, "trainable pattern 'model.nothing.*' matches no"),
    ],
)
def test_bad_stages_are_reported(stage, message):
    settings = [StageSettings(**{"name": "a", "tokens": 4096, **stage})]
    problems = stage_problems(
        settings,
        micro_batch_size=MICRO,
        dp_size=DP,
        base=BASE,
        sources=["code"],
        max_positions=2048,
        parameter_names=["model.early_exit_gate.weight", "lm_head.weight"],
    )
    assert any(message in p for p in problems), problems


def test_duplicate_stage_names_are_reported():
    settings = [StageSettings(name="a", tokens=256), StageSettings(name="a", tokens=256)]
    problems = stage_problems(
        settings,
        micro_batch_size=MICRO,
        dp_size=DP,
        base=BASE,
        sources=[],
        max_positions=None,
        parameter_names=None,
    )
    assert any("stage names must be unique" in p for p in problems)


def composed(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return config_object(compose("pretrain", overrides=["run_dir=/tmp/unused", *overrides]))


def test_the_ouro_recipe_config_is_the_papers_plan():
    cfg = composed("experiment=ouro_1.4b")
    assert config_problems(cfg, world_size=128) == []
    model_cfg, _ = _model_config(cfg)
    c = build_curriculum(cfg, model_cfg, 128)
    table = [
        (s.name, s.seq_len, s.num_recurrent_steps, s.beta, s.rope_theta, s.lr, s.lr_final)
        for s in c.stages
    ]
    assert table == [
        ("stable_1a", 4096, 8, 0.1, 1e4, 3e-4, 3e-4),
        ("stable_1b", 4096, 4, 0.05, 1e4, 3e-4, 3e-4),
        ("ct_annealing", 16384, 4, 0.05, 4e4, 3e-4, 3e-5),
        ("long_ct", 65536, 4, 0.05, 1e6, 3e-5, 3e-5),
        ("mid_training", 32768, 4, 0.05, 1e6, 3e-5, 1e-5),
    ]
    budgets = [3e12, 3e12, 1.4e12, 20e9, 300e9]
    for stage, budget in zip(c.stages, budgets, strict=True):
        unit = stage.seq_len * 128  # micro batch 1 on 128 ranks
        assert budget <= stage.end - stage.start < budget + unit
    first = c.stages[0]
    assert (first.batch_ramp_from, first.global_batch_tokens) == (4 * 2**20, 8 * 2**20)
    assert c.plan(0).tokens == 4 * 2**20 and c.plan(first.end).tokens == 8 * 2**20
    # 64K sequences on 256 ranks cannot make an 8M-token batch: said before anything starts.
    assert any("long_ct" in p and "multiple" in p for p in config_problems(cfg, 256))


@pytest.mark.parametrize(
    "experiment", ["ouro_2.6b", "tiny_ouro_1.4b", "tiny_ouro_2.6b", "long_context"]
)
def test_the_recipe_twins_compose_and_validate(experiment):
    overrides = [f"experiment={experiment}"]
    if "2.6b" in experiment or experiment == "long_context":  # the checkpoint to start from
        assert "init_from is required" in " ".join(config_problems(composed(*overrides), 2))
        overrides.append("init_required=false")
        if experiment == "long_context":  # the architecture init_from would bring
            overrides.append("model=ouro_1.4b")
        if experiment == "tiny_ouro_2.6b":
            overrides.append("model.num_hidden_layers=4")
    cfg = composed(*overrides)
    world = 2 if experiment.startswith("tiny") else 128
    assert config_problems(cfg, world_size=world) == []
    model_cfg, _ = _model_config(cfg)
    names = [s.name for s in build_curriculum(cfg, model_cfg, world).stages]
    if experiment == "long_context":  # 64K tokens, split over 8 ranks, 16 groups
        assert names == ["long_16k", "long_64k"] and cfg.deepspeed.sequence_parallel_size == 8
        assert build_curriculum(cfg, model_cfg, world).stages[-1].seq_len == 65536
        return
    assert names[-3:] == ["ct_annealing", "long_ct", "mid_training"]
    assert names[0] == ("stable_1a" if "1.4b" in experiment else "stable_1b")
