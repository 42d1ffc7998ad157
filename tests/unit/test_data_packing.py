"""Packing invariants: every token once, positions restart per document, labels in-document."""

from __future__ import annotations

import numpy as np

from data_pipelines import SourceConfig, build_data_loader
from data_pipelines.packing import IGNORE_INDEX
from data_pipelines.tokenizer import load_tokenizer
from tests.unit.test_data_fixtures import make_config, take, text_documents, write_jsonl

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
