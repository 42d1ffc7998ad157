"""Start-up clean-up of interrupted checkpoint writes (single process, no engine needed)."""

import json
import logging
from pathlib import Path

import pytest
import torch

from train.checkpointing import (
    COMPLETE,
    CheckpointManager,
    manifest_problem,
    read_json,
    unreadable_file,
    write_manifest,
)
from train.metrics import truncate_jsonl_after
from train.validation import EVAL_FILE, read_records


def _write(folder: Path, complete: bool, step: int) -> Path:
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(f'{{"step": {step}}}')
    if complete:
        (folder / COMPLETE).write_text(f"{step}\n")
    return folder


def test_a_complete_write_is_moved_into_place_and_an_incomplete_one_removed(tmp_path):
    root = tmp_path / "checkpoints"
    _write(root / "step_00000002", True, 2)
    _write(root / ".step_00000003.partial", True, 3)  # crashed between marker and rename
    _write(root / ".step_00000004.partial", False, 4)  # crashed before the marker
    manager = CheckpointManager(tmp_path, keep_last=5, rank=0)
    manager.remove_partial()
    assert [p.name for p in manager.complete()] == ["step_00000002", "step_00000003"]
    assert manager.trainer_state(manager.latest()) == {"step": 3}
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002", "step_00000003"]


def test_a_crash_while_replacing_a_checkpoint_of_the_same_step_keeps_the_new_write(tmp_path):
    root = tmp_path / "checkpoints"
    # The old step-3 checkpoint was renamed aside, the new write not yet renamed into place.
    _write(root / ".step_00000003.replaced", True, 30)
    _write(root / ".step_00000003.partial", True, 3)
    manager = CheckpointManager(tmp_path, keep_last=5, rank=0)
    manager.remove_partial()
    assert sorted(p.name for p in root.iterdir()) == ["step_00000003"]
    assert manager.trainer_state(root / "step_00000003") == {"step": 3}


def test_a_write_is_never_moved_over_an_existing_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    _write(root / "step_00000003", True, 3)
    _write(root / ".step_00000003.partial", True, 33)
    manager = CheckpointManager(tmp_path, keep_last=5, rank=0)
    manager.remove_partial()
    assert sorted(p.name for p in root.iterdir()) == ["step_00000003"]
    assert manager.trainer_state(root / "step_00000003") == {"step": 3}


def test_moving_into_place_replaces_a_checkpoint_of_the_same_step(tmp_path):
    root = tmp_path / "checkpoints"
    final = _write(root / "step_00000003", True, 3)
    partial = _write(root / ".step_00000003.partial", True, 33)
    CheckpointManager(tmp_path, keep_last=5, rank=0)._move_into_place(partial, final)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000003"]
    assert (final / "trainer_state.json").read_text() == '{"step": 33}'


def test_a_torn_last_log_line_is_dropped_and_a_damaged_earlier_one_named(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    records = [json.dumps({"step": step, "loss": 1.0 / step}) for step in range(1, 6)]
    path.write_text("\n".join(records) + "\n" + records[0][:9])  # a write cut by a full disk
    with caplog.at_level(logging.WARNING):
        truncate_jsonl_after(path, 3)
    assert path.read_text() == "".join(r + "\n" for r in records[:3])
    assert "dropping its torn last line (9 characters)" in caplog.text
    truncate_jsonl_after(path, 3)  # idempotent
    assert path.read_text() == "".join(r + "\n" for r in records[:3])

    path.write_text(records[0] + "\n" + '{"step": 2, "lo\n' + records[2] + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: not a JSON record"):
        truncate_jsonl_after(path, 3)


def test_the_manifest_catches_a_truncated_corrupted_or_missing_file(tmp_path):
    folder = tmp_path / "step_00000002"
    (folder / "deepspeed").mkdir(parents=True)
    (folder / "deepspeed" / "model.pt").write_bytes(bytes(range(256)) * 64)
    (folder / "rank_00000.pt").write_bytes(b"rank state")
    write_manifest(folder)
    assert manifest_problem(folder) is None
    model = folder / "deepspeed" / "model.pt"
    data = bytearray(model.read_bytes())
    data[1000] ^= 1  # one flipped bit, same size
    model.write_bytes(bytes(data))
    assert manifest_problem(folder) == f"{model} does not match its checksum (corrupted)"
    model.write_bytes(bytes(data[:100]))
    assert manifest_problem(folder) == f"{model} has 100 bytes, the manifest says 16384"
    model.unlink()
    assert manifest_problem(folder) == f"{model} is missing"
    (folder / "MANIFEST.json").unlink()
    assert manifest_problem(folder) is None  # a checkpoint from before manifests


def test_damaged_checkpoints_are_set_aside_and_unknown_names_ignored(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        write_manifest(_write(root / f"step_{step:08d}", True, step))
    (root / "step_00000008.bak").mkdir()
    (root / "step_00000006" / "trainer_state.json").write_text("{}")
    (root / "step_00000004" / "trainer_state.json").write_text('{"step": 5}')
    manager = CheckpointManager(tmp_path, keep_last=5, rank=0)
    with caplog.at_level(logging.WARNING):
        manager.report_unknown()
        manager.set_aside_damaged()
    assert manager.latest() == root / "step_00000002"
    assert sorted(p.name for p in root.iterdir()) == [
        ".step_00000004.damaged",
        ".step_00000006.damaged",
        "step_00000002",
        "step_00000008.bak",
    ]
    assert "step_00000008.bak: not a checkpoint" in caplog.text
    assert "checkpoint step_00000006 is damaged" in caplog.text


def test_a_damaged_trainer_state_is_named(tmp_path):
    folder = _write(tmp_path / "checkpoints" / "step_00000004", complete=True, step=4)
    state = folder / "trainer_state.json"
    state.write_text('{"step": 4, "tok')
    with pytest.raises(ValueError, match=f"{state} cannot be read as JSON"):
        CheckpointManager(tmp_path, keep_last=2, rank=0).trainer_state(folder)
    with pytest.raises(ValueError, match="cannot be read as JSON"):
        read_json(tmp_path / "absent.json")


def test_the_torch_file_that_does_not_open_is_named(tmp_path):
    folder = tmp_path / "step_00000004"
    (folder / "deepspeed").mkdir(parents=True)
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_optim_states.pt"):
        torch.save({"weights": torch.arange(1000.0)}, folder / "deepspeed" / name)
    torch.save({"rng": 1}, folder / "rank_00000.pt")
    assert unreadable_file(folder) is None
    broken = folder / "deepspeed" / "zero_pp_rank_0_optim_states.pt"
    broken.write_bytes(broken.read_bytes()[:300])
    assert unreadable_file(folder).startswith(f"{broken}: ")


def test_a_damaged_evaluation_record_is_named_with_its_line(tmp_path):
    (tmp_path / EVAL_FILE).write_text('{"step": 1}\n{"step": 2\n{"step": 3}\n')
    with pytest.raises(ValueError, match=f"{tmp_path / EVAL_FILE}:2 is not a JSON record"):
        read_records(tmp_path)
