"""Run checkpoints that are complete or ignored.

``RUN_DIR/checkpoints/step_00000100/`` holds DeepSpeed's checkpoint (``deepspeed/``), every
rank's own state (``rank_00000.pt``: data-loader state, RNG states) and the trainer's state
(``trainer_state.json``). All of it is written into ``.step_00000100.partial/`` first; only
when every rank has written its part does rank 0 write the ``COMPLETE`` marker and rename the
folder into place. A crash at any moment leaves either a complete checkpoint or a partial
folder: restarts remove one without the marker, and move one with it (a crash between the
marker and the rename) into place.

Before the marker, rank 0 fsyncs every file and writes ``MANIFEST.json`` (each file's size and
CRC-32); after the rename it fsyncs the folder. At start-up the newest checkpoint is verified
against its manifest: a damaged one (a truncated or corrupted file) is named, moved aside to
``.step_N.damaged`` (never deleted) and the next older one is tried. Names in ``checkpoints/``
that are not checkpoints are ignored with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.checkpoint.constants import (
    UNIVERSAL_CHECKPOINT_INFO,
    UNIVERSAL_CHECKPOINT_VERSION_KEY,
    UNIVERSAL_CHECKPOINT_VERSION_VALUE,
)

from looplm import LoopLMConfig

logger = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
MANIFEST = "MANIFEST.json"
DAMAGED = ".damaged"
_STEP_NAME = re.compile(r"step_(\d{8})")
UNIVERSAL_TAG = "deepspeed_universal"
# Lets DeepSpeed's ds_to_universal convert the checkpoint for another number of ranks.
_UNIVERSAL_INFO = {
    UNIVERSAL_CHECKPOINT_INFO: {
        UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE
    }
}
DEEPSPEED_TAG = "deepspeed"
MODEL_CONFIG = "model_config.json"
_PREFIX = "step_"


def step_dir_name(step: int) -> str:
    return f"{_PREFIX}{step:08d}"


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_write(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(folder: Path) -> None:
    """Fsyncs every file under ``folder`` and records its size and CRC-32 in the manifest."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        _fsync_path(path)
        files[str(path.relative_to(folder))] = {"size": path.stat().st_size, "crc32": _crc32(path)}
    for directory in sorted({p for p in folder.rglob("*") if p.is_dir()} | {folder}):
        _fsync_path(directory)
    _fsync_write(folder / MANIFEST, json.dumps({"files": files}, indent=1))


def read_json(path: Path):
    """The JSON in `path`; a file that cannot be read or parsed is an error naming it."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"{path} cannot be read as JSON: {error}") from error


def unreadable_file(folder: Path) -> str | None:
    """The first torch file under `folder` that does not open (a truncated or corrupted zip
    archive), with the reason; None when all open. Memory-mapped, so only the archive's
    directory is read."""
    for path in sorted(Path(folder).rglob("*.pt")):
        try:
            torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except Exception as error:
            return f"{path}: {error}"
    return None


def manifest_problem(folder: Path) -> str | None:
    """The first file of a checkpoint that does not match its manifest (None: all match, or a
    checkpoint written before manifests existed)."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return None
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"{manifest} is unreadable ({e})"
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != expected["size"]:
            return f"{path} has {size} bytes, the manifest says {expected['size']}"
        if _crc32(path) != expected["crc32"]:
            return f"{path} does not match its checksum (corrupted)"
    return None


def _all_ok(ok: bool) -> bool:
    flag = torch.tensor([1 if ok else 0])
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _save_deepspeed(engine, directory: Path) -> Exception | None:
    """DeepSpeed's save on this rank; returns the error if its writes failed.

    DeepSpeed's save ends with a barrier that a rank whose write raised never reaches; that
    rank joins it here, so every rank goes on to agree on the outcome in step."""
    try:
        engine.save_checkpoint(str(directory), tag=DEEPSPEED_TAG, client_state=_UNIVERSAL_INFO)
    except Exception as e:  # a full disk: OSError, or torch.save's RuntimeError
        _barrier()
        return e
    return None


