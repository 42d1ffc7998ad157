"""Checkpoint writes that fail, crash at each moment on one rank or all, or leave a damaged
file: nothing is lost and the resume is exact (the pre-training job on 2 gloo ranks)."""

import pytest

from tests.distributed.launch import (
    completed,
    copy_of,
    job,
    kill_job,
    metrics,
    run,
    start,
    wait_paused,
)


def test_a_failed_checkpoint_write_keeps_the_previous_one(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    steps = ["checkpoint.every_steps=2"]
    code, out = run(
        "train.pretrain", job(run_dir, cache_dir, *steps, "train.max_steps=2"), tmp_path / "a.log"
    )
    assert code == 0, out[-3000:]
    # The next save cannot write its optimizer states: the disk is "full".
    code, out = run(
        "train.pretrain",
        job(run_dir, cache_dir, *steps, "train.max_steps=4"),
        tmp_path / "b.log",
        max_file_bytes=256 * 1024,
    )
    assert code != 0
    assert "the checkpoint of step 4 could not be written" in out
    assert "the last complete checkpoint is kept" in out and "step_00000002" in out
    assert completed(run_dir) == ["step_00000002"]
    assert not list((run_dir / "checkpoints").glob(".*.partial"))
    code, out = run(
        "train.pretrain", job(run_dir, cache_dir, *steps, "train.max_steps=4"), tmp_path / "c.log"
    )
    assert code == 0, out[-3000:]
    assert "resumed from" in out and "step_00000002" in out
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3, 4]


EVERY_STEP = ["train.max_steps=4", "checkpoint.every_steps=1", "checkpoint.keep_last=10"]


@pytest.fixture(scope="module")
def four_step_run(tmp_path_factory, cache_dir):
    """An uninterrupted 4-step run that keeps a checkpoint of every step: the reference of the
    crashed runs' losses, and the run that the damage tests copy."""
    tmp_path = tmp_path_factory.mktemp("reference")
    code, out = run(
        "train.pretrain", job(tmp_path / "run", cache_dir, *EVERY_STEP), tmp_path / "log"
    )
    assert code == 0, out[-3000:]
    return tmp_path / "run"


@pytest.fixture(scope="module")
def four_step_reference(four_step_run):
    """Per-step losses of the uninterrupted 4-step run."""
    return [r["loss"] for r in metrics(four_step_run)]


# (moment, rank, action, the checkpoint resumed from). "kill": the rank SIGKILLs itself inside
# the write; "pause": every rank waits there and the test SIGKILLs the whole job from outside.


CHECKPOINT_CRASHES = {
    "one rank killed after DeepSpeed's files": ("mid_write", 1, "kill", 2),
    "every rank killed after DeepSpeed's files": ("mid_write", None, "kill", 2),
    "killed from outside before the COMPLETE marker": ("before_complete", 0, "pause", 2),
    "killed from outside after the marker, before the rename": ("before_rename", 0, "pause", 3),
}


@pytest.mark.parametrize("crash", CHECKPOINT_CRASHES.values(), ids=CHECKPOINT_CRASHES.keys())
def test_a_crash_inside_a_checkpoint_write_loses_nothing_and_resume_is_exact(
    tmp_path, cache_dir, four_step_reference, crash
):
    moment, rank, action, resumed_at = crash
    steps = EVERY_STEP[:2]  # the reference's, keeping the default number of checkpoints
    fault = [
        "faults.checkpoint_fault_at_step=3",
        f"faults.checkpoint_fault_moment={moment}",
        f"faults.checkpoint_fault_rank={'null' if rank is None else rank}",
        f"faults.checkpoint_fault_action={action}",
    ]
    run_dir, log = tmp_path / "run", tmp_path / "a.log"
    process = start("train.pretrain", job(run_dir, cache_dir, *steps, *fault), log)
    if action == "pause":
        wait_paused(log, process, ranks=2 if rank is None else 1)
        kill_job(process)
    assert process.wait(timeout=240) != 0
    root = run_dir / "checkpoints"
    partial = root / ".step_00000003.partial"
    assert completed(run_dir) == ["step_00000001", "step_00000002"]
    assert partial.is_dir()
    assert (partial / "COMPLETE").is_file() == (moment == "before_rename")
    assert (partial / "trainer_state.json").is_file() == (moment != "mid_write")
    assert (partial / "MANIFEST.json").is_file() == (moment != "mid_write")
    killed = [0, 1] if rank is None else [rank]
    rank_files = [(partial / f"rank_{r:05d}.pt").is_file() for r in killed]
    assert rank_files == [moment != "mid_write"] * len(killed)
    assert list((partial / "deepspeed").glob("*model_states.pt"))  # some files were written

    code, out = run("train.pretrain", job(run_dir, cache_dir, *steps), tmp_path / "b.log")
    assert code == 0, out[-3000:]
    assert f"resumed from {root / f'step_{resumed_at:08d}'}" in out
    assert not list(root.glob(".*"))
    assert [r["loss"] for r in metrics(run_dir)] == four_step_reference


@pytest.mark.parametrize("damaged", ["rank_00001.pt", "deepspeed/mp_rank_00_model_states.pt"])
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_run_resumes_before_it(
    tmp_path, cache_dir, four_step_run, four_step_reference, damaged
):
    run_dir = copy_of(four_step_run, tmp_path)
    (run_dir / "checkpoints" / "step_00000001.bak").mkdir()  # not a checkpoint
    newest = run_dir / "checkpoints" / "step_00000004"
    target = newest / damaged
    assert target.is_file(), sorted(str(p) for p in newest.rglob("*"))
    half = target.stat().st_size // 2
    target.write_bytes(target.read_bytes()[:half])  # torn by a crash

    code, out = run("train.pretrain", job(run_dir, cache_dir, *EVERY_STEP), tmp_path / "b.log")
    assert code == 0, out[-3000:]
    assert f"checkpoint step_00000004 is damaged: {target} has" in out
    assert "ignoring" in out and "step_00000001.bak: not a checkpoint" in out
    assert f"resumed from {run_dir / 'checkpoints' / 'step_00000003'}" in out
    aside = run_dir / "checkpoints" / ".step_00000004.damaged"
    assert (aside / damaged).stat().st_size == half  # kept as it was, not deleted
    assert [r["loss"] for r in metrics(run_dir)] == four_step_reference  # step 4 again, exactly
    assert completed(run_dir) == [f"step_{step:08d}" for step in (1, 2, 3, 4)]
