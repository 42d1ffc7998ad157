"""The reproduction driver's grid, its job settings and its report (the training runs
themselves are exercised in tests/distributed/test_reproduce.py)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from data_pipelines import synthetic
from looplm import LoopLMForCausalLM
from tests.unit.test_readme_commands import load_script
from train.config import config_problems
from train.engine import build_model
from train.trainer import CONFIG_DIR

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("reproduce", REPO / "scripts" / "reproduce.py")
reproduce = importlib.util.module_from_spec(spec)
sys.modules["reproduce"] = reproduce  # its dataclasses look their module up
spec.loader.exec_module(reproduce)


@pytest.fixture(autouse=True)
def no_gpu(monkeypatch):
    """The driver's jobs as on a machine without GPUs (2 CPU ranks), also where there are."""
    import launch.commands

    monkeypatch.setattr(launch.commands, "visible_gpus", lambda: 0)


def test_the_grid_pairs_every_looped_model_with_its_baselines():
    scale = reproduce.FULL
    models = reproduce.grid(scale, ["mano", "phop"])
    for model in models:
        assert model.layers * model.loops == (scale.depth if model.loops > 1 else model.layers)
    per_seed = 1 + 3 * len(scale.blocks)  # iso_flop once, then 3 families per block size
    assert len(models) == 2 * len(scale.seeds) * per_seed
    assert len({m.name for m in models}) == len(models)
    looped = {(m.task, m.layers, m.seed) for m in models if m.family == "looped"}
    assert looped == {(m.task, m.layers, m.seed) for m in models if m.family == "iso_param"}
    assert {(m.layers, m.loops) for m in models if m.family == "iso_flop"} == {(scale.depth, 1)}
    only = reproduce.grid(scale, ["mano"], ["looped"])
    assert {m.family for m in only} == {"looped"} and {m.task for m in only} == {"mano"}


def test_set_changes_one_field_of_the_scale_and_refuses_what_does_not_fit():
    scale = reproduce.with_setting(reproduce.QUICK, "blocks=1,3")
    scale = reproduce.with_setting(scale, "lr=1e-3")
    scale = reproduce.with_setting(scale, "steps=1e3")
    assert (scale.blocks, scale.lr, scale.steps) == ((1, 3), 1e-3, 1000)
    assert reproduce.with_setting(scale, "depth=6").depth == 6
    assert reproduce.with_setting(scale, "stability=default").stability == "default"
    models = reproduce.grid(reproduce.with_setting(scale, "depth=3"), ["phop"])
    assert {(m.layers, m.loops) for m in models if m.family == "looped"} == {(1, 3)}
    assert len(models) == 2 * (1 + 3 * 2) - 2 * 3  # k=3 of depth 3 loops once: no looped trio
    for bad in ("widht=3", "tasks=x"):
        with pytest.raises(SystemExit):
            reproduce.with_setting(reproduce.QUICK, bad)
    with pytest.raises(SystemExit, match="precision is one of bf16, fp32, auto"):
        reproduce.with_setting(reproduce.QUICK, "precision=fp16")
    with pytest.raises(SystemExit, match="stability is one of default, off"):
        reproduce.with_setting(reproduce.QUICK, "stability=none")
    reproduce.check_blocks(reproduce.with_setting(scale, "depth=3"))
    for bad in ("blocks=4", "blocks=0"):
        with pytest.raises(SystemExit, match="must each divide the depth 3"):
            reproduce.check_blocks(reproduce.with_setting(reproduce.QUICK, bad))


def test_the_quick_grid_compiles_its_layers_and_reads_its_data_in_the_ranks(tmp_path):
    """The quick grid's jobs: compiled layers and no data worker (--set turns either back);
    the full grid's as the job's defaults."""
    (model,) = reproduce.grid(reproduce.QUICK, ["mano"], ["looped"])[:1]

    def overrides(scale) -> list[str]:
        return reproduce.job_overrides(model, scale, "embedded", tmp_path / "run", tmp_path)

    quick = overrides(reproduce.QUICK)
    assert "model.compile=true" in quick and "data.num_workers=0" in quick
    scale = reproduce.with_setting(reproduce.QUICK, "compile=False")
    eager = overrides(reproduce.with_setting(scale, "workers=1"))
    assert "data.num_workers=1" in eager
    assert [o for o in quick if o not in eager] == ["data.num_workers=0", "model.compile=true"]
    full = overrides(reproduce.FULL)
    assert "data.num_workers=1" in full and not any(o.startswith("model.compile") for o in full)
    assert reproduce.with_setting(scale, "compile=true").compile is True
    with pytest.raises(SystemExit, match="--set compile=yes: compile is true or false"):
        reproduce.with_setting(reproduce.QUICK, "compile=yes")
    with pytest.raises(SystemExit, match="--set workers=-1: workers must be >= 0"):
        reproduce.with_setting(reproduce.QUICK, "workers=-1")


