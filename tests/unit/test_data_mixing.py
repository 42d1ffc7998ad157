"""Mixture proportions, stage switches, seeding; disjoint and complete slots."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from data_pipelines import SourceConfig, build_data_loader
from data_pipelines.encoding import DocumentEncoder
from data_pipelines.readers import BadInputLog
from data_pipelines.shards import resolve_shards
from data_pipelines.stream import Slot, SourceStream
from data_pipelines.tokenizer import load_tokenizer
from tests.unit.test_data_fixtures import (
    labelled_token_documents,
    make_config,
    take,
    text_documents,
    write_jsonl_shards,
    write_token_shards,
)

WEIGHTS = {"a": 0.5, "b": 0.3, "c": 0.2}
TOKEN_OF = {"a": 5, "b": 6, "c": 7}


def mixture_config(tmp_path, **overrides):
    sources = []
    for name, weight in WEIGHTS.items():
        documents = [[TOKEN_OF[name]] * length + [0] for length in (3, 5, 9, 2)]
        directory = write_token_shards(tmp_path / name, documents, num_shards=2)
        sources.append(SourceConfig(name=name, paths=[str(directory)], weight=weight))
    return make_config(tmp_path, sources, seq_len=8, **overrides)


def sequence_sources(batches) -> Counter:
    inverse = {token: name for name, token in TOKEN_OF.items()}
    return Counter(
        inverse[int(row[row != 0][0])] for batch in batches for row in batch["input_ids"]
    )


def test_mixture_proportions_follow_the_weights_and_the_stage(tmp_path):
    loader = build_data_loader(mixture_config(tmp_path), rank=0, world_size=1, micro_batch_size=4)
    counts = sequence_sources(take(loader, 300))
    for name, weight in WEIGHTS.items():
        assert counts[name] / 1200 == pytest.approx(weight, abs=0.05)
    loader.set_stage(weights={"b": 1.0, "c": 3.0})
    counts = sequence_sources(take(loader, 100))
    assert counts["a"] == 0
    assert counts["c"] / 400 == pytest.approx(0.75, abs=0.06)


def test_mixing_is_seeded(tmp_path):
    def first_batches(seed):
        cfg = mixture_config(tmp_path, seed=seed)
        return take(build_data_loader(cfg, rank=0, world_size=1, micro_batch_size=4), 5)

    same = [
        np.array_equal(x["input_ids"], y["input_ids"])
        for x, y in zip(first_batches(1), first_batches(1), strict=True)
    ]
    other = [
        np.array_equal(x["input_ids"], y["input_ids"])
        for x, y in zip(first_batches(1), first_batches(2), strict=True)
    ]
    assert all(same) and not all(other)


def epoch_documents(cfg, shards, slot: Slot) -> list[tuple[int, ...]]:
    encoder = DocumentEncoder(cfg.tokenizer, cfg.kind, cfg.eos_token)
    stream = SourceStream(cfg.sources[0], shards, slot, cfg, encoder, BadInputLog("skip"))
    documents, window = [], stream.window
    while stream.position.epoch == 0:
        starts = np.flatnonzero(window.positions == 0)
        documents += [
            tuple(part.tolist()) for part in np.split(window.tokens, starts[1:]) if len(part)
        ]
        window = stream.next_window()
    return documents


@pytest.mark.parametrize("num_shards", [1, 3, 4, 7])
@pytest.mark.parametrize("fmt", ["tokens", "jsonl"])
def test_two_ranks_by_two_workers_see_every_document_once_per_epoch(tmp_path, num_shards, fmt):
    if fmt == "tokens":
        expected = [tuple(doc) for doc in labelled_token_documents(37)]
        directory = write_token_shards(
            tmp_path / "docs", [list(doc) for doc in expected], num_shards
        )
    else:
        texts = text_documents(37)
        directory = write_jsonl_shards(tmp_path / "docs", texts, num_shards)
        encodings = load_tokenizer("embedded").encode_batch(texts, add_special_tokens=False)
        expected = [tuple(encoding.ids + [0]) for encoding in encodings]
    cfg = make_config(
        tmp_path, [SourceConfig(name="docs", paths=[str(directory)])], shuffle_window=5
    )
    shards = resolve_shards(cfg.sources[0], cfg.cache_dir)
    world_size, workers = 2, 2
    seen = Counter()
    for rank in range(world_size):
        for worker in range(workers):
            slot = Slot(rank * workers + worker, world_size * workers)
            documents = epoch_documents(cfg, shards, slot)
            assert documents, f"slot {slot.index} read nothing"
            seen.update(documents)
    assert seen == Counter(expected)
