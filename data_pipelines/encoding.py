"""Turning parsed records into token arrays: plain documents, and conversations rendered in
ChatML or plain (`data.template`).

Records are encoded a batch at a time with one `encode_batch_fast` call, which is where the
tokenizer spends its time, and come back as one `Documents`: every document's ids (EOS
included) laid end to end, with each document's length, so that nothing downstream works
one document at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data_pipelines.tokenizer import IM_END, IM_START, load_tokenizer, token_id

DEFAULT_MAX_CHARS = 1_000_000
"""Characters the tokenizer is given in one call at most (`data.max_document_chars`)."""


@dataclass
class Documents:
    """Documents laid end to end."""

    tokens: np.ndarray
    """int32 token ids of every document, each ending with EOS."""
    lengths: np.ndarray
    """int64 tokens per document, EOS included."""
    targets: np.ndarray | None = None
    """bool per token, True where the token is a target (SFT); None when every token is."""

    def __len__(self) -> int:
        return len(self.lengths)

    def head(self, count: int) -> Documents:
        """The first `count` documents."""
        size = int(self.lengths[:count].sum())
        targets = None if self.targets is None else self.targets[:size]
        return Documents(self.tokens[:size], self.lengths[:count], targets)

    @staticmethod
    def concatenate(parts: list[Documents]) -> Documents:
        """`parts` one after the other (at least one part)."""
        if len(parts) == 1:
            return parts[0]
        targets = None
        if parts[0].targets is not None:
            targets = np.concatenate([part.targets for part in parts])
        return Documents(
            np.concatenate([part.tokens for part in parts]),
            np.concatenate([part.lengths for part in parts]),
            targets,
        )


class DocumentEncoder:
    """Tokenizes pre-training texts or renders and tokenizes SFT conversations."""

    def __init__(
        self,
        tokenizer: str,
        kind: str,
        eos_token: str,
        max_chars: int = DEFAULT_MAX_CHARS,
        template: str = "chatml",
    ):
        self.tokenizer = load_tokenizer(tokenizer)
        self.max_chars = max_chars
        """Characters given to the tokenizer in one call at most."""
        # A special token's text inside a document (a web page quoting "<|endoftext|>", a
        # message holding "<|im_end|>") is text: encoded as such, it can neither end a
        # document early nor forge a turn of the ChatML structure built here.
        self.tokenizer.encode_special_tokens = True
        self.kind = kind
        self.template = template
        """How conversations are rendered: chatml or plain (see `_render`)."""
        self.eos = token_id(self.tokenizer, eos_token)
        if kind == "sft" and template == "chatml":
            self.im_start = token_id(self.tokenizer, IM_START)
            self.im_end = token_id(self.tokenizer, IM_END)
            self.newline = self._ids(["\n"])[0]
            self.headers: dict[str, np.ndarray] = {}

    @classmethod
    def of(cls, data) -> DocumentEncoder:
        """The encoder of a `DataConfig`'s run."""
        return cls(
            data.tokenizer, data.kind, data.eos_token, data.max_document_chars, data.template
        )

    def encode(self, payloads: list) -> Documents:
        """Encode a batch of payloads (texts, or lists of (role, content) for SFT)."""
        if self.kind == "sft":
            return self._encode_conversations(payloads)
        eos = np.array([self.eos], dtype=np.int32)
        documents = [part for ids in self._ids(payloads) for part in (ids, eos)]
        lengths = np.array([len(ids) + 1 for ids in documents[::2]], dtype=np.int64)
        return Documents(np.concatenate(documents), lengths)

    def _ids(self, texts: list[str]) -> list[np.ndarray]:
        """Each text's token ids. The tokenizer is given at most `max_chars` characters per
        call: a longer text is tokenized in pieces cut at whitespace (`text_pieces`), and
        its pieces' ids are joined; a long text is what makes the tokenizer's memory grow,
        by about 100 bytes per character."""
        pieces, owners = [], []
        for index, text in enumerate(texts):
            for piece in text_pieces(text, self.max_chars):
                pieces.append(piece)
                owners.append(index)
        ids: list[list[np.ndarray]] = [[] for _ in texts]
        for start, end in _calls(pieces, self.max_chars):
            encodings = self.tokenizer.encode_batch_fast(
                pieces[start:end], add_special_tokens=False
            )
            for owner, encoding in zip(owners[start:end], encodings, strict=True):
                ids[owner].append(np.asarray(encoding.ids, dtype=np.int32))
        return [parts[0] if len(parts) == 1 else np.concatenate(parts) for parts in ids]

    def _encode_conversations(self, conversations: list[list[tuple[str, str]]]) -> Documents:
        plain = self.template == "plain"
        contents = [
            " " + content if plain and number else content
            for messages in conversations
            for number, (_, content) in enumerate(messages)
        ]
        encoded = iter(self._ids(contents))
        render = self._render_plain if plain else self._render
        rendered = [render(messages, encoded) for messages in conversations]
        return Documents(
            np.concatenate([tokens for tokens, _ in rendered]),
            np.array([len(tokens) for tokens, _ in rendered], dtype=np.int64),
            np.concatenate([targets for _, targets in rendered]),
        )

    def _render(self, messages: list[tuple[str, str]], encoded) -> tuple[np.ndarray, np.ndarray]:
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
        return np.concatenate(pieces), np.concatenate(targets)

    def _render_plain(self, messages: list[tuple[str, str]], encoded):
        """Plain: the contents one space apart (the space opens each later content's tokens,
        as a completion's answer follows its prompt), then EOS.

        Targets are the assistant's contents, and the EOS when an assistant's message ends
        the conversation: the answer of a question, and where it stops.
        """
        pieces, targets = [], []
        for role, _ in messages:
            content = next(encoded)
            pieces.append(content)
            targets.append(np.full(len(content), role == "assistant"))
        pieces.append(np.array([self.eos], dtype=np.int32))
        targets.append(np.full(1, bool(messages) and messages[-1][0] == "assistant"))
        return np.concatenate(pieces), np.concatenate(targets)

    def _header(self, role: str) -> np.ndarray:
        if role not in self.headers:
            self.headers[role] = self._ids([role + "\n"])[0]
        return self.headers[role]


def text_pieces(text: str, max_chars: int) -> list[str]:
    """`text` cut into pieces of at most `max_chars` characters, each cut made at the last
    whitespace of a piece's second half, where there is one, so that a word is not cut in
    two; the whitespace begins the next piece, as byte-level BPE attaches a space to the
    word after it. Joined, the pieces are `text`."""
    if len(text) <= max_chars:
        return [text]
    pieces, start = [], 0
    while len(text) - start > max_chars:
        end = start + max_chars
        cut = max(text.rfind(space, start + max_chars // 2 + 1, end) for space in " \n\t")
        cut = cut if cut > start else end
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def _calls(pieces: list[str], max_chars: int) -> list[tuple[int, int]]:
    """Consecutive runs of `pieces` of at most `max_chars` characters together (a longer
    piece alone), as (start, end) index pairs."""
    calls, start, size = [], 0, 0
    for index, piece in enumerate(pieces):
        if index > start and size + len(piece) > max_chars:
            calls.append((start, index))
            start, size = index, 0
        size += len(piece)
    if pieces:
        calls.append((start, len(pieces)))
    return calls
