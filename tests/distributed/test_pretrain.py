"""The pre-training job on 2 gloo ranks: runs, checkpoints, exact resume, preemption."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from data_pipelines.tokenizer import CHATML_TEMPLATE, PLAIN_TEMPLATE, load_tokenizer
from looplm import LoopLMConfig, LoopLMForCausalLM
from tests.distributed.launch import (
    REPO,
    completed,
    copy_of,
    environment,
    job,
    kill_job,
    metrics,
    run,
    start,
    wait_for,
    wait_paused,
)
from tests.unit.test_checkpoint_io import ouro_keys
from train.export import export_checkpoint, load_checkpoint_model

REQUIRED = {
    "step",
    "tokens",
    "loss",
    "loss_per_step",
    "exit_pdf_mean",
    "exit_entropy",
    "grad_norm",
    "lr",
    "skipped",
    "tokens_per_s",
}


FOUR_STEPS = ["train.max_steps=4", "checkpoint.every_steps=2"]


def four_step_args(run_dir: Path, cache_dir: Path, zero: str) -> list[str]:
    """A 4-step run of ZeRO setting ``zero``, checkpointing every 2 steps, printing every 2,
    logging to wandb (offline) and plotting at its end."""
    extra = ["train.log_every=2", "logging.wandb=true", "logging.plot_at_end=true"]
    return job(run_dir, cache_dir, f"deepspeed={zero}", *FOUR_STEPS, *extra)


def four_step_run(run_dir: Path, cache_dir: Path, zero: str) -> Path:
    """Runs `four_step_args` to its end; its console output is ``job.log`` beside ``run_dir``."""
    code, out = run("train.pretrain", four_step_args(run_dir, cache_dir, zero), log_of(run_dir))
    assert code == 0, out[-3000:]
    return run_dir


def log_of(run_dir: Path) -> Path:
    return run_dir.parent / "job.log"


# The runs of the test below for ZeRO-2 and ZeRO-3 are shared (each job started costs about 15
# CPU-seconds of imports): the ZeRO-2 one is the console test's, the ZeRO-3 one the reference
# of the ZeRO-3 resume and the checkpoint the export reads.
@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory, cache_dir) -> Path:
    return four_step_run(tmp_path_factory.mktemp("zero2") / "run", cache_dir, "zero2")


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory, cache_dir) -> Path:
    return four_step_run(tmp_path_factory.mktemp("zero3") / "run", cache_dir, "zero3")


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory, cache_dir) -> Path:
    """A finished 2-step run (ZeRO-2, a checkpoint at step 2), which the tests that resume or
    refuse a run copy and go on from."""
    root = tmp_path_factory.mktemp("two_steps")
    args = job(root / "run", cache_dir, "train.max_steps=2", "checkpoint.every_steps=2")
    code, out = run("train.pretrain", args, root / "log")
    assert code == 0, out[-3000:]
    return root / "run"


@pytest.mark.parametrize(
    "zero", ["zero1", "zero2", pytest.param("zero3", marks=pytest.mark.smoke), "zero3_offload"]
)
def test_two_rank_run_logs_every_step_and_checkpoints(tmp_path, cache_dir, zero, request):
    if zero in ("zero2", "zero3"):
        run_dir = request.getfixturevalue(f"{zero}_run")
    else:
        run_dir = four_step_run(tmp_path / "run", cache_dir, zero)
    assert list((run_dir / "wandb").glob("offline-run-*"))  # no credentials: wandb runs offline
    assert len(list((run_dir / "plots").glob("*.png"))) >= 3
    assert (run_dir / "config.yaml").is_file()
    records = metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert REQUIRED <= r.keys()
        assert len(r["loss_per_step"]) == len(r["exit_pdf_mean"]) == 4
        assert abs(sum(r["exit_pdf_mean"]) - 1) < 1e-4
        assert 1.0 <= r["mean_depth"] <= 4.0 and r["beta"] == 0.1
        assert torch.isfinite(torch.tensor(r["loss"]))
    assert records[-1]["tokens"] == 4 * 512
    assert completed(run_dir) == ["step_00000002", "step_00000004"]
    state = json.loads((run_dir / "checkpoints/step_00000004/trainer_state.json").read_text())
    assert state == {
        "step": 4,
        "tokens": 2048,
        "world_size": 2,
        "stage": "main",
        "loss_window": [r["loss"] for r in records],
        "grad_norm_window": [r["grad_norm"] for r in records],
        "guard": {"spike_steps": [], "rollbacks": [], "lowered_until": 0},
        "skipped_steps": 0,
        "consecutive_skips": 0,
        "grad_spike_run": 0,
        "good": True,
        "data_seed_offset": 0,
    }


@pytest.mark.smoke
def test_kill_and_resume_reproduces_the_uninterrupted_losses(tmp_path, cache_dir, zero2_run):
    reference = [r["loss"] for r in metrics(zero2_run)]  # its wandb and plots change no loss
    run_dir = tmp_path / "resumed"
    # Killed after step 1, before any checkpoint: the next job starts over. Then killed after
    # step 3, whose newest checkpoint is step 2's.
    for pause, checkpoints in ((1, []), (3, ["step_00000002"])):
        log = tmp_path / f"paused_after_{pause}.log"
        process = start(
            "train.pretrain",
            job(run_dir, cache_dir, *FOUR_STEPS, f"faults.pause_after_step={pause}"),
            log,
        )
        wait_paused(log, process)
        kill_job(process)
        process.wait()
        assert [r["step"] for r in metrics(run_dir)] == list(range(1, pause + 1))
        assert completed(run_dir) == checkpoints
    # The last job without the grad-norm guard: the norm then comes from DeepSpeed's step
    # instead of the trainer's own collective before it, the same number.
    last = job(run_dir, cache_dir, *FOUR_STEPS, "stability.grad_norm=false")
    code, out = run("train.pretrain", last, tmp_path / "c.log")
    assert code == 0, out[-3000:]
    assert "resumed from" in out and "step_00000002" in out
    resumed = metrics(run_dir)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert [r["loss"] for r in resumed] == reference  # bit for bit
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in metrics(zero2_run)]


def test_sigterm_saves_and_stops_cleanly(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    args = job(run_dir, cache_dir, "train.max_steps=1000", "checkpoint.every_steps=1000")
    process = start("train.pretrain", args, tmp_path / "log")
    wait_for(lambda: len(metrics(run_dir)) >= 2, process, log=tmp_path / "log")
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=120)
    saved = completed(run_dir)
    assert len(saved) == 1
    step = int(saved[0].split("_")[1])
    assert step >= 2 and step == metrics(run_dir)[-1]["step"]
    assert "stop requested" in (tmp_path / "log").read_text()


def test_export_of_a_trained_checkpoint_loads_with_the_same_logits(tmp_path, zero3_run, capfd):
    run_dir = zero3_run
    capfd.readouterr()
    trained = load_checkpoint_model(run_dir)
    # DeepSpeed's reader prints lines and a progress bar for each checkpoint: held back...
    assert "zero checkpoint" not in "".join(capfd.readouterr())
    # ... unless it fails: a checkpoint without one rank's optimizer state.
    damaged = tmp_path / "damaged"
    shutil.copytree(run_dir / "checkpoints" / "step_00000004", damaged)
    next((damaged / "deepspeed").glob("*rank_1_*optim_states.pt")).unlink()
    with pytest.raises(ValueError, match="optim_states"):
        load_checkpoint_model(damaged)
    assert "Processing zero checkpoint" in "".join(capfd.readouterr())
    old_umask = os.umask(0o022)
    try:
        # as scripts/export_hf.py runs it
        export = export_checkpoint(run_dir, tmp_path / "hf", dtype="bfloat16")
    finally:
        os.umask(old_umask)
    exported = LoopLMForCausalLM.from_pretrained(export, dtype="float32")
    ids = torch.randint(0, trained.config.vocab_size, (2, 16))
    assert torch.equal(
        trained.to(torch.bfloat16).float()(ids, return_all_steps=True).step_logits,
        exported(ids, return_all_steps=True).step_logits,
    )
    assert not torch.equal(trained.lm_head.weight, LoopLMForCausalLM(trained.config).lm_head.weight)
    # Self-contained and readable by the group: the tokenizer of the run, world-readable files.
    names = {path.name for path in export.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= names
    assert {oct(path.stat().st_mode & 0o777) for path in export.iterdir()} == {"0o644"}
    config = json.loads((export / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config.get("dtype", "bfloat16") == "bfloat16"
    assert config["auto_map"]["AutoModelForCausalLM"] == (
        "ByteDance/Ouro-1.4B--modeling_ouro.OuroForCausalLM"
    )
    with safe_open(export / "model.safetensors", framework="pt") as weights:
        assert set(weights.keys()) == ouro_keys(trained.config.num_hidden_layers)
    # The directory alone is enough to chat with (ChatML from its tokenizer files).
    command = [sys.executable, str(REPO / "scripts" / "chat.py"), str(export), "Hello"]
    result = subprocess.run(
        [*command, "--max-new-tokens", "5", "--json"],
        capture_output=True,
        text=True,
        env=environment(),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["new_tokens"] >= 1

    # As a chat model: the run rendered conversations in ChatML (its data.template), so its
    # EOS is <|im_end|>; one of plain conversations ends its answers with <|endoftext|>.
    for template, eos, chat_template in (
        (None, "<|im_end|>", CHATML_TEMPLATE),
        ("plain", "<|endoftext|>", PLAIN_TEMPLATE),
    ):
        chat = export_checkpoint(
            run_dir, tmp_path / f"chat-{template}", chat=True, template=template
        )
        settings = json.loads((chat / "tokenizer_config.json").read_text())
        assert (settings["eos_token"], settings["chat_template"]) == (eos, chat_template)
        eos_id = load_tokenizer(str(chat / "tokenizer.json")).token_to_id(eos)
        assert json.loads((chat / "generation_config.json").read_text())["eos_token_id"] == eos_id
        assert LoopLMForCausalLM.from_pretrained(chat).config.eos_token_id == eos_id


def test_a_run_dir_of_another_model_is_refused(tmp_path, cache_dir, two_step_run):
    run_dir = copy_of(two_step_run, tmp_path)
    other = job(run_dir, cache_dir, "train.max_steps=3", "model.num_hidden_layers=3")
    code, out = run("train.pretrain", other, tmp_path / "b.log")
    assert code != 0
    assert "model.num_hidden_layers: saved None, now 3 (the checkpoint holds" in out
    # Without the run's config.yaml, the checkpoint's own model config refuses it.
    (run_dir / "config.yaml").unlink()
    code, out = run("train.pretrain", other, tmp_path / "c.log")
    assert code != 0
    assert "holds a checkpoint of another model" in out and "num_hidden_layers" in out


def test_resuming_on_another_number_of_ranks_goes_through_the_universal_checkpoint(
    tmp_path, cache_dir, two_step_run
):
    run_dir = copy_of(two_step_run, tmp_path)
    before = load_checkpoint_model(run_dir).state_dict()
    code, out = run(
        "train.pretrain", job(run_dir, cache_dir, "train.max_steps=3"), tmp_path / "b.log", nproc=1
    )
    assert code == 0, out[-3000:]
    assert "the data order changes" in out
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3]
    assert (run_dir / "checkpoints/step_00000002/deepspeed_universal/COMPLETE").is_file()
    after = load_checkpoint_model(run_dir).state_dict()
    assert (
        json.loads((run_dir / "checkpoints/step_00000003/trainer_state.json").read_text())[
            "world_size"
        ]
        == 1
    )
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained on
    # Resumed again on 1 rank: the restarted streams (and their seed) carry on.
    code, out = run(
        "train.pretrain", job(run_dir, cache_dir, "train.max_steps=4"), tmp_path / "c.log", nproc=1
    )
    assert code == 0, out[-3000:]
    assert "the data order changes" not in out
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3, 4]


def optimizer_settings(checkpoint: Path) -> list[tuple]:
    """(weight_decay, betas, eps) of each parameter group in a checkpoint's optimizer state."""
    states = sorted((checkpoint / "deepspeed").glob("*optim_states.pt"))
    saved = torch.load(states[0], weights_only=False)["optimizer_state_dict"]
    groups = saved["base_optimizer_state"]["param_groups"]
    return [(g["weight_decay"], tuple(g["betas"]), g["eps"]) for g in groups]


