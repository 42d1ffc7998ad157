"""One job per run directory, and no rank outliving its launcher.

A job's rank 0 takes ``RUN_DIR/.lock`` before anything in the run directory is written: a
JSON file naming the holder (host, pid, start time, job, command). A second job on the same
directory refuses with an error naming that holder. A lock whose holder is gone is taken over
with a warning: on the holder's host, when its process no longer exists; from another host,
when its heartbeat (the file's time, renewed every ``HEARTBEAT_S``) is older than
``STALE_AFTER_S``. The lock is released when the job ends, with an error or not.

The other ranks take no lock: each waits until the lock names its own job (the launcher's
rendezvous, ``MASTER_ADDR:MASTER_PORT``, which no two live jobs share) and then goes on; when
rank 0 refuses, the launcher ends them.

Ranks started by a launcher (torchrun, the DeepSpeed launcher) watch it: when it dies (a
SIGKILL leaves them orphans) they exit, instead of training on and writing into the run
directory next to the job that a user restarts.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

logger = logging.getLogger("looplm.lock")

LOCK_NAME = ".lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0
"""A lock from another host whose heartbeat is older than this is taken over."""
WAIT_S = 600.0
"""How long a rank other than 0 waits for its job's lock."""


class RunLockedError(RuntimeError):
    """The run directory belongs to another live job."""


def job_id() -> str:
    """The job this process belongs to: its launcher's rendezvous address, or this process."""
    if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
        return f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    return f"{socket.gethostname()}/{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # torn by a crash while being written: nobody's


def describe(holder: dict) -> str:
    return (
        f"job {holder.get('job')} (host {holder.get('host')}, pid {holder.get('pid')}, "
        f"started {holder.get('started')})"
    )


def stale_reason(holder: dict, path: Path) -> str | None:
    """Why a lock's holder is gone (None: it may be alive)."""
    if not holder:
        return "the lock file is unreadable"
    if holder.get("host") == socket.gethostname():
        return None if _alive(int(holder.get("pid", -1))) else "its process no longer exists"
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return "it was released"
    if age > STALE_AFTER_S:
        return f"its heartbeat stopped {age:.0f} s ago"
    return None


class RunLock:
    """The lock of one run directory, held by rank 0 for the job's lifetime."""

    def __init__(self, run_dir: Path, rank: int):
        self.path = Path(run_dir) / LOCK_NAME
        self.rank = rank
        self.job = job_id()
        self.held = False
        self._stop = threading.Event()

    def acquire(self) -> RunLock:
        """Takes the lock (rank 0) or waits until this job holds it (other ranks)."""
        try:
            return self._acquire()
        except OSError as e:
            raise ValueError(f"run_dir {self.path.parent} is not writable: {e}") from e

    def _acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.rank != 0:
            self._wait_for_own_job()
            return self
        record = {
            "job": self.job,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
        }
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read(self.path)
                if holder is None:
                    continue  # released in between
                reason = stale_reason(holder, self.path)
                if reason is None:
                    raise RunLockedError(
                        f"run_dir {self.path.parent} is in use by {describe(holder)}; "
                        f"two jobs writing one run would interleave their metrics and "
                        f"overwrite each other's checkpoints. Stop that job, or remove "
                        f"{self.path} if it is certainly gone."
                    ) from None
                logger.warning("taking over the lock of %s: %s", describe(holder), reason)
                self._remove_if_unchanged(holder)
                continue
            with os.fdopen(fd, "w") as file:
                json.dump(record, file)
                file.flush()
                os.fsync(file.fileno())
            break
        self.held = True
        threading.Thread(target=self._heartbeat, name="run-lock-heartbeat", daemon=True).start()
        return self

    def _remove_if_unchanged(self, holder: dict) -> None:
        """Removes a stale lock, unless another job took it over in the meantime."""
        if _read(self.path) == holder:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def _wait_for_own_job(self) -> None:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            holder = _read(self.path)
            if holder and holder.get("job") == self.job:
                return
            time.sleep(0.1)
        raise RunLockedError(
            f"rank {self.rank}: rank 0 did not take the lock of {self.path.parent} within "
            f"{WAIT_S:.0f} s (held by {describe(_read(self.path) or {})})"
        )

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        if self.held:
            holder = _read(self.path)
            if holder and holder.get("pid") == os.getpid() and holder.get("job") == self.job:
                self.path.unlink()
            self.held = False


def launched() -> bool:
    """Whether a launcher started this process (it then dies with its launcher)."""
    return "LOCAL_RANK" in os.environ and "MASTER_PORT" in os.environ


def exit_with_launcher(poll_s: float = 1.0) -> None:
    """Ends this process when the launcher that started it is gone (its parent changes)."""
    if not launched():
        return
    launcher = os.getppid()

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(poll_s)
        logger.error("the launcher (pid %d) is gone: this rank stops", launcher)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(1)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()
