"""Packing invariants: every token once, positions restart per document, labels in-document."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipelines import DataConfig, SourceConfig, build_data_loader, validate_data_config
from data_pipelines.config import packs_whole_documents
from data_pipelines.packing import IGNORE_INDEX
from data_pipelines.tokenizer import load_tokenizer
from tests.unit.test_data_fixtures import (
    check_whole_packing,
    make_config,
    take,
    text_documents,
    write_jsonl,
)

EOS = 0


def expected_stream(documents: list[str]) -> np.ndarray:
    tokenizer = load_tokenizer("embedded")
    encodings = tokenizer.encode_batch(documents, add_special_tokens=False)
    return np.concatenate([np.array(encoding.ids + [EOS]) for encoding in encodings])


def test_packing_keeps_every_token_once_and_marks_documents(tmp_path):
    documents = text_documents(60)
    path = write_jsonl(tmp_path / "docs.jsonl", documents)
    cfg = make_config(
        tmp_path, [SourceConfig(name="docs", paths=[str(path)])], shuffle=False, seq_len=13
    )
    batches = take(build_data_loader(cfg, rank=0, world_size=1, micro_batch_size=3), 8)
    stream = expected_stream(documents)
    inputs = np.concatenate([batch["input_ids"].reshape(-1) for batch in batches])
    assert len(inputs) < len(stream)
    assert np.array_equal(inputs, stream[: len(inputs)])
    start = 0
    for batch in batches:
        for row_inputs, labels, positions in zip(
            batch["input_ids"], batch["labels"], batch["position_ids"], strict=True
        ):
            rows = np.arange(start, start + len(row_inputs))
            next_tokens = stream[rows + 1]
            expected_labels = np.where(stream[rows] == EOS, IGNORE_INDEX, next_tokens)
            assert np.array_equal(labels, expected_labels)
            expected_positions = np.zeros(len(row_inputs), dtype=np.int64)
            for i in range(1, len(row_inputs)):
                expected_positions[i] = (
                    0 if row_inputs[i - 1] == EOS else expected_positions[i - 1] + 1
                )
            assert np.array_equal(positions, expected_positions)
            start += len(row_inputs)


def test_batches_are_int64_with_the_configured_shape(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", text_documents(10))
    cfg = make_config(tmp_path, [SourceConfig(name="docs", paths=[str(path)])], seq_len=7)
    batch = next(iter(build_data_loader(cfg, rank=0, world_size=1, micro_batch_size=2)))
    assert sorted(batch) == ["input_ids", "labels", "position_ids"]
    for tensor in batch.values():
        assert tensor.dtype.is_floating_point is False and str(tensor.dtype) == "torch.int64"
        assert tuple(tensor.shape) == (2, 7)


def test_whole_packing_of_plain_documents_splits_only_those_longer_than_a_row(tmp_path):
    texts = text_documents(40)
    tokenizer = load_tokenizer("embedded")
    documents = [
        encoding.ids + [EOS] for encoding in tokenizer.encode_batch(texts, add_special_tokens=False)
    ]
    seq_len = 13
    assert any(len(document) > seq_len for document in documents)
    path = write_jsonl(tmp_path / "docs.jsonl", texts)
    source = SourceConfig(name="docs", paths=[str(path)])
    cfg = make_config(tmp_path, [source], shuffle=False, seq_len=seq_len, packing="whole")
    loader = build_data_loader(cfg, rank=0, world_size=1, micro_batch_size=3)
    batches = take(loader, sum(map(len, documents)) // seq_len)
    counts, labels = check_whole_packing(batches, documents)
    assert counts["documents"] > len(documents), "not a whole epoch: add batches"
    assert counts["paddings"] > 0 and loader.split_document_count() == counts["split"] > 0
    for document, document_labels in zip(documents, labels, strict=False):
        assert document_labels == document[1:] + [IGNORE_INDEX]


@pytest.mark.parametrize(
    ("packing", "kind", "whole"),
    [
        ("auto", "sft", True),
        ("auto", "pretrain", False),
        ("whole", "pretrain", True),
        ("split", "sft", False),
    ],
)
def test_auto_packing_keeps_documents_whole_for_sft_only(packing, kind, whole):
    assert packs_whole_documents(DataConfig(packing=packing, kind=kind)) is whole


def test_an_unknown_packing_is_a_validation_error(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", text_documents(3))
    cfg = make_config(tmp_path, [SourceConfig(name="docs", paths=[str(path)])])
    assert validate_data_config(cfg) == []
    cfg.packing = "entire"
    problems = validate_data_config(cfg)
    assert len(problems) == 1 and problems[0].startswith("data.packing: 'entire' is not one of")
    with pytest.raises(ValueError, match="data.packing: 'entire'"):
        build_data_loader(cfg, rank=0, world_size=1, micro_batch_size=1)
