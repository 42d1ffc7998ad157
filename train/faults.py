"""Crashes at chosen moments, to rehearse recovery on a real run (``faults.*`` settings).

A test that kills a job from outside cannot time its signal against a write that takes a few
milliseconds; these faults make the moment certain. ``kill`` ends the rank with SIGKILL from
inside, as a machine failure would; ``pause`` logs a line and waits, so that the test's own
SIGKILL of the whole job lands exactly there.
"""

from __future__ import annotations

import logging
import os
import signal
import time

from train.config import FaultSettings

logger = logging.getLogger("looplm.faults")

PAUSED = "fault: paused"
"""The start of the line a paused rank logs (tests wait for it)."""


def crash(action: str, where: str, rank: int) -> None:
    """Ends this rank now (``kill``) or waits until it is killed (``pause``)."""
    if action == "kill":
        logger.warning("fault: rank %d kills itself %s", rank, where)
        os.kill(os.getpid(), signal.SIGKILL)
    logger.warning("%s on rank %d %s; waiting to be killed", PAUSED, rank, where)
    for handler in logging.getLogger().handlers:
        handler.flush()
    launcher = os.getppid()
    while os.getppid() == launcher:  # a rank whose launcher was killed is an orphan: it ends
        time.sleep(0.2)
    os._exit(1)


class CheckpointFault:
    """Interrupts the checkpoint write of one step at one moment, on one rank or all."""

    def __init__(self, faults: FaultSettings, rank: int):
        self.faults, self.rank = faults, rank

    def __call__(self, moment: str, step: int) -> None:
        f = self.faults
        if step != f.checkpoint_fault_at_step or moment != f.checkpoint_fault_moment:
            return
        if f.checkpoint_fault_rank is not None and f.checkpoint_fault_rank != self.rank:
            return
        crash(
            f.checkpoint_fault_action,
            f"in the checkpoint write of step {step} ({moment})",
            self.rank,
        )


def pause_after(faults: FaultSettings, step: int, rank: int) -> None:
    """Waits to be killed once ``step`` is done, when ``faults.pause_after_step`` says so."""
    if step == faults.pause_after_step:
        crash("pause", f"after step {step}", rank)
