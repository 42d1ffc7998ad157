"""Formats and bad input."""

from __future__ import annotations

import glob
import gzip
import json
import logging
import os
import re
import sysconfig

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from data_pipelines import SourceConfig, build_data_loader
from data_pipelines.readers import (
    BadInputError,
    BadInputLog,
    ReadOptions,
    ShardReader,
    shard_dataset,
)
from data_pipelines.shards import Shard, _stdlib_files, epoch_pieces
from data_pipelines.tokenizer import load_tokenizer
from tests.unit.test_data_fixtures import (
    assert_same_batches,
    make_config,
    take,
    text_documents,
    write_jsonl,
)

DOCUMENTS = text_documents(30)


def write_format(tmp_path, fmt: str) -> str:
    lines = "".join(
        json.dumps({"text": doc, "id": i}) + "\n" for i, doc in enumerate(DOCUMENTS)
    ).encode()
    table = pa.table({"id": list(range(len(DOCUMENTS))), "text": DOCUMENTS})
    if fmt == "json.gz":
        path = tmp_path / "docs.jsonl.gz"
        path.write_bytes(gzip.compress(lines))
    elif fmt == "json.zst":
        path = tmp_path / "docs.jsonl.zst"
        path.write_bytes(zstandard.ZstdCompressor().compress(lines))
    elif fmt == "parquet":
        path = tmp_path / "docs.parquet"
        pq.write_table(table, path, row_group_size=7)
    elif fmt == "arrow":
        path = tmp_path / "docs.arrow"
        with pa.ipc.new_stream(path, table.schema) as writer:
            for batch in table.to_batches(max_chunksize=6):
                writer.write_batch(batch)
    elif fmt == "text":
        path = tmp_path / "docs.txt"
        path.write_text("\n\n".join(DOCUMENTS) + "\n")
    else:
        path = tmp_path / "docs.jsonl"
        path.write_bytes(lines)
    return str(path)


def loader_for(tmp_path, path: str, fmt: str = "auto", **overrides):
    cfg = make_config(tmp_path, [SourceConfig(name="docs", paths=[path], format=fmt)], **overrides)
    return build_data_loader(cfg, rank=0, world_size=1, micro_batch_size=2)


@pytest.mark.parametrize("fmt", ["json.gz", "json.zst", "parquet", "arrow", "text"])
def test_every_format_gives_the_jsonl_tokens(tmp_path, fmt):
    reference = take(loader_for(tmp_path, write_format(tmp_path, "jsonl"), shuffle=False), 6)
    assert_same_batches(
        reference, take(loader_for(tmp_path, write_format(tmp_path, fmt), shuffle=False), 6)
    )


@pytest.mark.parametrize("fmt", ["jsonl", "json.gz", "json.zst", "parquet", "arrow", "text"])
def test_resume_inside_row_groups_and_compressed_files(tmp_path, fmt):
    path = write_format(tmp_path, fmt)
    reference = take(loader_for(tmp_path, path, shuffle_window=5), 10)
    first = loader_for(tmp_path, path, shuffle_window=5)
    resumed = take(first, 4)
    second = loader_for(tmp_path, path, shuffle_window=5)
    second.load_state_dict(first.state_dict())
    assert_same_batches(reference, resumed + take(second, 6))


def count_load_dataset_calls(monkeypatch) -> list[dict]:
    """Wraps `datasets.load_dataset` (the real one still runs) and records each call."""
    calls, real = [], datasets.load_dataset

    def load_dataset(path, **kwargs):
        dataset = real(path, **kwargs)
        calls.append({"builder": path, "type": type(dataset), **kwargs})
        return dataset

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


@pytest.mark.parametrize(
    ("fmt", "builder"),
    [
        ("jsonl", "text"),
        ("json.gz", "text"),
        ("text", "text"),
        ("parquet", "parquet"),
        ("arrow", "arrow"),
    ],
)
def test_shards_are_streamed_through_datasets_once_per_shard(tmp_path, monkeypatch, fmt, builder):
    path = write_format(tmp_path, fmt)
    calls = count_load_dataset_calls(monkeypatch)
    take(loader_for(tmp_path, path, shuffle_window=5), 4)
    assert len(calls) == 1, "every window of the shard is read from one open stream"
    assert calls[0]["builder"] == builder
    assert calls[0]["data_files"] == [path]
    assert calls[0]["streaming"] is True and calls[0]["split"] == "train"
    assert calls[0]["type"] is datasets.IterableDataset
    dataset = shard_dataset(Shard(path, fmt), ReadOptions("text"))
    assert isinstance(dataset, datasets.IterableDataset)


