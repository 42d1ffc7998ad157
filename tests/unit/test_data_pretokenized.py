"""The pre-tokenized path gives the streamed path's tokens for the same documents, and a
damaged, unfinished or mismatched pre-tokenized directory is reported naming the file."""

from __future__ import annotations

import hashlib
import json
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

import data_pipelines.tokenized as tokenized
from data_pipelines import SourceConfig, build_data_loader, validate_data_config
from data_pipelines.tokenized import (
    META_FILE,
    OutputNotEmptyError,
    TokenShardError,
    open_token_shard,
    pretokenize,
    shard_name,
    token_source_problems,
)
from data_pipelines.tokenizer import embedded_tokenizer_path
from tests.unit.test_data_fixtures import (
    assert_same_batches,
    labelled_token_documents,
    make_config,
    take,
    text_documents,
    write_jsonl_shards,
    write_token_shards,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("window_tokens", [1_000_000, 30])
def test_pretokenized_shards_yield_the_streamed_batches(tmp_path, window_tokens):
    directory = write_jsonl_shards(tmp_path / "docs", text_documents(50), num_shards=3)
    with open(directory / "part-1.jsonl", "a") as file:
        file.write("{broken\n")
    streamed = SourceConfig(name="docs", paths=[str(directory)])
    cfg = make_config(tmp_path, [streamed], shuffle_window=4, window_tokens=window_tokens)
    progress = []
    counts = pretokenize(
        streamed,
        cfg,
        str(tmp_path / "tokens"),
        num_procs=1,
        progress=lambda *totals: progress.append(totals),
        progress_every_s=0.0,  # after every window of 4 documents
    )
    assert counts == {"malformed": 1}
    # Running totals, also in the middle of a shard, ending on what was written.
    assert progress == sorted(progress) and progress[-1][1:] == (50, 3)
    assert any(0 < documents < 17 and shards == 0 for _, documents, shards in progress)
    assert json.loads((tmp_path / "tokens" / META_FILE).read_text())["dtype"] == "uint16"
    shard = open_token_shard(str(tmp_path / "tokens" / "00000.bin"))
    assert isinstance(shard.tokens.base, np.memmap) and shard.document(0)[-1] == 0

    pretokenized = make_config(
        tmp_path,
        [SourceConfig(name="docs", paths=[str(tmp_path / "tokens")])],
        shuffle_window=4,
        window_tokens=window_tokens,
    )
    for rank in range(2):
        expected = take(build_data_loader(cfg, rank=rank, world_size=2, micro_batch_size=2), 12)
        actual = take(
            build_data_loader(pretokenized, rank=rank, world_size=2, micro_batch_size=2), 12
        )
        assert_same_batches(expected, actual)


def test_worker_processes_report_running_totals_that_end_on_what_they_wrote(tmp_path):
    directory = write_jsonl_shards(tmp_path / "docs", text_documents(20), num_shards=2)
    source = SourceConfig(name="docs", paths=[str(directory)])
    progress = []
    out = tmp_path / "tokens"
    pretokenize(source, make_config(tmp_path, [source]), str(out), num_procs=2,
                progress=lambda *totals: progress.append(totals), progress_every_s=0.01)  # fmt: skip
    written = sum(int(np.load(index)[-1]) for index in out.glob("*.idx.npy"))
    assert progress == sorted(progress) and progress[-1] == (written, 20, 2)


@pytest.mark.parametrize("procs", [1, 2])
def test_pretokenize_script_writes_readable_shards(tmp_path, procs):
    directory = write_jsonl_shards(tmp_path / "docs", text_documents(20), num_shards=2)
    out = tmp_path / "tokens"
    result = subprocess.run(
        [
            sys.executable,
            "scripts/pretokenize.py",
            "--paths",
            str(directory),
            "--procs",
            str(procs),
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr
    assert "2 shards, 20 documents" in result.stdout
    assert "leaked" not in result.stderr, "pool workers must exit on their own"
    cfg = make_config(tmp_path, [SourceConfig(name="docs", paths=[str(out)])])
    assert take(build_data_loader(cfg, rank=0, world_size=1, micro_batch_size=2), 1)


def write_shards_with_bad_lines(directory: Path, documents: list[str], num_shards: int) -> Path:
    """Documents dealt round-robin into JSONL shards, each with bad records (malformed, empty
    document, blank line, missing field) inserted at shard-dependent places mid-file, one at
    the very start of shard 1, and a run of 9 in shard 0 (longer than a window)."""
    directory.mkdir(parents=True, exist_ok=True)
    bad = ["{broken", json.dumps({"text": ""}), "", json.dumps({"other": 1})]
    for shard in range(num_shards):
        lines = [json.dumps({"text": text}) for text in documents[shard::num_shards]]
        for number, line in enumerate(bad):
            lines.insert(5 * number if shard == 1 else 2 + shard + 4 * number, line)
        if shard == 0:
            lines[8:8] = ["{broken"] * 9
        (directory / f"part-{shard}.jsonl").write_text("".join(line + "\n" for line in lines))
    return directory


@pytest.mark.parametrize("world_size, num_shards", [(1, 3), (3, 2), (3, 4)])
def test_bad_records_mid_shard_give_the_streamed_batches(tmp_path, world_size, num_shards):
    directory = write_shards_with_bad_lines(tmp_path / "docs", text_documents(60), num_shards)
    streamed = SourceConfig(name="docs", paths=[str(directory)])
    cfg = make_config(tmp_path, [streamed], shuffle_window=4, shuffle=True)
    counts = pretokenize(streamed, cfg, str(tmp_path / "tokens"), num_procs=1)
    assert sum(counts.values()) == 4 * num_shards + 9
    for shard in range(num_shards):
        lines = (directory / f"part-{shard}.jsonl").read_text().splitlines()
        index = open_token_shard(str(tmp_path / "tokens" / f"{shard_name(shard, num_shards)}.bin"))
        documents = [len(index.document(i)) for i in range(len(index))]
        assert len(documents) == len(lines), "one entry per record"
        assert [not length for length in documents] == [
            not line.startswith('{"text": "') or line == '{"text": ""}' for line in lines
        ]

    pretokenized = make_config(
        tmp_path,
        [SourceConfig(name="docs", paths=[str(tmp_path / "tokens")])],
        shuffle_window=4,
        shuffle=True,
    )
    for rank in range(world_size):
        expected = take(
            build_data_loader(cfg, rank=rank, world_size=world_size, micro_batch_size=2), 12
        )
        actual = take(
            build_data_loader(pretokenized, rank=rank, world_size=world_size, micro_batch_size=2),
            12,
        )
        assert_same_batches(expected, actual)


def test_a_shard_of_only_bad_records_reads_as_empty(tmp_path):
    directory = write_jsonl_shards(tmp_path / "docs", text_documents(20), num_shards=1)
    (directory / "part-1.jsonl").write_text("{broken\n\n")
    streamed = SourceConfig(name="docs", paths=[str(directory)])
    # Unshuffled, so that the empty shard never comes twice in a row (across an epoch's end),
    # which both paths would take for a source with nothing to read.
    cfg = make_config(tmp_path, [streamed], shuffle_window=4, shuffle=False)
    pretokenize(streamed, cfg, str(tmp_path / "tokens"), num_procs=1)
    assert os.path.getsize(tmp_path / "tokens" / "00001.bin") == 0
    assert len(open_token_shard(str(tmp_path / "tokens" / "00001.bin"))) == 2
    assert token_source_problems(str(tmp_path / "tokens"), "embedded") == []
    pretokenized = make_config(
        tmp_path,
        [SourceConfig(name="docs", paths=[str(tmp_path / "tokens")])],
        shuffle_window=4,
        shuffle=False,
    )
    expected = take(build_data_loader(cfg, rank=0, world_size=1, micro_batch_size=2), 20)
    actual = take(build_data_loader(pretokenized, rank=0, world_size=1, micro_batch_size=2), 20)
    assert_same_batches(expected, actual)


@pytest.mark.parametrize("count", [1, 11, 100_000, 100_001])
def test_shard_names_sort_in_input_order(count):
    names = [shard_name(index, count) for index in range(count)]
    assert sorted(names) == names
    assert [int(name) for name in names] == list(range(count))


def _swap_ends(index: Path) -> None:
    ends = np.load(index)
    ends[[1, 2]] = ends[[2, 1]]
    np.save(index, ends)


DAMAGES = {
    "truncated shard": ("00001.bin", lambda path: path.write_bytes(path.read_bytes()[:-2])),
    "shard of another index": ("00001.bin", lambda path: path.write_bytes(path.read_bytes() * 2)),
    "missing index": ("00001.idx.npy", Path.unlink),
    "unreadable index": ("00001.idx.npy", lambda path: path.write_bytes(path.read_bytes()[:-8])),
    "decreasing ends": ("00001.idx.npy", _swap_ends),
    "missing shard": ("00001.bin", Path.unlink),
    "missing tokens.json": (META_FILE, Path.unlink),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_shard_is_reported_naming_the_file(tmp_path, damage):
    directory = write_token_shards(tmp_path / "tokens", labelled_token_documents(30), num_shards=3)
    assert token_source_problems(str(directory), None) == []
    cfg = make_config(
        tmp_path, [SourceConfig(name="tokens", paths=[str(directory)], format="tokens")]
    )
    loader = build_data_loader(cfg, rank=0, world_size=1, micro_batch_size=2)
    name, damage_file = DAMAGES[damage]
    damage_file(directory / name)

    problems = token_source_problems(str(directory), None)
    assert len(problems) == 1 and str(directory / name) in problems[0], problems
    assert token_source_problems(str(directory / "*.bin"), None) == (
        [] if damage == "missing shard" else problems
    )
    # At start-up, validation names the file; a shard damaged later fails when opened.
    with pytest.raises(ValueError, match=re.escape(str(directory / name))):
        build_data_loader(cfg, rank=0, world_size=1, micro_batch_size=2)
    with pytest.raises((TokenShardError, FileNotFoundError), match=re.escape(str(directory))):
        take(loader, 20)


def test_an_interrupted_pretokenize_leaves_an_incomplete_directory(tmp_path, monkeypatch):
    directory = write_jsonl_shards(tmp_path / "docs", text_documents(20), num_shards=3)
    source = SourceConfig(name="docs", paths=[str(directory)])
    write_shard = tokenized._pretokenize_shard

    def interrupted(job):
        if job[1].endswith("00002"):
            raise KeyboardInterrupt
        return write_shard(job)

    monkeypatch.setattr(tokenized, "_pretokenize_shard", interrupted)
    out = tmp_path / "tokens"
    with pytest.raises(KeyboardInterrupt):
        pretokenize(source, make_config(tmp_path, [source]), str(out), num_procs=1)
    assert (out / "00001.bin").exists()
    problems = token_source_problems(str(out), "embedded")
    assert len(problems) == 1 and str(out / META_FILE) in problems[0]
    assert "incomplete" in problems[0]


def test_pretokenize_refuses_a_used_directory_and_overwrite_replaces_it(tmp_path):
    out = tmp_path / "tokens"
    old = SourceConfig(
        name="old", paths=[str(write_jsonl_shards(tmp_path / "old", text_documents(30, "old"), 3))]
    )
    pretokenize(old, make_config(tmp_path, [old]), str(out), num_procs=1)
    (out / "notes.txt").write_text("kept")
    new = SourceConfig(
        name="new", paths=[str(write_jsonl_shards(tmp_path / "new", text_documents(20, "new"), 2))]
    )
    cfg = make_config(tmp_path, [new])
    with pytest.raises(OutputNotEmptyError, match="not empty"):
        pretokenize(new, cfg, str(out), num_procs=1)
    assert json.loads((out / META_FILE).read_text())["source"] == "old"

    pretokenize(new, cfg, str(out), num_procs=1, overwrite=True)
    assert sorted(path.name for path in out.iterdir()) == [
        "00000.bin",
        "00000.idx.npy",
        "00001.bin",
        "00001.idx.npy",
        "notes.txt",
        META_FILE,
    ]
    assert token_source_problems(str(out), "embedded") == []
    pretokenized = make_config(tmp_path, [SourceConfig(name="new", paths=[str(out)])])
    expected = take(build_data_loader(cfg, rank=0, world_size=1, micro_batch_size=2), 8)
    actual = take(build_data_loader(pretokenized, rank=0, world_size=1, micro_batch_size=2), 8)
    assert_same_batches(expected, actual)


def test_pretokenize_script_needs_overwrite_for_a_used_directory(tmp_path, monkeypatch, capsys):
    directory = write_jsonl_shards(tmp_path / "docs", text_documents(10), num_shards=1)
    out = tmp_path / "tokens"
    out.mkdir()
    (out / "00007.bin").write_bytes(b"stale")

    def run(*flags):
        argv = ["pretokenize.py", "--paths", str(directory), "--procs", "1", "--out", str(out)]
        monkeypatch.setattr(sys, "argv", argv + list(flags))
        runpy.run_path(str(REPO / "scripts" / "pretokenize.py"), run_name="__main__")

    with pytest.raises(SystemExit, match="--overwrite"):
        run()
    run("--overwrite")
    assert "1 shards, 10 documents" in capsys.readouterr().out
    assert sorted(path.name for path in out.iterdir()) == ["00000.bin", "00000.idx.npy", META_FILE]


def _tokenizer_with_two_ids_swapped(path: Path) -> Path:
    data = json.loads(embedded_tokenizer_path().read_text())
    vocab = data["model"]["vocab"]
    (first, first_id), (second, second_id) = list(vocab.items())[300:302]
    vocab[first], vocab[second] = second_id, first_id
    path.write_text(json.dumps(data))
    return path


def test_tokens_json_fingerprints_the_tokenizer_and_a_mismatch_is_reported(tmp_path):
    directory = write_jsonl_shards(tmp_path / "docs", text_documents(10), num_shards=1)
    source = SourceConfig(name="docs", paths=[str(directory)])
    out = tmp_path / "tokens"
    pretokenize(source, make_config(tmp_path, [source]), str(out), num_procs=1)
    meta = json.loads((out / META_FILE).read_text())
    reference = Tokenizer.from_file(str(embedded_tokenizer_path()))
    assert meta["tokenizer_sha256"] == hashlib.sha256(reference.to_str().encode()).hexdigest()
    assert meta["vocab_size"] == reference.get_vocab_size()

    other = str(_tokenizer_with_two_ids_swapped(tmp_path / "other.json"))
    assert Tokenizer.from_file(other).get_vocab_size() == meta["vocab_size"]
    assert token_source_problems(str(out), "embedded") == []
    assert token_source_problems(str(out), str(embedded_tokenizer_path())) == []
    assert token_source_problems(str(out), None) == []
    problems = token_source_problems(str(out), other)
    assert len(problems) == 1 and str(out / META_FILE) in problems[0] and other in problems[0]

    for key in ("tokenizer_sha256", "vocab_size"):
        del meta[key]
    (out / META_FILE).write_text(json.dumps(meta))
    assert token_source_problems(str(out), other) == [], "tokens.json without a fingerprint"


def test_shards_written_with_another_eos_token_fail_validation(tmp_path):
    directory = write_jsonl_shards(tmp_path / "docs", text_documents(10), num_shards=1)
    source = SourceConfig(name="docs", paths=[str(directory)])
    out = tmp_path / "tokens"
    pretokenize(source, make_config(tmp_path, [source], eos_token="<|im_end|>"), str(out), 1)
    tokens = SourceConfig(name="tokens", paths=[str(out)], format="tokens")
    assert validate_data_config(make_config(tmp_path, [tokens], eos_token="<|im_end|>")) == []
    problems = validate_data_config(make_config(tmp_path, [tokens]))
    assert problems == [
        f"data.sources[0] (tokens): {out / META_FILE}: the shards end documents with "
        "'<|im_end|>', not data.eos_token '<|endoftext|>'"
    ]