def test_changed_settings_apply_from_the_resume_and_are_logged_or_are_refused(
    tmp_path, cache_dir, two_step_run
):
    run_dir = copy_of(two_step_run, tmp_path)
    changed = [
        "train.max_steps=4",
        "checkpoint.every_steps=2",
        "data.sources.1.weight=0.6",
        "optim.weight_decay=0.5",
        "optim.betas=[0.8,0.9]",
        "optim.eps=1e-6",
    ]
    code, out = run("train.pretrain", job(run_dir, cache_dir, *changed), tmp_path / "b.log")
    assert code == 0, out[-3000:]
    assert "the data stage changes at resume (step 2): weights" in out
    for setting in ("optim.weight_decay: 0.1 -> 0.5", "optim.eps: 1e-08 -> 1e-06"):
        assert f"setting changed at resume, applies from step 2: {setting}" in out
    for step, weight in ((2, 0.15), (4, 0.6)):
        state = torch.load(
            run_dir / f"checkpoints/step_{step:08d}/rank_00000.pt", weights_only=False
        )
        assert state["data"]["stage"]["weights"]["multi_hop"] == weight
    # The optimizer state brings back the saved hyperparameters; the configured ones win.
    assert optimizer_settings(run_dir / "checkpoints/step_00000002") == [
        (0.1, (0.9, 0.95), 1e-8),
        (0.0, (0.9, 0.95), 1e-8),
    ]
    assert optimizer_settings(run_dir / "checkpoints/step_00000004") == [
        (0.5, (0.8, 0.9), 1e-6),
        (0.0, (0.8, 0.9), 1e-6),
    ]
    refused = [*changed, "train.max_steps=6", "seed=3", "deepspeed.zero_stage=3"]
    code, out = run("train.pretrain", job(run_dir, cache_dir, *refused), tmp_path / "c.log")
    assert code != 0
    assert "would change settings its checkpoint fixes" in out
    assert "seed: saved 0, now 3 (the RNG state is restored" in out
    assert "deepspeed.zero_stage: saved 2, now 3" in out
    assert completed(run_dir)[-1] == "step_00000004", "a refused resume trains nothing"


