"""Outputs are written whole or not at all: a failure at any point leaves the previous file or
folder as it was and no partial copy beside it."""

import os
import stat

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
