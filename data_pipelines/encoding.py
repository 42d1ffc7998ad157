"""Turning parsed records into token arrays: plain documents and ChatML conversations.

A `Document` is the token ids of one record, EOS included, plus which tokens are targets
(None: all of them). Records are encoded a window at a time with one `encode_batch_fast`
call, which is where the tokenizer spends its time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data_pipelines.tokenizer import IM_END, IM_START, load_tokenizer, token_id


@dataclass
class Document:
    """One document's tokens and, for SFT, which of them are targets."""

    tokens: np.ndarray
    """int32 token ids; the last one is EOS."""
    targets: np.ndarray | None = None
    """bool per token, True where the token is a target; None when every token is."""


class DocumentEncoder:
    """Tokenizes pre-training texts or renders and tokenizes SFT conversations."""

    def __init__(self, tokenizer: str, kind: str, eos_token: str):
        self.tokenizer = load_tokenizer(tokenizer)
        self.kind = kind
        self.eos = token_id(self.tokenizer, eos_token)
        if kind == "sft":
            self.im_start = token_id(self.tokenizer, IM_START)
            self.im_end = token_id(self.tokenizer, IM_END)
            self.newline = self._ids(["\n"])[0]
            self.headers: dict[str, np.ndarray] = {}

    def encode(self, payloads: list) -> list[Document]:
        """Encode a window of payloads (texts, or lists of (role, content) for SFT)."""
        if self.kind == "sft":
            return self._encode_conversations(payloads)
        return [self._with_eos(ids) for ids in self._ids(payloads)]

    def _ids(self, texts: list[str]) -> list[np.ndarray]:
        encodings = self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        return [np.asarray(encoding.ids, dtype=np.int32) for encoding in encodings]

    def _with_eos(self, ids: np.ndarray) -> Document:
        tokens = np.empty(len(ids) + 1, dtype=np.int32)
        tokens[:-1] = ids
        tokens[-1] = self.eos
        return Document(tokens)

    def _encode_conversations(self, conversations: list[list[tuple[str, str]]]) -> list[Document]:
        contents = [content for messages in conversations for _, content in messages]
        encoded = iter(self._ids(contents))
        return [self._render(messages, encoded) for messages in conversations]

    def _render(self, messages: list[tuple[str, str]], encoded) -> Document:
        """ChatML: `<|im_start|>role\\ncontent<|im_end|>\\n` per message, then EOS.

        Targets are the assistant's content and its closing `<|im_end|>`.
        """
        pieces, targets = [], []
        for role, _ in messages:
            content = next(encoded)
            is_assistant = role == "assistant"
            for piece, target in (
                (np.array([self.im_start], dtype=np.int32), False),
                (self._header(role), False),
                (content, is_assistant),
                (np.array([self.im_end], dtype=np.int32), is_assistant),
                (self.newline, False),
            ):
                pieces.append(piece)
                targets.append(np.full(len(piece), target))
        pieces.append(np.array([self.eos], dtype=np.int32))
        targets.append(np.zeros(1, dtype=bool))
        return Document(np.concatenate(pieces), np.concatenate(targets))

    def _header(self, role: str) -> np.ndarray:
        if role not in self.headers:
            self.headers[role] = self._ids([role + "\n"])[0]
        return self.headers[role]