def test_init_from_an_ouro_directory_starts_from_its_weights(tmp_path, cache_dir):
    torch.manual_seed(5)
    source = LoopLMForCausalLM(
        LoopLMConfig.from_preset(
            "tiny", hidden_size=64, intermediate_size=128, num_key_value_heads=2
        )
    )
    source.save_pretrained(tmp_path / "released")
    run_dir = tmp_path / "run"
    code, out = run(
        "train.pretrain",
        job(
            run_dir,
            cache_dir,
            "train.max_steps=1",
            f"init_from={tmp_path / 'released'}",
            "optim.lr=1e-9",
            "deepspeed.precision=fp32",
        ),
        tmp_path / "log",
    )
    assert code == 0, out[-3000:]
    trained = load_checkpoint_model(run_dir).state_dict()
    for name, tensor in source.state_dict().items():
        torch.testing.assert_close(trained[name], tensor, rtol=0, atol=1e-6)


def test_an_unusable_run_dir_is_a_clear_error(tmp_path, cache_dir):
    (tmp_path / "a_file").write_text("")
    code, out = run(
        "train.pretrain",
        job(tmp_path / "a_file" / "run", cache_dir, "train.max_steps=1"),
        tmp_path / "log",
    )
    assert code != 0
    assert "is not writable" in out


