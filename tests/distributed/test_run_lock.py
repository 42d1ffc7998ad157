"""One writer per run directory: a second job refuses, naming the holder; a dead holder's lock
is taken over; ranks whose launcher is SIGKILLed stop instead of training on as orphans."""

import json
import os
import signal
import socket
import time

import psutil

from tests.distributed.launch import job, kill_job, metrics, run, start, wait_paused
from train.run_lock import LOCK_NAME


def test_a_second_job_on_a_run_refuses_and_a_dead_holders_lock_is_taken_over(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    holder = start(
        "train.pretrain",
        job(run_dir, cache_dir, "train.max_steps=6", "faults.pause_after_step=2"),
        tmp_path / "first.log",
    )
    try:
        wait_paused(tmp_path / "first.log", holder)
        lock = json.loads((run_dir / LOCK_NAME).read_text())
        assert lock["host"] == socket.gethostname() and psutil.pid_exists(lock["pid"])
        assert (
            "train/pretrain.py" in lock["command"]
            and "faults.pause_after_step=2" in lock["command"]
        )
        before = metrics(run_dir)

        code, out = run(
            "train.pretrain", job(run_dir, cache_dir, "train.max_steps=6"), tmp_path / "second.log"
        )
        assert code != 0
        assert f"is in use by job {lock['job']} (host {lock['host']}, pid {lock['pid']}" in out
        assert metrics(run_dir) == before  # the refused job wrote nothing
        assert json.loads((run_dir / LOCK_NAME).read_text()) == lock
    finally:
        kill_job(holder)

    # The holder died without releasing: its lock is stale, and the next job takes it over.
    assert (run_dir / LOCK_NAME).is_file()
    code, out = run(
        "train.pretrain", job(run_dir, cache_dir, "train.max_steps=6"), tmp_path / "third.log"
    )
    assert code == 0, out[-3000:]
    assert "taking over the lock of job" in out and "its process no longer exists" in out
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, 7))
    assert not (run_dir / LOCK_NAME).exists()  # released at the end


def test_ranks_stop_when_their_launcher_is_killed(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    process = start(
        "train.pretrain",
        job(run_dir, cache_dir, "train.max_steps=200", "faults.pause_after_step=100"),
        tmp_path / "log",
    )
    try:
        deadline = time.time() + 240
        while len(metrics(run_dir)) < 2:  # training, not only starting
            assert time.time() < deadline and process.poll() is None
            time.sleep(0.2)
        launcher = psutil.Process(process.pid)
        assert len(launcher.children()) == 2  # the ranks (their data workers below them)
        ranks = launcher.children(recursive=True)
        os.kill(process.pid, signal.SIGKILL)  # the launcher alone
        process.wait()
        _, alive = psutil.wait_procs(ranks, timeout=20)
        assert not alive, f"ranks outlived their launcher: {alive}"
        assert "the launcher (pid" in (tmp_path / "log").read_text()
    finally:
        kill_job(process)