def test_builtin_sources_are_streamed_through_datasets(tmp_path, monkeypatch):
    calls = count_load_dataset_calls(monkeypatch)
    sources = [
        SourceConfig(name="qa", paths=["synthetic://multi_hop?num_docs=20&shards=2"]),
        SourceConfig(name="code", paths=["stdlib://json/*.py"]),
    ]
    cfg = make_config(tmp_path, sources, shuffle_window=4)
    take(build_data_loader(cfg, rank=0, world_size=1, micro_batch_size=2), 4)
    files = {call["data_files"][0] for call in calls}
    assert any(file.endswith(".jsonl") for file in files)
    assert any(file.endswith(".py") for file in files)
    assert all(call["streaming"] and call["type"] is datasets.IterableDataset for call in calls)


@pytest.mark.parametrize("pattern", ["**/*.py", "**/json/*.py", "json/*.py", "**/*"])
def test_the_standard_library_listing_is_a_recursive_glob_without_site_packages(pattern):
    root = sysconfig.get_paths()["stdlib"]
    globbed = glob.glob(os.path.join(root, pattern), recursive=True)
    expected = sorted(f for f in globbed if os.path.isfile(f) and "site-packages" not in f)
    listed = _stdlib_files(pattern)
    assert sorted(listed) == expected and len(set(listed)) == len(listed) and expected


def test_a_shard_reader_replays_what_a_window_read_past_its_end(tmp_path, monkeypatch):
    path = write_format(tmp_path, "json.gz")
    calls = count_load_dataset_calls(monkeypatch)
    reader = ShardReader(Shard(path, "json.gz"), ReadOptions("text"))
    log = BadInputLog("skip")
    first = []
    for record in reader.records(0, log):
        first.append(record.index)
        if record.index == 9:
            break
    again = [record.index for record in reader.records(6, log)]
    assert first == list(range(10)) and again == list(range(6, len(DOCUMENTS)))
    assert [record.index for record in reader.records(3, log)][:2] == [3, 4]
    assert len(calls) == 2, "a start before the kept records opens the shard again"


def write_text_files(directory, texts: dict[str, str]) -> list[str]:
    directory.mkdir(exist_ok=True)
    for name, text in texts.items():
        (directory / name).write_text(text)
    return [str(directory / name) for name in texts]


def whole_file_stream(texts: list[str]) -> np.ndarray:
    """The files' documents end to end, each its text without trailing newlines, then EOS."""
    tokenizer = load_tokenizer("embedded")
    ids = [tokenizer.encode(text.rstrip("\r\n"), add_special_tokens=False).ids for text in texts]
    return np.concatenate([np.array([*document, 0]) for document in ids])


def whole_file_loader(tmp_path, paths: list[str], **overrides):
    source = SourceConfig(name="files", paths=paths, format="text", text_split="file")
    cfg = make_config(tmp_path, [source], shuffle=False, **overrides)
    return build_data_loader(cfg, rank=0, world_size=1, micro_batch_size=2)


def test_whole_files_are_read_through_one_stream_and_resume_exactly(tmp_path, monkeypatch):
    texts = {f"{index:02d}.txt": f"file {index}\n" + DOCUMENTS[index] + "\n" for index in range(12)}
    directory = tmp_path / "files"
    write_text_files(directory, texts)
    calls = count_load_dataset_calls(monkeypatch)
    loader = whole_file_loader(tmp_path, [str(directory)])
    batches = take(loader, 6)
    assert len(calls) == 1 and len(calls[0]["data_files"]) == 12
    inputs = np.concatenate([batch["input_ids"].reshape(-1) for batch in batches])
    stream = whole_file_stream(list(texts.values()))
    assert np.array_equal(inputs, stream[: len(inputs)])
    first = whole_file_loader(tmp_path, [str(directory)])
    resumed = take(first, 2)
    second = whole_file_loader(tmp_path, [str(directory)])
    second.load_state_dict(first.state_dict())
    assert_same_batches(batches, resumed + take(second, 4))