def test_zero3_resume_is_exact_too(tmp_path, cache_dir, zero3_run):
    steps = ["deepspeed=zero3", *FOUR_STEPS]  # the shared run's, without wandb and plots
    run_dir = tmp_path / "run"
    log = tmp_path / "b.log"
    process = start(
        "train.pretrain", job(run_dir, cache_dir, *steps, "faults.pause_after_step=3"), log
    )
    wait_paused(log, process)
    kill_job(process)
    process.wait()
    assert completed(run_dir) == ["step_00000002"] and len(metrics(run_dir)) == 3
    code, out = run("train.pretrain", job(run_dir, cache_dir, *steps), tmp_path / "c.log")
    assert code == 0, out[-3000:]
    assert [r["loss"] for r in metrics(run_dir)] == [r["loss"] for r in metrics(zero3_run)]


def test_a_job_started_without_a_launcher_runs_as_one_rank(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "train.pretrain",
        *job(run_dir, cache_dir, "train.max_steps=2"),
    ]
    env = {k: v for k, v in environment().items() if k not in ("RANK", "WORLD_SIZE")}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "no launcher: running as a single rank" in result.stderr
    assert [r["step"] for r in metrics(run_dir)] == [1, 2]
    assert completed(run_dir) == ["step_00000002"]


def test_the_console_averages_summarises_and_a_finished_run_changes_nothing(
    tmp_path, cache_dir, zero2_run
):
    out = log_of(zero2_run).read_text()
    run_dir = copy_of(zero2_run, tmp_path)
    records = metrics(run_dir)
    mean = (records[2]["loss"] + records[3]["loss"]) / 2
    assert f"step 4/4  loss {mean:.4f} (mean of 2)" in out
    assert "run complete: step 4/4" in out and "updates skipped: 0 (0.0%)" in out
    assert "loss by recurrent step, mean of the last 4 steps: " in out
    assert "FutureWarning" not in out  # DeepSpeed's use of a deprecated all-gather
    phases = [
        "starting the process group (2 CPU ranks, gloo) ...",
        "building the model ...",
        "parameters, ZeRO-2, 2 CPU ranks, gloo) ...",
        "opening the data streams: ",
    ]
    lines = out.splitlines()
    found = [[i for i, line in enumerate(lines) if phase in line] for phase in phases]
    assert all(len(at) == 1 for at in found), found  # said once, by rank 0
    assert sorted(found) == found, found  # in the order the job goes through them
    assert "shm_comm" not in out  # DeepSpeed's inference all-reduce is not built or loaded
    plots = {path: path.stat().st_mtime_ns for path in (run_dir / "plots").iterdir()}
    before = (run_dir / "metrics.jsonl").read_text()
    args = four_step_args(run_dir, cache_dir, "zero2")
    code, out = run("train.pretrain", args, tmp_path / "b.log")
    assert code == 0, out[-3000:]
    assert "is already complete (step 4, " in out and "run complete" not in out
    assert (run_dir / "metrics.jsonl").read_text() == before
    assert {path: path.stat().st_mtime_ns for path in (run_dir / "plots").iterdir()} == plots
    assert completed(run_dir)[-1] == "step_00000004"