def test_a_task_may_train_for_its_own_number_of_steps_and_steps_sets_every_task(tmp_path, capsys):
    scale = reproduce.replace(reproduce.QUICK, task_steps={"mano": 700})
    assert (scale.steps_of("mano"), scale.steps_of("phop")) == (700, scale.steps)
    assert reproduce.QUICK.steps_of("mano") == reproduce.QUICK.steps_of("phop") == 3000
    mano_model, phop_model = (reproduce.grid(scale, [t], ["looped"])[0] for t in ("mano", "phop"))
    assert reproduce.train_tokens(mano_model, scale) == 700 * scale.batch_tokens
    assert reproduce.train_tokens(phop_model, scale) == scale.steps * scale.batch_tokens

    def job(task, scale):
        (model,) = reproduce.grid(scale, [task], ["iso_param"])[:1]
        overrides = reproduce.job_overrides(model, scale, tmp_path / "t.json", tmp_path, tmp_path)
        return {o.split("=")[0]: o.split("=", 1)[1] for o in overrides if o.count("=") == 1}

    mano, phop = job("mano", scale), job("phop", scale)
    assert (mano["train.max_steps"], mano["eval.every_steps"], mano["checkpoint.every_steps"]) == (
        "700", "175", "700"
    )  # fmt: skip
    assert phop["train.max_steps"] == str(scale.steps) != "700"
    assert phop["deepspeed.precision"] == "auto"
    assert (
        job("phop", reproduce.with_setting(scale, "precision=fp32"))["deepspeed.precision"]
        == "fp32"
    )
    assert (mano["train.log_every"], phop["train.log_every"]) == ("70", str(scale.steps // 10))
    assert reproduce.with_setting(scale, "steps=50").steps_of("mano") == 50  # as --steps
    with pytest.raises(SystemExit, match="--steps the steps"):
        reproduce.with_setting(scale, "task_steps=3")
    for extra, expected in (([], reproduce.QUICK.steps_of("mano")), (["--steps", "5"], 5)):
        reproduce.main(["--quick", "--task", "mano", "--out", str(tmp_path), "--dry-run", *extra])
        lines = capsys.readouterr().out.splitlines()
        assert lines[0].endswith(f"tokens: mano {expected}; 2 ranks a job")  # no GPU here
        commands = [line for line in lines[1:] if not line.startswith("#")]
        assert all(f"train.max_steps={expected} " in line for line in commands) and commands


@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_the_full_grid_is_trained_as_the_quick_grid_found_and_on_any_number_of_ranks(
    tmp_path, ranks
):
    """The full grid asks bare questions, trains on the answers alone, at LR 3e-4 without the
    spike guard (the quick grid's findings); its global batch is the same on 1, 2 or 4 ranks."""
    uri = reproduce.FULL.tasks["mano"].replace("num_docs=400000&shards=8", "num_docs=300&shards=1")
    scale = reproduce.replace(reproduce.FULL, tasks={"mano": uri}, ranks=ranks)
    model = reproduce.grid(scale, ["mano"], ["looped"])[0]
    assert (model.layers, model.loops) == (2, 6)
    tokenizer = reproduce.task_tokenizer("mano", uri, tmp_path, tmp_path / "c")
    overrides = reproduce.job_overrides(model, scale, tokenizer, tmp_path / "run", tmp_path / "c")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = OmegaConf.to_object(compose("pretrain", overrides=overrides))
    assert config_problems(cfg, world_size=ranks) == []
    assert (cfg.data.kind, cfg.data.template, cfg.optim.lr) == ("sft", "plain", 3e-4)
    assert not cfg.stability.enabled
    assert cfg.train.micro_batch_size * cfg.data.seq_len * ranks == cfg.train.global_batch_tokens
    assert synthetic.parse_uri(reproduce.FULL.tasks["phop"])[1]["instruction"] == 0


def test_each_job_has_one_rank_per_gpu_where_there_are_gpus(tmp_path, capsys, monkeypatch):
    import launch.commands

    cases = ((0, [], 2), (4, [], 4), (7, [], 4), (32, [], 16), (4, ["--set", "ranks=2"], 2))
    for gpus, extra, ranks in cases:  # 16 sequences a step: at most 16 ranks, a divisor of 16
        monkeypatch.setattr(launch.commands, "visible_gpus", lambda gpus=gpus: gpus)
        reproduce.main(["--quick", "--task", "phop", "--out", str(tmp_path), "--dry-run", *extra])
        lines = capsys.readouterr().out.splitlines()
        assert lines[0].endswith(f"; {ranks} ranks a job")
        micro_batch = reproduce.QUICK.batch_tokens // (ranks * reproduce.QUICK.seq_len)
        commands = [line for line in lines[1:] if not line.startswith("#")]
        assert len(commands) == 8 and all(
            f"--nproc_per_node={ranks} " in line
            and f"train.micro_batch_size={micro_batch} " in line
            for line in commands
        )

    monkeypatch.setattr(launch.commands, "visible_gpus", lambda: 1)
    message = "local rank 1 has no GPU of its own: 1 GPU visible .* --set ranks=N chooses"
    with pytest.raises(SystemExit, match=message):
        reproduce.main(["--quick", "--set", "ranks=2", "--out", str(tmp_path / "o"), "--dry-run"])
    assert not (tmp_path / "o").exists()


def test_the_dry_run_prints_each_job_as_a_command_for_a_shell(tmp_path, capsys):
    """Pasted into a shell, a dry-run line is the job the driver would start: its overrides
    come back whole (quotes, brackets, ``&`` in the source) and compose into a valid job, once
    the tokenizer is made; before that the vocabulary reads VOCAB and a comment says why."""
    import shlex

    uri = reproduce.QUICK.tasks["phop"].replace("num_docs=200000", "num_docs=400")
    argv = ["--quick", "--task", "phop", "--families", "looped", "--seeds", "1",
            "--source", f"phop={uri}", "--out", str(tmp_path), "--dry-run"]  # fmt: skip
    reproduce.main(argv)
    header, note, name, line = capsys.readouterr().out.splitlines()
    assert note.startswith("# VOCAB: ") and "model.vocab_size=VOCAB " in line
    reproduce.task_tokenizer("phop", uri, tmp_path, tmp_path / "cache")
    reproduce.main(argv)
    header, name, line = capsys.readouterr().out.splitlines()
    words = shlex.split(line)
    threads = f"OMP_NUM_THREADS={reproduce.threads_per_rank(reproduce.QUICK)}"
    assert words[:5] == [threads, "torchrun", "--nproc_per_node=2", "-m", "train.pretrain"]
    model = reproduce.grid(reproduce.replace(reproduce.QUICK, tasks={"phop": uri}, seeds=(1,)),
                           ["phop"], ["looped"])[0]  # fmt: skip
    assert name == f"# {model.name}"
    tokenizer = reproduce.tokenizer_path("phop", uri, tmp_path)
    scale = reproduce.replace(reproduce.QUICK, tasks={"phop": uri})
    expected = reproduce.job_overrides(
        model, scale, tokenizer, tmp_path / "runs" / model.name, tmp_path / "cache"
    )
    assert words[5:] == expected  # what train() runs
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = OmegaConf.to_object(compose("pretrain", overrides=words[5:]))
    assert config_problems(cfg, world_size=2) == []
    assert cfg.data.sources[0].paths == [uri] and cfg.run_dir == str(tmp_path / "runs" / model.name)


def test_the_grid_s_jobs_are_checked_before_anything_is_made(tmp_path, capsys):
    """A setting no job can run is refused by name before a tokenizer is made or a job starts,
    as ``python -m launch`` refuses a job's settings."""
    out = tmp_path / "out"
    for setting, message in (
        ("batch_tokens=1000", r"global_batch_tokens \(1000\) must be a positive multiple"),
        ("ranks=3", r"\(5 x 128 x 3 = 1920\) \(every model\)"),
        ("heads=5", "hidden_size \\(128\\) is not divisible by num_attention_heads \\(5\\)"),
    ):
        with pytest.raises(SystemExit, match=message):
            reproduce.main(["--quick", "--set", setting, "--out", str(out)])
        assert not out.exists()
    with pytest.raises(SystemExit, match=r"\(phop-looped-1x3-seed0, phop-looped-1x3-seed1\)"):
        reproduce.main(["--quick", "--task", "phop", "--families", "looped", "iso_param",
                        "--set", "beta=-1", "--out", str(out)])  # fmt: skip
    for setting in ("ranks=0", "steps=0", "seq_len=-1", "warmup=-1"):
        with pytest.raises(SystemExit, match=f"--set {setting}: .* must be >= "):
            reproduce.with_setting(reproduce.QUICK, setting)
    assert reproduce.with_setting(reproduce.QUICK, "warmup=0").warmup == 0
    capsys.readouterr()
    reproduce.main(["--quick", "--out", str(out), "--dry-run"])  # the grid as shipped passes
    assert capsys.readouterr().out.count(" torchrun --nproc_per_node=2 ") == 16


def test_a_finished_run_is_not_trained_again_in_place_or_moved(tmp_path, capsys):
    (model,) = reproduce.grid(reproduce.QUICK, ["phop"], ["looped"])[:1]

    def finish(out, overrides):  # what a finished job leaves
        run_dir = out / "runs" / model.name
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "finished.json").write_text(json.dumps({"seconds": 1, "overrides": overrides}))

    def reused(out, scale=reproduce.QUICK) -> bool:
        run_dir = out / "runs" / model.name
        tokenizer, cache = out / "tokenizers" / "t.json", out / "cache"
        assert reproduce.train(model, scale, tokenizer, out, cache) == run_dir
        return "trained before with these settings, not again" in capsys.readouterr().out

    out = tmp_path / "a"
    overrides = reproduce.job_overrides(
        model, reproduce.QUICK, out / "tokenizers" / "t.json", out / "runs" / model.name,
        out / "cache",
    )  # fmt: skip
    assert sum(str(out) in o for o in overrides) == 3  # tokenizer, cache and run directory
    recorded = reproduce.portable(overrides)
    assert not any(str(tmp_path) in o for o in recorded) and "run_dir=$OUT/runs/" in recorded[-1]
    assert reproduce.portable(recorded) == recorded
    for record in (recorded, overrides):  # as runs record them, and as they did (full paths)
        finish(out, record)
        assert reused(out)
        out = out.rename(out.with_name(out.name + "-moved"))
        assert reused(out)
    # Trained on 2 CPU ranks, the run is finished on 1 or 4 GPUs too: only the micro-batch differs.
    for ranks in (1, 4):
        assert reused(out, reproduce.replace(reproduce.QUICK, ranks=ranks))
    assert not reproduce.same_job(recorded, [*recorded[:-1], "train.max_steps=7", recorded[-1]])


@pytest.mark.parametrize("family", reproduce.FAMILIES)
def test_each_family_is_a_valid_pre_training_job(tmp_path, family):
    # the quick grid's settings, on fewer conversations of its source
    uri = reproduce.QUICK.tasks["phop"].replace("num_docs=200000", "num_docs=400")
    scale = reproduce.Scale(**{**reproduce.asdict(reproduce.QUICK), "tasks": {"phop": uri}})
    (model,) = [m for m in reproduce.grid(scale, ["phop"]) if m.family == family][:1]
    tokenizer = reproduce.task_tokenizer("phop", scale.tasks["phop"], tmp_path, tmp_path / "c")
    overrides = reproduce.job_overrides(model, scale, tokenizer, tmp_path / "run", tmp_path / "c")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = OmegaConf.to_object(compose("pretrain", overrides=overrides))
    assert config_problems(cfg, world_size=2) == []
    built = cfg.model.build_config()
    assert (built.num_hidden_layers, built.total_ut_steps) == (model.layers, model.loops)
    assert cfg.train.objective == ("last_step" if family == "looped_last" else "stage1")
    assert (cfg.train.beta > 0) == (model.loops > 1 and family == "looped")
    assert [t.source for t in cfg.eval.tasks] == ["phop"] and cfg.eval.extra_steps == 0
    assert cfg.train.global_batch_tokens == scale.batch_tokens
    assert cfg.data.kind == "sft" and not cfg.stability.enabled  # answers alone, no spike guard
    assert built.vocab_size == json.loads(tokenizer.read_text())["model"]["vocab"].__len__()


def test_a_gate_bias_starts_each_looped_model_from_a_fresh_model_with_that_gate(tmp_path):
    uri = reproduce.QUICK.tasks["phop"].replace("num_docs=200000", "num_docs=400")
    scale = reproduce.Scale(**{**reproduce.asdict(reproduce.QUICK), "tasks": {"phop": uri}})
    scale = reproduce.with_setting(scale, "gate_bias=-3")
    tokenizer = reproduce.task_tokenizer("phop", uri, tmp_path, tmp_path / "c")
    looped, plain, last = reproduce.grid(scale, ["phop"], ["looped", "iso_param", "looped_last"])[
        :3
    ]
    assert (looped.family, plain.family, last.family) == ("looped", "iso_param", "looped_last")
    assert reproduce.starts_fresh(looped, scale)
    assert not reproduce.starts_fresh(plain, scale) and not reproduce.starts_fresh(last, scale)
    assert not reproduce.starts_fresh(looped, reproduce.QUICK)  # the grid itself: the job's own
    init = reproduce.initial_model(looped, scale, tokenizer, tmp_path / "init")
    overrides = reproduce.job_overrides(
        looped, scale, tokenizer, tmp_path / "run", tmp_path / "c", init
    )
    assert f"init_from={init}" in overrides
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = OmegaConf.to_object(compose("pretrain", overrides=overrides))
    assert config_problems(cfg, world_size=2) == []  # the same architecture as the settings
    model = LoopLMForCausalLM.from_pretrained(init)
    assert model.model.early_exit_gate.bias.item() == -3.0
    # seeded by the model's seed: the same seed gives the same weights
    again = reproduce.initial_model(looped, scale, tokenizer, tmp_path / "again")
    for (name, a), (_, b) in zip(
        model.state_dict().items(),
        LoopLMForCausalLM.from_pretrained(again).state_dict().items(),
        strict=True,
    ):
        assert torch.equal(a, b), name
    # with the gate at 0 it is the job's own fresh model (the trainer seeds, then builds)
    zero = reproduce.with_setting(scale, "gate_bias=0")
    start = LoopLMForCausalLM.from_pretrained(
        reproduce.initial_model(looped, zero, tokenizer, tmp_path / "zero")
    )
    torch.manual_seed(cfg.seed)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        own = [o for o in overrides if not o.startswith("init_from=")]
        fresh_cfg = OmegaConf.to_object(compose("pretrain", overrides=own))
    fresh = build_model(fresh_cfg)
    assert fresh_cfg.init_from is None and cfg.seed == looped.seed
    for (name, a), (_, b) in zip(
        start.state_dict().items(), fresh.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    # another bias is another run: the driver trains it again rather than reusing the last one
    other = reproduce.job_overrides(
        looped, scale, tokenizer, tmp_path / "run", tmp_path / "c", tmp_path / "init-gate-2.0"
    )
    assert other != overrides
    # the exits start on the last step: lambda = sigmoid(-3 + w.h), exits lambda, (1 - lambda)
    # lambda, (1 - lambda)^2
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        pdf = model(ids, return_all_steps=True).exit_pdf
    assert pdf[..., -1].min() > 0.85 and pdf.sum(-1).allclose(torch.ones(2, 16))


def test_a_conversation_source_trains_on_the_answers_alone(tmp_path):
    """A ``chat=1`` source is a job of the SFT kind (only the answers are targets) whose
    tokenizer holds the roles of the chat template and every word of the conversations."""
    uri = "synthetic://phop?hops=2&length=12&symbols=4&num_docs=200&shards=1&chat=1"
    scale = reproduce.Scale(**{**reproduce.asdict(reproduce.QUICK), "tasks": {"phop": uri}})
    model = reproduce.grid(scale, ["phop"], ["looped"])[0]
    tokenizer = reproduce.task_tokenizer("phop", uri, tmp_path, tmp_path / "c")
    overrides = reproduce.job_overrides(model, scale, tokenizer, tmp_path / "run", tmp_path / "c")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = OmegaConf.to_object(compose("pretrain", overrides=overrides))
    assert config_problems(cfg, world_size=2) == []
    assert cfg.data.kind == "sft"
    vocabulary = json.loads(tokenizer.read_text())["model"]["vocab"]
    (shard,) = synthetic.materialize(uri, str(tmp_path / "c"))
    words = {"user", "assistant"}
    for line in open(shard):
        words |= set(json.loads(line)["messages"][0]["content"].split())
    assert words <= vocabulary.keys()

    # The quick grid asks its questions bare, in the plain rendering; ChatML, the job's
    # default, is not written out, so that the runs of before the setting are not trained
    # again.
    assert cfg.data.template == "plain"
    chatml = reproduce.with_setting(scale, "template=chatml")
    overrides = reproduce.job_overrides(model, chatml, tokenizer, tmp_path / "run", tmp_path / "c")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = OmegaConf.to_object(compose("pretrain", overrides=overrides))
    assert config_problems(cfg, world_size=2) == []
    assert (cfg.data.kind, cfg.data.template) == ("sft", "chatml")
    assert not any(o.startswith("data.template") for o in overrides)
    with pytest.raises(SystemExit, match="template is one of chatml, plain"):
        reproduce.with_setting(scale, "template=chat")


def _record(task, family, layers, loops, seed, per_step, exits=None):
    return dict(
        task=task,
        family=family,
        layers=layers,
        loops=loops,
        seed=seed,
        params=1000 * layers,
        train_flops=1e9 * layers * loops,
        accuracy_per_step=per_step,
        accuracy=per_step[-1],
        answer_exit_pdf=exits,
    )


def test_the_report_averages_over_seeds_and_checks_the_targets(tmp_path):
    results = [
        _record("mano", "looped", 2, 3, 0, [0.2, 0.5, 0.7], [0.1, 0.3, 0.6]),
        _record("mano", "looped", 2, 3, 1, [0.4, 0.5, 0.5], [0.3, 0.3, 0.4]),
        _record("mano", "iso_param", 2, 1, 0, [0.3]),
        _record("mano", "iso_param", 2, 1, 1, [0.5]),
        _record("mano", "iso_flop", 6, 1, 0, [0.8]),
        _record("mano", "iso_flop", 6, 1, 1, [0.8]),
        _record("mano", "looped_last", 2, 3, 0, [0.0, 0.1, 0.6]),
        _record("mano", "looped_last", 2, 3, 1, [0.0, 0.1, 0.4]),
    ]
    rows = {r["family"]: r for r in reproduce.summary(results)}
    assert rows["looped"]["accuracy"] == pytest.approx(0.6)
    assert rows["looped"]["accuracy_per_step"] == pytest.approx([0.3, 0.5, 0.6])
    assert (rows["looped"]["accuracy_min"], rows["looped"]["accuracy_max"]) == (0.5, 0.7)
    assert rows["looped"]["answer_exit_pdf"] == pytest.approx([0.2, 0.3, 0.5])
    assert rows["iso_param"]["answer_exit_pdf"] is None
    checks = reproduce.verdicts(list(rows.values()))
    assert checks == [
        "mano, k=2: looped - iso_param = +20.0 points (target >= +20): met",
        "mano, k=2: looped - iso_flop = -20.0 points (target >= -10): NOT met",
        "mano, k=2: last step - first step = +30.0 points (target > 0): met",
    ]
    scale = reproduce.QUICK
    assert reproduce.write_report(results, scale, tmp_path, "python scripts/reproduce.py") == checks
    assert json.loads((tmp_path / "results.json").read_text()) == results
    table = (tmp_path / "results.md").read_text()
    assert (
        "| mano | looped | 2 x 3 | 2,000 | 6.00e+09 | 0.600 (0.50-0.70) | 0.30 / 0.50 / 0.60 | "
        "0.20 / 0.30 / 0.50 |" in table
    )
    assert "| mano | iso_param | 2 x 1 | 2,000 | 2.00e+09 | 0.400 (0.30-0.50) | 0.40 |  |" in table
    assert (tmp_path / "results.png").stat().st_size > 10_000
    # A grid of baselines alone (an investigation) says it has no targets, not an empty list.
    baselines = [r for r in results if r["family"] == "iso_flop"]
    assert reproduce.write_report(baselines, scale, tmp_path, "python scripts/reproduce.py") == []
    table = (tmp_path / "results.md").read_text()
    assert table.endswith("Targets:\n\n- none: the targets compare the looped family with its "
                          "baselines, and this grid has no looped model\n")  # fmt: skip


def test_the_task_probe_trains_and_scores_every_difficulty_at_every_step(capsys):
    probe = load_script("probe_task")
    argv = ["--task", "phop", "--params", "hops=2,length=8,symbols=3", "--layers", "1",
            "--loops", "2", "--hidden", "32", "--heads", "2", "--batch", "4", "--steps", "3",
            "--eval-every", "2", "--eval-items", "8"]  # fmt: skip
    assert probe.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("phop {") and "1 layer x 2 steps" in lines[0]
    assert [line.split()[1] for line in lines[1:]] == ["2", "3"]
    scores = lines[-1].split("per hops: ")[1].split(" | ")
    assert [s.split(":")[0] for s in scores] == ["1", "2"]
    assert all(len(s.split(": ")[1].split()) == 2 for s in scores)  # one per recurrent step
    with pytest.raises(ValueError, match="mano: give ops=L"):
        probe.main(["--task", "mano", "--steps", "1"])


def test_the_probe_trains_with_the_optimizer_settings_it_is_given(capsys):
    probe = load_script("probe_task")
    layer = torch.nn.Linear(2, 2)
    defaults = probe.optimizer_of(layer, probe.parse_args([])).param_groups[0]
    assert (defaults["weight_decay"], defaults["betas"]) == (0.1, (0.9, 0.95))  # the job's
    args = probe.parse_args(["--lr", "5e-4", "--weight-decay", "1.0", "--beta2", "0.99"])
    group = probe.optimizer_of(layer, args).param_groups[0]
    assert (group["lr"], group["weight_decay"], group["betas"]) == (5e-4, 1.0, (0.9, 0.99))
    argv = ["--task", "mano", "--params", "ops=1,mod=5", "--layers", "1", "--loops", "1",
            "--hidden", "32", "--heads", "2", "--batch", "4", "--steps", "1",
            "--weight-decay", "1.0", "--beta2", "0.99"]  # fmt: skip
    assert probe.main(argv) == 0
    assert "weight decay 1.0, beta2 0.99" in capsys.readouterr().out.splitlines()[0]


def test_the_probe_builds_the_mlp_width_and_initialization_it_is_given(capsys):
    probe = load_script("probe_task")
    config = probe.LoopLMConfig(vocab_size=64, hidden_size=64, intermediate_size=96,
                                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    torch.manual_seed(0)
    plain = probe.LoopLMForCausalLM(config).state_dict()
    torch.manual_seed(0)
    default = probe.model_of(config, probe.parse_args([])).state_dict()
    assert all(torch.equal(plain[k], default[k]) for k in plain)  # earlier figures still hold
    for given, std in (([], 0.02), (["--init-std", "0.05"], 0.05)):
        torch.manual_seed(0)
        model = probe.model_of(config, probe.parse_args(given))
        weights = torch.cat([m.weight.flatten() for m in model.modules()
                             if isinstance(m, torch.nn.Linear | torch.nn.Embedding)])  # fmt: skip
        assert weights.std().item() == pytest.approx(std, rel=0.05)
    argv = ["--task", "mano", "--params", "ops=1,mod=5", "--layers", "1", "--loops", "1",
            "--hidden", "32", "--heads", "2", "--batch", "4", "--steps", "1",
            "--intermediate", "48", "--init-std", "0.05"]  # fmt: skip
    assert probe.main(argv) == 0
    assert "hidden 32, MLP 48, init std 0.05," in capsys.readouterr().out.splitlines()[0]
    for bad, problem in ((["--init-std", "0"], "--init-std must be a positive number, got 0.0"),
                         (["--init-std", "nan"], "--init-std must be a positive number, got nan"),
                         (["--intermediate", "0"], "--intermediate must be a positive width")):  # fmt: skip
        with pytest.raises(SystemExit):
            probe.parse_args(bad)
        assert problem in capsys.readouterr().err


def test_the_probe_with_a_pool_scores_only_questions_outside_it(capsys):
    probe = load_script("probe_task")
    argv = ["--task", "mano", "--params", "ops=2,mod=5", "--layers", "1", "--loops", "2",
            "--hidden", "32", "--heads", "2", "--batch", "4", "--steps", "2", "--eval-every", "2",
            "--eval-items", "8", "--pool", "300", "--rope-theta", "10000"]  # fmt: skip
    assert probe.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "RoPE base 10,000," in lines[0]
    assert lines[1].startswith("training pool: 300 questions (")
    assert lines[-1].split("per ops: ")[1].startswith("2: ")  # the hardest difficulty alone
    pool = [probe.question("mano", {"ops": 2, "mod": 5}, probe.random.Random(0), 2)
            for _ in range(500)]  # fmt: skip
    rng = probe.random.Random(1)
    draw = lambda: probe.question("mano", {"ops": 2, "mod": 5}, rng, 2)  # noqa: E731
    outside = probe.unseen(pool, draw, 20)
    assert len({tuple(q) for q in outside}) == 20
    assert not {tuple(q) for q in outside} & {tuple(q) for q in pool}
    # Two operators modulo 5 are 2 * 9 * 125 = 2,250 questions: a pool of all leaves none.
    everything = [probe.question("mano", {"ops": 2, "mod": 5}, rng, 2) for _ in range(40_000)]
    with pytest.raises(SystemExit, match="outside the training pool"):
        probe.unseen(everything, draw, 20)


def test_the_probe_asks_conversations_as_the_job_renders_them(capsys):
    probe = load_script("probe_task")
    params = {"ops": 2, "mod": 11}
    words = probe.question("mano", params, probe.random.Random(0), 2)
    rendered = probe.conversation(probe.instruction("mano", params), words)
    # the job's ChatML around the source's user message and the assistant's answer
    (item,) = synthetic.held_out_items("synthetic://mano?ops=2&mod=11", 1, lambda key: False)
    instruction = item.prompt.split("\n")[0].split()
    assert rendered == [
        "<|im_start|>", "user", "\n", *instruction, "\n", *words[:-1], "<|im_end|>", "\n",
        "<|im_start|>", "assistant", "\n", words[-1], "<|im_end|>",
    ]  # fmt: skip
    assert probe.instruction("mano", {**params, "instruction": 0}) == []  # the question alone
    vocab = probe.Vocabulary(pad=0)
    row = vocab.ids(rendered)
    x, y = probe.batch([row, row[:-3]], answer_only=True, after=1)
    targets = [(i, int(t)) for i, t in enumerate(y[0]) if t != -100]
    assert targets == [(len(row) - 3, vocab[words[-1]]), (len(row) - 2, vocab["<|im_end|>"])]
    assert (y[1] != -100).sum() == 2 and (x[1, len(row) - 3 :] == 0).all()  # padding
    argv = ["--task", "mano", "--params", "ops=2,mod=5", "--layers", "1", "--loops", "2",
            "--hidden", "32", "--heads", "2", "--batch", "4", "--steps", "2", "--eval-every", "2",
            "--eval-items", "8", "--pool", "300", "--answer-only", "--chat"]  # fmt: skip
    assert probe.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("answer as target, stage1 loss, as conversations")
    tokens = int(lines[-1].split("tokens ")[1].split()[0].replace(",", ""))
    assert 2 * 4 * 20 <= tokens <= 2 * 4 * 22  # 2 steps of 4, 20 tokens (one operator) or 22
    with pytest.raises(SystemExit, match="add --answer-only"):
        probe.main([a for a in argv if a != "--answer-only"])


def test_the_legend_names_one_layer_and_several_layers_as_such():
    labels = [
        reproduce.legend_label({"family": family, "layers": layers, "loops": loops})
        for family, layers, loops in [("looped", 1, 3), ("iso_param", 1, 1), ("iso_flop", 3, 1)]
    ]
    assert labels == ["looped (1 layer x 3)", "iso_param (1 layer)", "iso_flop (3 layers)"]


def test_the_progress_tail_returns_complete_lines_once_and_rereads_a_rewritten_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    tail = reproduce.Tail(path)
    assert tail.lines() == []  # not written yet
    path.write_text('{"step": 1}\n{"step": 2}\n{"st')
    assert tail.lines() == ['{"step": 1}', '{"step": 2}']
    assert tail.lines() == []
    with open(path, "a") as f:
        f.write('ep": 3}\n')
    assert tail.lines() == ['{"step": 3}']
    path.write_text('{"step": 1}\n')  # shorter: rewritten
    assert tail.lines() == ['{"step": 1}']
