"""SFT: ChatML rendering, loss only on assistant tokens, checked token by token."""

from __future__ import annotations

import numpy as np

from data_pipelines import SourceConfig, build_data_loader
from data_pipelines.packing import IGNORE_INDEX
from data_pipelines.tokenizer import load_tokenizer
from tests.unit.test_data_fixtures import make_config, take, write_jsonl

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2 + 3 mod 23?"},
    {"role": "assistant", "content": "<think>2 + 3 = 5, below 23.</think>5"},
    {"role": "user", "content": "And times 5?"},
    {"role": "assistant", "content": "2"},
]


def expected_tokens_and_targets(messages) -> tuple[list[int], list[bool]]:
    tokenizer = load_tokenizer("embedded")

    def ids(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False).ids

    tokens, targets = [], []
    for message in messages:
        assistant = message["role"] == "assistant"
        for piece, target in (
            ([1], False),
            (ids(message["role"] + "\n"), False),
            (ids(message["content"]), assistant),
            ([2], assistant),
            (ids("\n"), False),
        ):
            tokens += piece
            targets += [target] * len(piece)
    return tokens + [0], targets + [False]


def sft_loader(tmp_path, records, seq_len):
    path = write_jsonl(tmp_path / "chat.jsonl", records)
    source = SourceConfig(name="chat", paths=[str(path)])
    cfg = make_config(tmp_path, [source], kind="sft", shuffle=False, seq_len=seq_len)
    return build_data_loader(cfg, rank=0, world_size=1, micro_batch_size=1)


def test_only_assistant_tokens_are_targets(tmp_path):
    tokens, targets = expected_tokens_and_targets(CONVERSATION)
    batch = take(sft_loader(tmp_path, [{"messages": CONVERSATION}], seq_len=len(tokens)), 1)[0]
    assert batch["input_ids"][0].tolist() == tokens
    expected_labels = [
        tokens[i + 1] if targets[i + 1] else IGNORE_INDEX for i in range(len(tokens) - 1)
    ]
    assert batch["labels"][0].tolist() == expected_labels + [IGNORE_INDEX]
    assert batch["position_ids"][0].tolist() == list(range(len(tokens)))
    tokenizer = load_tokenizer("embedded")
    learned = [label for label in batch["labels"][0].tolist() if label != IGNORE_INDEX]
    rendered = tokenizer.decode(learned, skip_special_tokens=False)
    assert rendered == "<think>2 + 3 = 5, below 23.</think>5<|im_end|>2<|im_end|>"


def test_masks_stay_with_their_documents_when_packed_across_sequences(tmp_path):
    second = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]
    records = [{"messages": CONVERSATION}, {"messages": second}, {"messages": "not a list"}]
    first_tokens, first_targets = expected_tokens_and_targets(CONVERSATION)
    second_tokens, second_targets = expected_tokens_and_targets(second)
    stream = first_tokens + second_tokens
    loader = sft_loader(tmp_path, records, seq_len=11)
    batches = take(loader, len(stream) // 11 + 1)
    is_target = first_targets + second_targets
    document_end = {len(first_tokens) - 1, len(stream) - 1}
    inputs = np.concatenate([batch["input_ids"][0] for batch in batches])
    labels = np.concatenate([batch["labels"][0] for batch in batches])
    assert inputs[: len(stream)].tolist() == stream
    for i in range(len(stream) - 1):
        expected = stream[i + 1] if is_target[i + 1] and i not in document_end else IGNORE_INDEX
        assert labels[i] == expected, f"token {i}"
    assert loader.bad_input_counts()["bad_messages"] >= 1