def test_a_whole_file_the_stream_fails_on_is_read_alone(tmp_path):
    texts = {name: f"{name}: " + DOCUMENTS[index] for index, name in enumerate("abcd")}
    paths = write_text_files(
        tmp_path / "files", {f"{name}.txt": text for name, text in texts.items()}
    )
    whole = gzip.compress(texts["b"].encode())
    (tmp_path / "files" / "b.txt").unlink()
    (tmp_path / "files" / "b.txt.gz").write_bytes(whole[: len(whole) // 2])
    paths[1] = str(tmp_path / "files" / "b.txt.gz")
    loader = whole_file_loader(tmp_path, paths, seq_len=8)
    stream = whole_file_stream([texts["a"], texts["c"], texts["d"]])
    batches = take(loader, len(stream) // 16)
    inputs = np.concatenate([batch["input_ids"].reshape(-1) for batch in batches])
    assert np.array_equal(inputs, stream[: len(inputs)])
    assert loader.bad_input_counts() == {"truncated_file": 1}


def test_a_parquet_shard_without_the_field_is_reported(tmp_path):
    path = tmp_path / "body.parquet"
    pq.write_table(pa.table({"body": DOCUMENTS}), path)
    good = write_jsonl(tmp_path / "good.jsonl", DOCUMENTS[:5])
    cfg = make_config(tmp_path, [SourceConfig(name="docs", paths=[str(path), str(good)])])
    loader = build_data_loader(cfg, rank=0, world_size=1, micro_batch_size=2)
    take(loader, 4)
    assert loader.bad_input_counts()["missing_field"] >= 1


def test_json_zst_is_the_one_format_read_directly(tmp_path, monkeypatch):
    calls = count_load_dataset_calls(monkeypatch)
    take(loader_for(tmp_path, write_format(tmp_path, "json.zst")), 2)
    assert calls == []


def write_bad_jsonl(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = [json.dumps({"text": doc}).encode() for doc in DOCUMENTS[:16]]
    lines = [
        good[0],
        b'{"text": "unterminated',
        json.dumps({"text": ""}).encode(),
        json.dumps({"body": "no text field"}).encode(),
        b'{"text": "caf\xe9 latin-1"}',
        json.dumps({"text": 42}).encode(),
        *good[1:],
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


@pytest.mark.parametrize("window_tokens", [1_000_000, 5])
def test_bad_records_are_counted_logged_with_file_and_line_and_skipped(
    tmp_path, caplog, window_tokens
):
    path = write_bad_jsonl(tmp_path)
    caplog.set_level(logging.WARNING, logger="data_pipelines.readers")
    loader = loader_for(tmp_path, path, shuffle=False, window_tokens=window_tokens)
    take(loader, 2)
    assert loader.bad_input_counts() == {
        "malformed": 1,
        "empty_document": 1,
        "missing_field": 2,
        "undecodable": 1,
    }
    assert f"{path}:2: malformed" in caplog.text
    assert f"{path}:5: undecodable" in caplog.text
    clean = tmp_path / "clean"
    clean.mkdir()
    reference = loader_for(
        clean, write_jsonl(clean / "docs.jsonl", DOCUMENTS[:16]).as_posix(), shuffle=False
    )
    assert_same_batches(take(reference, 2), take(loader_for(tmp_path, path, shuffle=False), 2))


def test_the_error_policy_stops_at_the_first_bad_record(tmp_path):
    loader = loader_for(tmp_path, write_bad_jsonl(tmp_path), on_bad_input="error")
    with pytest.raises(BadInputError, match=r"bad\.jsonl:2: malformed"):
        take(loader, 1)


def test_a_truncated_compressed_file_is_reported_and_its_good_part_read(tmp_path, caplog):
    full = gzip.compress("".join(json.dumps({"text": doc}) + "\n" for doc in DOCUMENTS).encode())
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(full[: len(full) // 2])
    loader = loader_for(tmp_path, str(path), shuffle=False)
    take(loader, 12)
    assert loader.bad_input_counts()["truncated_file"] >= 1
    assert "truncated file" in caplog.text


@pytest.mark.parametrize("fmt", ["parquet", "arrow", "json.zst"])
def test_truncated_binary_files_are_skipped(tmp_path, fmt):
    path = write_format(tmp_path, fmt)
    with open(path, "rb") as file:
        data = file.read()
    with open(path, "wb") as file:
        file.write(data[: len(data) * 2 // 3])
    good = write_jsonl(tmp_path / "good.jsonl", DOCUMENTS[:5])
    cfg = make_config(tmp_path, [SourceConfig(name="docs", paths=[path, str(good)])], shuffle=False)
    loader = build_data_loader(cfg, rank=0, world_size=1, micro_batch_size=2)
    take(loader, 10)
    assert loader.bad_input_counts()["truncated_file"] >= 1


def test_missing_paths_and_unknown_formats_fail_at_startup_all_at_once(tmp_path):
    sources = [
        SourceConfig(name="gone", paths=[str(tmp_path / "missing.jsonl")]),
        SourceConfig(name="odd", paths=[write_format(tmp_path, "jsonl")], format="csv"),
        SourceConfig(name="empty", paths=[str(tmp_path / "*.parquet")]),
        SourceConfig(name="web", paths=["nosuchproto://host/docs.jsonl"]),
    ]
    with pytest.raises(ValueError) as error:
        build_data_loader(make_config(tmp_path, sources), rank=0, world_size=1, micro_batch_size=1)
    message = str(error.value)
    assert "missing.jsonl: no such file" in message
    assert "unknown format 'csv'" in message
    assert "matches no files" in message
    assert "cannot read nosuchproto:// paths" in message


def test_a_wrong_format_or_field_is_a_startup_error_naming_the_file(tmp_path):
    jsonl = write_format(tmp_path, "jsonl")
    (tmp_path / "docs.json").write_text(json.dumps([{"text": doc} for doc in DOCUMENTS], indent=1))
    (tmp_path / "fake.parquet").write_bytes(open(jsonl, "rb").read())
    (tmp_path / "fake.jsonl.gz").write_bytes(open(jsonl, "rb").read())
    parquet = write_format(tmp_path, "parquet")
    cases = [
        (str(tmp_path / "fake.parquet"), {}, "fake.parquet: not a parquet file (it starts with"),
        (str(tmp_path / "fake.jsonl.gz"), {}, "fake.jsonl.gz: not a json.gz file"),
        (parquet, {"text_field": "body"}, "docs.parquet: no column 'body' (has ['id', 'text'])"),
        (jsonl, {"text_field": "body"}, "first 20 records are all unusable (missing field"),
        (str(tmp_path / "docs.json"), {}, "docs.json: its first 20 records are all unusable"),
    ]
    for path, fields, expected in cases:
        source = SourceConfig(name="docs", paths=[path], **fields)
        with pytest.raises(ValueError, match=re.escape(expected)):
            build_data_loader(
                make_config(tmp_path, [source]), rank=0, world_size=1, micro_batch_size=1
            )


def test_a_source_without_a_usable_file_is_a_startup_error(tmp_path):
    good = write_format(tmp_path, "jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n  \n\n")
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(open(good, "rb").read())[:40])
    unusable = [str(tmp_path / n) for n in ("empty.jsonl", "blank.jsonl", "cut.jsonl.gz")]
    for paths, expected in [
        ([unusable[0]], "empty.jsonl: the file is empty"),
        ([unusable[1]], "blank.jsonl: holds no records"),
        ([unusable[2]], "cut.jsonl.gz: unreadable"),
    ]:
        source = SourceConfig(name="docs", paths=paths)
        with pytest.raises(ValueError, match=re.escape(expected)):
            build_data_loader(
                make_config(tmp_path, [source]), rank=0, world_size=1, micro_batch_size=1
            )
    # One usable file among them: the others are bad input, read past at run time.
    loader = build_data_loader(
        make_config(tmp_path, [SourceConfig(name="docs", paths=[*unusable, good])]),
        rank=0,
        world_size=1,
        micro_batch_size=1,
    )
    assert next(iter(loader))["input_ids"].numel() > 0


def test_a_few_bad_first_records_are_bad_input_not_a_startup_error(tmp_path):
    lines = ["{not json", '{"body": "no text field"}', ""] + [
        json.dumps({"text": d}) for d in DOCUMENTS
    ]
    path = tmp_path / "mostly_good.jsonl"
    path.write_text("\n".join(lines) + "\n")
    loader = loader_for(tmp_path, str(path), shuffle=False)
    take(loader, 2)
    assert loader.bad_input_counts() == {"malformed": 1, "missing_field": 1, "empty_document": 1}


def test_a_bad_shard_at_an_epoch_boundary_is_not_taken_for_an_empty_source(tmp_path):
    """The good shard's last window ends exactly at its end (one empty window after it),
    then the all-bad shard ends epoch 0 and starts epoch 1: three empty windows in a row,
    more than the two pieces an epoch has, yet the source has documents."""
    seed = next(
        seed
        for seed in range(1000)
        if [
            [
                piece.shard
                for piece in epoch_pieces(
                    2, slot=0, num_slots=1, epoch=epoch, seed=seed, name="docs", shuffle=True
                )
            ]
            for epoch in (0, 1)
        ]
        == [[0, 1], [1, 0]]
    )
    (tmp_path / "docs").mkdir()
    good = write_jsonl(tmp_path / "docs" / "a.jsonl", DOCUMENTS[:8])
    (tmp_path / "docs" / "b.jsonl").write_text("{not json\n" * 5)
    cfg = make_config(
        tmp_path, [SourceConfig(name="docs", paths=[str(good.parent)])], seed=seed, shuffle_window=4
    )
    loader = build_data_loader(cfg, rank=0, world_size=1, micro_batch_size=2)
    take(loader, 12)  # past the epoch boundary
    assert loader.bad_input_counts()["malformed"] >= 10


def test_a_source_read_again_says_so(tmp_path, caplog):
    path = write_jsonl(tmp_path / "few.jsonl", DOCUMENTS[:3])
    caplog.set_level(logging.INFO, logger="data_pipelines.stream")
    loader = loader_for(tmp_path, str(path), shuffle=False)
    take(loader, 2)
    assert "source 'docs': epoch 1 begins" not in caplog.text
    take(loader, 12)
    assert "source 'docs': epoch 2 begins (its documents are read again, reshuffled)" in caplog.text
