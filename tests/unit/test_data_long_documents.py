"""Bounded memory per document: a long pre-training document is tokenized in pieces of at
most `data.max_document_chars` characters and stays one document; a long SFT conversation is
skipped as bad input. Both are counted and logged with file and line."""

from __future__ import annotations

import logging
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest

import data_pipelines.encoding as encoding
from data_pipelines import SourceConfig, build_data_loader
from data_pipelines.config import validate_data_config
from data_pipelines.encoding import text_pieces
from data_pipelines.readers import BadInputError
from data_pipelines.tokenized import open_token_shard
from data_pipelines.tokenizer import load_tokenizer
from tests.unit.test_data_fixtures import WORDS, make_config, take, write_jsonl

REPO = Path(__file__).resolve().parents[2]
LIMIT = 2_000
TOKENIZER = load_tokenizer("embedded")
TOKENIZER.encode_special_tokens = True


def long_text(chars: int, seed: int = 0) -> str:
    """Words, spaces and line breaks, at least `chars` characters."""
    rng = np.random.default_rng(seed)
    words = rng.choice(WORDS, size=chars // 4)
    breaks = rng.random(len(words)) < 0.05
    text = "".join(word + ("\n" if brk else " ") for word, brk in zip(words, breaks, strict=True))
    return text[:chars].strip()


def reference_stream(texts: list[str]) -> list[int]:
    """Each text tokenized whole, then EOS (id 0), one after the other."""
    return [i for text in texts for i in TOKENIZER.encode(text, add_special_tokens=False).ids + [0]]


class CallSizes:
    """The embedded tokenizer, recording the characters of each batch it is given."""

    def __init__(self, tokenizer, sizes: list[int]):
        object.__setattr__(self, "_tokenizer", tokenizer)
        object.__setattr__(self, "_sizes", sizes)

    def encode_batch_fast(self, texts, **kwargs):
        self._sizes.append(sum(len(text) for text in texts))
        return self._tokenizer.encode_batch_fast(texts, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def __setattr__(self, name, value):
        setattr(self._tokenizer, name, value)


@pytest.fixture
def call_sizes(monkeypatch) -> list[int]:
    sizes: list[int] = []
    real = encoding.load_tokenizer
    monkeypatch.setattr(encoding, "load_tokenizer", lambda name: CallSizes(real(name), sizes))
    return sizes


def test_pieces_join_to_the_text_and_are_cut_at_whitespace():
    text = long_text(10_000)
    pieces = text_pieces(text, 700)
    assert "".join(pieces) == text
    assert all(len(piece) <= 700 for piece in pieces)
    assert all(piece[0].isspace() for piece in pieces[1:]), "cuts are made before whitespace"
    assert all(len(piece) > 350 for piece in pieces[:-1])
    unbroken = "x" * 1_000
    assert text_pieces(unbroken, 300) == ["x" * 300] * 3 + ["x" * 100]
    assert text_pieces("short", 300) == ["short"]


def test_a_long_document_is_tokenized_in_bounded_pieces_and_stays_one_document(
    tmp_path, caplog, call_sizes
):
    texts = ["first short document", long_text(25 * LIMIT), "last short document"]
    path = write_jsonl(tmp_path / "docs.jsonl", texts)
    expected = reference_stream(texts)
    seq_len = 64
    caplog.set_level(logging.WARNING, logger="data_pipelines.readers")
    cfg = make_config(
        tmp_path,
        [SourceConfig(name="docs", paths=[str(path)])],
        shuffle=False,
        seq_len=seq_len,
        max_document_chars=LIMIT,
    )
    loader = build_data_loader(cfg, rank=0, world_size=1, micro_batch_size=1)
    batches = take(loader, len(expected) // seq_len)
    streamed = np.concatenate([batch["input_ids"][0] for batch in batches]).tolist()
    # One document: the pieces' ids joined, with one EOS, at its end.
    assert streamed == expected[: len(streamed)]
    assert call_sizes and max(call_sizes) <= LIMIT
    assert loader.bad_input_counts() == {"long_document": 1}
    assert f"{path}:2: long document: {len(texts[1]):,} characters" in caplog.text


def test_the_default_limit_leaves_ordinary_documents_alone(tmp_path, call_sizes):
    texts = [long_text(300, seed) for seed in range(40)]
    path = write_jsonl(tmp_path / "docs.jsonl", texts)
    cfg = make_config(tmp_path, [SourceConfig(name="docs", paths=[str(path)])], shuffle=False)
    loader = build_data_loader(cfg, rank=0, world_size=1, micro_batch_size=1)
    take(loader, 4)
    assert loader.bad_input_counts() == {}
    assert len(call_sizes) < 5, "short documents are tokenized many to a call"


def test_pretokenize_tokenizes_long_documents_in_pieces(tmp_path, monkeypatch, capsys):
    texts = ["a short one", long_text(12 * LIMIT), "another short one"]
    path = write_jsonl(tmp_path / "docs.jsonl", texts)
    out = tmp_path / "tokens"
    argv = ["pretokenize.py", "--paths", str(path), "--procs", "1", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv + ["--max-document-chars", str(LIMIT)])
    runpy.run_path(str(REPO / "scripts" / "pretokenize.py"), run_name="__main__")
    assert f"1 documents over {LIMIT:,} characters tokenized in pieces" in capsys.readouterr().out
    shard = open_token_shard(str(out / "00000.bin"))
    assert len(shard) == 3
    stored = [int(token) for index in range(3) for token in shard.document(index)]
    assert stored == reference_stream(texts)


def sft_records(long_content: str) -> list[dict]:
    def conversation(question: str, answer: str) -> dict:
        return {
            "messages": [
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ]
        }

    filler = [conversation(f"Question {i}?", f"Answer {i}.") for i in range(20)]
    return [
        conversation("What is first?", "The first answer."),
        conversation("Summarise this.", long_content),
        conversation("What is last?", "The last answer."),
        *filler,
    ]


def test_a_long_sft_conversation_is_skipped_and_counted(tmp_path, caplog):
    path = write_jsonl(tmp_path / "chat.jsonl", sft_records(long_text(3 * LIMIT)))
    caplog.set_level(logging.WARNING, logger="data_pipelines.readers")
    settings = dict(kind="sft", shuffle=False, seq_len=64, max_document_chars=LIMIT)
    cfg = make_config(tmp_path, [SourceConfig(name="chat", paths=[str(path)])], **settings)
    loader = build_data_loader(cfg, rank=0, world_size=1, micro_batch_size=1)
    batch = take(loader, 1)[0]
    assert loader.bad_input_counts() == {"too_long": 1}
    assert f"{path}:2: too long" in caplog.text
    text = TOKENIZER.decode(batch["input_ids"][0].tolist(), skip_special_tokens=False)
    assert "The first answer." in text and "The last answer." in text
    assert "Summarise" not in text

    strict = make_config(
        tmp_path, [SourceConfig(name="chat", paths=[str(path)])], **settings, on_bad_input="error"
    )
    with pytest.raises(BadInputError, match=r"chat\.jsonl:2: too long"):
        take(build_data_loader(strict, rank=0, world_size=1, micro_batch_size=1), 1)


def test_the_limit_must_be_positive(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", ["a document"])
    cfg = make_config(
        tmp_path, [SourceConfig(name="docs", paths=[str(path)])], max_document_chars=0
    )
    assert "data.max_document_chars: must be >= 1, got 0" in validate_data_config(cfg)
