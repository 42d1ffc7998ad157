"""A small source is tokenized once (`data.tokenize_once_mb`): later epochs reuse its windows,
and the batches are those of reading and tokenizing every epoch again."""

from __future__ import annotations

import json

import pytest

from data_pipelines import SourceConfig, build_data_loader
from data_pipelines.encoding import DocumentEncoder
from tests.unit.test_data_fixtures import (
    assert_same_batches,
    make_config,
    take,
    text_documents,
    write_jsonl_shards,
)
from tests.unit.test_data_sources import write_bad_jsonl

BATCHES = 120  # about 8 epochs of the 30 documents below


@pytest.fixture
def tokenized(monkeypatch) -> list[int]:
    """Counts the documents this process tokenizes (the real encoder still does the work)."""
    count = [0]
    encode = DocumentEncoder.encode

    def counting(self, payloads):
        count[0] += len(payloads)
        return encode(self, payloads)

    monkeypatch.setattr(DocumentEncoder, "encode", counting)
    return count


def loader(tmp_path, path, state: dict | None = None, **overrides):
    cfg = make_config(
        tmp_path, [SourceConfig(name="docs", paths=[str(path)])], shuffle_window=4, **overrides
    )
    built = build_data_loader(cfg, rank=0, world_size=1, micro_batch_size=2)
    if state is not None:
        built.load_state_dict(json.loads(json.dumps(state)))
    return built


def test_a_small_source_is_tokenized_once_into_the_batches_of_reading_again(tmp_path, tokenized):
    source = write_jsonl_shards(tmp_path / "docs", text_documents(30), num_shards=2)
    again = take(loader(tmp_path, source, tokenize_once_mb=0), BATCHES)
    read_again = tokenized[0]
    assert read_again > 6 * 30  # every epoch tokenized its documents again

    tokenized[0] = 0
    once = take(loader(tmp_path, source), BATCHES)
    assert_same_batches(again, once)
    assert 30 <= tokenized[0] < 2 * 30  # a batch may read a little past a window's end

    tokenized[0] = 0
    too_big = take(loader(tmp_path, source, tokenize_once_mb=1e-6), BATCHES)
    assert_same_batches(again, too_big)
    assert tokenized[0] == read_again


def test_resuming_a_source_tokenized_once_gives_the_uninterrupted_batches(tmp_path):
    source = write_jsonl_shards(tmp_path / "docs", text_documents(30), num_shards=2)
    reference = take(loader(tmp_path, source), BATCHES)
    first = loader(tmp_path, source)
    pieces = take(first, 50)  # into the fourth epoch
    pieces += take(loader(tmp_path, source, first.state_dict()), BATCHES - 50)
    assert_same_batches(reference, pieces)


def test_bad_records_are_reported_every_epoch_as_when_reading_again(tmp_path):
    path = write_bad_jsonl(tmp_path)
    counts, batches = [], []
    for mb in (0, 64):
        read = loader(tmp_path, path, tokenize_once_mb=mb)
        batches.append(take(read, BATCHES))
        counts.append(read.bad_input_counts())
    assert_same_batches(*batches)  # the window read again, the kept ones beside it
    assert counts[0] == counts[1]
    assert counts[0]["malformed"] > 3  # one malformed line, reported in each epoch
