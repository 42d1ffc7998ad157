"""Tiny corpora written on the fly for the data pipeline tests (no tests here)."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

import numpy as np

from data_pipelines.config import DataConfig, SourceConfig
from data_pipelines.stream import IGNORE_INDEX
from data_pipelines.tokenized import META_FILE

WORDS = (
    "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega river stone cloud".split()
)


def text_documents(count: int, tag: str = "doc", seed: int = 0) -> list[str]:
    """`count` distinct short texts of varied lengths."""
    rng = np.random.default_rng(seed)
    return [
        f"{tag} {index}: " + " ".join(rng.choice(WORDS, size=int(rng.integers(1, 9))))
        for index in range(count)
    ]


def write_jsonl(path: Path, records: list, field: str = "text") -> Path:
    """One JSON object per line; str records become {field: record}."""
    lines = [
        json.dumps({field: record} if isinstance(record, str) else record) for record in records
    ]
    path.write_text("".join(line + "\n" for line in lines))
    return path


def write_jsonl_shards(directory: Path, documents: list[str], num_shards: int) -> Path:
    """Documents dealt round-robin into `num_shards` JSONL files under `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    for shard in range(num_shards):
        write_jsonl(directory / f"part-{shard}.jsonl", documents[shard::num_shards])
    return directory


def write_token_shards(directory: Path, documents: list[list[int]], num_shards: int) -> Path:
    """Pre-tokenized shards written by hand (independently of `pretokenize`)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / META_FILE).write_text(json.dumps({"dtype": "uint16"}))
    for shard in range(num_shards):
        chunk = documents[shard::num_shards]
        tokens = np.asarray(list(itertools.chain.from_iterable(chunk)), dtype=np.uint16)
        tokens.tofile(directory / f"{shard:05d}.bin")
        np.save(
            directory / f"{shard:05d}.idx.npy",
            np.cumsum([len(doc) for doc in chunk]).astype(np.int64),
        )
    return directory


def labelled_token_documents(count: int, first_id: int = 3, seed: int = 0) -> list[list[int]]:
    """Document `i` is token `first_id + i` repeated 1-12 times, then EOS (0)."""
    rng = np.random.default_rng(seed)
    return [[first_id + index] * int(rng.integers(1, 13)) + [0] for index in range(count)]


def make_config(tmp_path: Path, sources: list[SourceConfig], **overrides) -> DataConfig:
    """A small-sequence config writing its caches under `tmp_path`."""
    settings = {
        "seq_len": 16,
        "num_workers": 0,
        "shuffle_window": 8,
        "cache_dir": str(tmp_path / "cache"),
    }
    settings.update(overrides)
    return DataConfig(sources=sources, **settings)


def take(loader, count: int) -> list[dict]:
    """The next `count` batches of `loader` as numpy arrays."""
    iterator = iter(loader)
    return [
        {key: value.numpy().copy() for key, value in next(iterator).items()} for _ in range(count)
    ]


def assert_same_batches(expected: list[dict], actual: list[dict]) -> None:
    assert len(expected) == len(actual)
    for index, (left, right) in enumerate(zip(expected, actual, strict=True)):
        for key in ("input_ids", "labels", "position_ids"):
            assert np.array_equal(left[key], right[key]), f"batch {index}: {key} differs"


def row_segments(batches: list[dict]):
    """Each row's documents as attention finds them, (inputs, labels, positions) runs that
    start where the position is 0; rows in the order they were packed."""
    for batch in batches:
        rows = zip(batch["input_ids"], batch["labels"], batch["position_ids"], strict=True)
        for inputs, labels, positions in rows:
            starts = np.flatnonzero(positions == 0).tolist() + [len(inputs)]
            yield [
                (inputs[start:end], labels[start:end], positions[start:end])
                for start, end in zip(starts, starts[1:], strict=False)
            ]


def check_whole_packing(
    batches: list[dict], documents: list[list[int]], eos: int = 0
) -> tuple[Counter, list[list[int]]]:
    """Walk one source's rows against its `documents` (token ids in the order read, cycled)
    and assert the layout of `packing=whole`: a document lies whole in one row, unless it is
    longer than a row, then it starts a row and fills rows until its last piece; a row ends
    in padding (EOS, no labels, positions from 0) only where the next document did not fit.

    Returns counts (`documents` passed, `paddings`, `split` documents begun) and the labels
    each passed document got, pieces joined.
    """
    expected = itertools.cycle(documents)
    rest, labelled, begun = next(expected), [], True
    counts: Counter = Counter()
    for segments in row_segments(batches):
        seq_len = sum(len(inputs) for inputs, _, _ in segments)
        for index, (inputs, labels, positions) in enumerate(segments):
            tokens = inputs.tolist()
            assert positions.tolist() == list(range(len(tokens)))
            if tokens == rest:
                counts["documents"] += 1
                labelled.append(([] if begun else labelled.pop()) + labels.tolist())
                rest, begun = next(expected), True
            elif len(rest) > seq_len and tokens == rest[:seq_len]:
                counts["split"] += begun
                labelled.append(([] if begun else labelled.pop()) + labels.tolist())
                rest, begun = rest[seq_len:], False
            else:
                assert 0 < index == len(segments) - 1, "padding not after a row's documents"
                assert len(tokens) < len(rest), "a document that fits was left for later"
                assert set(tokens) == {eos} and set(labels.tolist()) == {IGNORE_INDEX}
                counts["paddings"] += 1
    if not begun:
        labelled.pop()
    return counts, labelled