class CheckpointManager:
    """Saves, finds and prunes the complete checkpoints of one run directory."""

    def __init__(
        self,
        run_dir: str | Path,
        keep_last: int,
        rank: int,
        interrupt: Callable[[str, int], None] | None = None,
    ):
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.rank = rank
        self._interrupt = interrupt or (lambda moment, step: None)
        """Called at each moment a crash could strike a write (``train.faults``)."""

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [
            p
            for p in self.root.iterdir()
            if _STEP_NAME.fullmatch(p.name) and (p / COMPLETE).is_file()
        ]
        return sorted(found, key=lambda p: int(p.name[len(_PREFIX) :]))

    def report_unknown(self) -> None:
        """Warns of entries of ``checkpoints/`` that are neither checkpoints nor this manager's
        own dot-folders (they are ignored)."""
        if self.rank != 0 or not self.root.is_dir():
            return
        for p in sorted(self.root.iterdir()):
            if not _STEP_NAME.fullmatch(p.name) and not p.name.startswith("."):
                logger.warning("ignoring %s: not a checkpoint (step_NNNNNNNN)", p)

    def set_aside_damaged(self) -> None:
        """Verifies the newest complete checkpoint against its manifest (rank 0, at start-up);
        a damaged one is moved aside, named, and the next older one verified in turn."""
        if self.rank == 0:
            for path in reversed(self.complete()):
                problem = manifest_problem(path)
                if problem is None:
                    break
                aside = path.with_name(f".{path.name}{DAMAGED}")
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(path, aside)
                logger.error(
                    "checkpoint %s is damaged: %s. Moved aside to %s; resuming from the newest "
                    "checkpoint before it",
                    path.name,
                    problem,
                    aside,
                )
        _barrier()

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def remove_partial(self) -> None:
        """Clears what an interrupted save left behind (rank 0, at start-up): a write that
        reached its ``COMPLETE`` marker is moved into place, any other is removed."""
        if self.rank == 0 and self.root.is_dir():
            for p in sorted(self.root.glob(".*.partial")):
                final = self.root / p.name[1 : -len(".partial")]
                if (p / COMPLETE).is_file() and not final.exists():
                    os.replace(p, final)
                    logger.warning("%s was complete but not yet in place: moved to %s", p, final)
                else:
                    shutil.rmtree(p, ignore_errors=True)
                    logger.info("removed the interrupted checkpoint write %s", p)
            for p in self.root.glob(".*.replaced"):  # its successor is in place by now
                shutil.rmtree(p, ignore_errors=True)
        _barrier()

    def save(
        self, engine, step: int, trainer_state: dict, rank_state: dict, model_config: LoopLMConfig
    ) -> Path:
        """Writes the checkpoint of ``step`` on every rank; raises if any rank failed, keeping
        the previous checkpoints untouched."""
        final = self.root / step_dir_name(step)
        partial = self.root / f".{final.name}.partial"
        if self.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        _barrier()
        error = _save_deepspeed(engine, partial)
        self._interrupt("mid_write", step)
        if error is None:
            try:
                torch.save(rank_state, partial / f"rank_{self.rank:05d}.pt")
            except Exception as e:  # a full disk: OSError, or torch.save's RuntimeError
                error = e
        if not _all_ok(error is None):
            if self.rank == 0:
                shutil.rmtree(partial, ignore_errors=True)
            previous = self.latest()
            raise RuntimeError(
                f"the checkpoint of step {step} could not be written ({error or 'on another rank'}); "
                f"the last complete checkpoint is kept: {previous}"
            ) from error
        if self.rank == 0:
            model_config.save(partial / MODEL_CONFIG)
            _fsync_write(partial / "trainer_state.json", json.dumps(trainer_state, indent=2))
            write_manifest(partial)
            self._interrupt("before_complete", step)
            _fsync_write(partial / COMPLETE, f"{step}\n")
            self._interrupt("before_rename", step)
            self._move_into_place(partial, final)
            _fsync_path(self.root)
            self._prune()
        _barrier()
        return final

    def _move_into_place(self, partial: Path, final: Path) -> None:
        """Renames the finished write to its step's name. A checkpoint of the same step (saved
        again after a resume) is first renamed aside, so a crash at any point leaves the
        complete write for the next start-up to move into place."""
        replaced = final.with_name(f".{final.name}.replaced")
        if final.exists():
            shutil.rmtree(replaced, ignore_errors=True)
            os.replace(final, replaced)
        os.replace(partial, final)
        shutil.rmtree(replaced, ignore_errors=True)

    def _prune(self) -> None:
        """Keeps the newest keep_last checkpoints, and the newest good one (a rollback's
        target) even when it is older."""
        done = self.complete()
        keep = set(done[-self.keep_last :])
        good = self.latest_good()
        if good is not None:
            keep.add(good)
        for old in done:
            if old not in keep:
                shutil.rmtree(old, ignore_errors=True)

    def trainer_state(self, path: Path) -> dict:
        return read_json(path / "trainer_state.json")

    def saved_world_size(self, path: Path) -> int:
        return self.trainer_state(path)["world_size"]

    def latest_good(self, before_step: int | None = None) -> Path | None:
        """The newest complete checkpoint saved with no spike in its recent past, of a step
        before ``before_step``."""
        for path in reversed(self.complete()):
            state = self.trainer_state(path)
            if state.get("good", True) and (before_step is None or state["step"] < before_step):
                return path
        return None

    def load_weights(self, engine, path: Path, world_size: int) -> None:
        """Restores only the engine (weights and optimizer state) from ``path``."""
        if self.saved_world_size(path) != world_size:
            self._convert_to_universal(path)
            engine.load_checkpoint(str(path), tag=UNIVERSAL_TAG, load_module_strict=True)
        else:
            engine.load_checkpoint(str(path), tag=DEEPSPEED_TAG, load_module_strict=True)

    def load(
        self,
        engine,
        path: Path,
        world_size: int,
        model_config: LoopLMConfig,
        may_differ: tuple[str, ...] = (),
    ) -> dict | None:
        """Restores the engine from ``path``; returns this rank's state.

        The saved model config must equal ``model_config`` but in the fields ``may_differ``
        (those a curriculum changes between stages). A checkpoint of another number of ranks
        is loaded through DeepSpeed's universal format (the engine must have been built with
        ``load_universal``); the rank states then do not apply and None is returned for them.
        """
        saved, current = LoopLMConfig.load(path / MODEL_CONFIG).to_dict(), model_config.to_dict()
        differences = sorted(
            k for k, v in current.items() if saved.get(k) != v and k not in may_differ
        )
        if differences:
            raise ValueError(
                f"{path} holds a checkpoint of another model (differs in {differences}); "
                "use a new run_dir, or the same model settings to resume"
            )
        try:
            self.load_weights(engine, path, world_size)
        except Exception as e:
            bad = unreadable_file(path)
            where = f"; {bad}" if bad else ""
            raise RuntimeError(f"loading the DeepSpeed state of {path} failed: {e}{where}") from e
        if self.saved_world_size(path) != world_size:
            return None
        rank_file = path / f"rank_{self.rank:05d}.pt"
        try:
            return torch.load(rank_file, weights_only=False)
        except Exception as e:
            raise RuntimeError(f"{rank_file} cannot be read: {e}") from e

    def _convert_to_universal(self, path: Path) -> None:
        """Rank 0 converts the checkpoint to DeepSpeed's universal format, once."""
        target = path / UNIVERSAL_TAG
        if self.rank == 0 and not (target / COMPLETE).is_file():
            shutil.rmtree(target, ignore_errors=True)
            command = [
                sys.executable,
                "-m",
                "deepspeed.checkpoint.ds_to_universal",
                "--input_folder",
                str(path / DEEPSPEED_TAG),
                "--output_folder",
                str(target),
                "--num_extract_workers",
                "1",
                "--num_merge_workers",
                "1",
            ]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(
                    f"converting {path} to the universal format failed:\n{result.stderr[-2000:]}"
                )
            _fsync_write(target / COMPLETE, "")
        _barrier()
