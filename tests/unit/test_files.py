"""Outputs are written whole or not at all: a failure at any point leaves the previous file or
folder as it was and no partial copy beside it."""

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from looplm import files
from looplm.files import publishing, write_atomically


def names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_a_file_is_replaced_whole(tmp_path):
    path = tmp_path / "counts.json"
    write_atomically(path, "old\n")
    write_atomically(path, b"new\n")
    assert path.read_bytes() == b"new\n"
    assert names(tmp_path) == ["counts.json"]


def test_a_failed_file_write_keeps_the_old_file_and_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "counts.json"
    write_atomically(path, "old\n")

    def no_space(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "replace", no_space)
    with pytest.raises(OSError, match="No space"):
        write_atomically(path, "new\n")
    assert path.read_text() == "old\n"
    assert names(tmp_path) == ["counts.json"]


def test_a_folder_appears_only_when_complete_and_replaces_the_old_one(tmp_path):
    out = tmp_path / "export"
    with publishing(out) as partial:
        (partial / "a.txt").write_text("1")
    with publishing(out) as partial:
        assert names(tmp_path) == ["export", partial.name]
        assert names(out) == ["a.txt"]  # the old one is whole until the new one is
        (partial / "b.txt").write_text("2")
    assert names(out) == ["b.txt"]
    assert names(tmp_path) == ["export"]


def test_an_error_while_writing_a_folder_keeps_the_old_one_and_leaves_nothing(tmp_path):
    out = tmp_path / "export"
    with publishing(out) as partial:
        (partial / "a.txt").write_text("1")
    with pytest.raises(ValueError, match="bad gate"), publishing(out) as partial:
        (partial / "b.txt").write_text("2")
        raise ValueError("bad gate")
    assert names(out) == ["a.txt"]
    assert names(tmp_path) == ["export"]


def test_without_replace_the_first_writer_wins(tmp_path):
    out = tmp_path / "shards"
    with publishing(out, replace=False) as first:
        with publishing(out, replace=False) as second:  # a second process, racing the first
            (second / "part.jsonl").write_text("second")
        (first / "part.jsonl").write_text("first")
    assert (out / "part.jsonl").read_text() == "second"
    assert names(tmp_path) == ["shards"]


def test_a_published_folder_is_readable_as_the_umask_allows(tmp_path):
    umask = os.umask(0o022)
    try:
        with publishing(tmp_path / "model") as partial:
            secret = partial / "model.safetensors"
            secret.write_bytes(b"\0")
            secret.chmod(0o600)  # as safetensors creates it
    finally:
        os.umask(umask)
    mode = stat.S_IMODE((tmp_path / "model" / "model.safetensors").stat().st_mode)
    assert mode == 0o644
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == 0o755


def test_a_failed_final_rename_puts_the_old_folder_back_and_keeps_the_new_copy(
    tmp_path, monkeypatch
):
    out, shards = tmp_path / "export", tmp_path / "shards"
    with publishing(out) as partial:
        (partial / "a.txt").write_text("old")
    rename = os.rename

    def no_rename_into_place(src, dst):
        if Path(dst) in (out, shards) and ".replaced" not in str(src):
            raise OSError(5, "Input/output error")
        rename(src, dst)

    monkeypatch.setattr(files.os, "rename", no_rename_into_place)
    with pytest.raises(OSError, match="the new copy is in") as error:
        with publishing(out) as partial:
            (partial / "a.txt").write_text("new")
    assert (out / "a.txt").read_text() == "old"
    assert (partial / "a.txt").read_text() == "new" and str(partial) in str(error.value)
    with pytest.raises(OSError, match="the new copy is in"):  # not taken for a first writer
        with publishing(shards, replace=False) as partial:
            (partial / "part.jsonl").write_text("x")


def test_what_a_killed_writer_left_is_removed_and_a_live_ones_is_not(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    stale = tmp_path / f"export{files.PARTIAL}{host}-{dead.pid}-0000abcd"
    live = tmp_path / f"export{files.PARTIAL}{host}-{os.getpid()}-0000abcd"
    other_host = tmp_path / f"export{files.PARTIAL}elsewhere-{dead.pid}-0000abcd"
    for folder in (stale, live, other_host):
        folder.mkdir()
    (tmp_path / f"counts.json{files.PARTIAL}{host}-{dead.pid}-0000abcd").write_text("{")
    with publishing(tmp_path / "export") as partial:
        (partial / "a.txt").write_text("1")
    write_atomically(tmp_path / "counts.json", "{}")
    assert names(tmp_path) == sorted(["counts.json", "export", live.name, other_host.name])
