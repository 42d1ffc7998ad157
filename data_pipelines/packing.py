"""Packing a source's windows into fixed-length sequences.

Every token of the stream is an input exactly once. In `split` packing a sequence takes what
is left of the current window, then the next windows, and a document cut at a sequence's end
continues at the start of the next sequence. In `whole` packing (for SFT, where a
continuation would lack its prompt) a document that does not fit in what is left of a
sequence starts the next one instead, and the rest of the sequence is padding: EOS inputs
without targets, positions counting from 0 so that attention sees the padding as a document
of its own. Only a document longer than a whole sequence is split, as in `split` packing.

Position ids restart at 0 at every document start and at every sequence start, which is how
the model's attention finds document boundaries. The label of a token is the next token of
the same document where that one is a target, else -100, so no prediction crosses a document
boundary (EOS, a document's last token, has none).
"""

from __future__ import annotations

import logging

import numpy as np

from data_pipelines.stream import IGNORE_INDEX, SourceStream, StreamPosition, Window

__all__ = ["IGNORE_INDEX", "Packer", "WholePackingCount"]

logger = logging.getLogger(__name__)


class Packer:
    """Fills sequences from a `SourceStream`; its state is the stream's plus a cursor.

    `whole_documents` selects `whole` packing, whose cursor rests at a document start (or
    inside a document longer than a sequence): the same small state resumes it exactly.
    """

    def __init__(self, stream: SourceStream, cursor: int = 0, whole_documents: bool = False):
        self.stream = stream
        self.cursor = cursor
        self.whole_documents = whole_documents
        self.split_documents = 0
        """Documents longer than a sequence that whole-document packing had to split."""

    @classmethod
    def restore(cls, make_stream, state: dict | None, whole_documents: bool = False) -> Packer:
        """A packer at `state` (from `state()`), or at the start when None.

        `make_stream(position)` builds the source stream at a position.
        """
        if state is None:
            return cls(make_stream(None), whole_documents=whole_documents)
        position = StreamPosition(**state["position"])
        return cls(make_stream(position), state["cursor"], whole_documents)

    def state(self) -> dict:
        """The current window's position and how many of its tokens are packed."""
        return {"position": vars(self.stream.position).copy(), "cursor": self.cursor}

    def fill(self, input_ids: np.ndarray, labels: np.ndarray, position_ids: np.ndarray) -> None:
        """Write one sequence into three int64 rows of equal length."""
        length, filled = len(input_ids), 0
        while filled < length:
            window = self.stream.window
            if self.cursor == len(window):
                window, self.cursor = self.stream.next_window(), 0
            stop = min(len(window), self.cursor + length - filled)
            if self.whole_documents:
                stop = self._whole_documents_stop(window, stop, filled, length)
                if stop == self.cursor:
                    eos = self.stream.encoder.eos
                    _pad(input_ids[filled:], labels[filled:], position_ids[filled:], eos)
                    break
            take = stop - self.cursor
            source, target = slice(self.cursor, stop), slice(filled, filled + take)
            input_ids[target] = window.tokens[source]
            labels[target] = window.labels[source]
            position_ids[target] = window.positions[source]
            filled, self.cursor = filled + take, stop
        _restart_positions(position_ids)

    def _whole_documents_stop(self, window: Window, stop: int, filled: int, length: int) -> int:
        """Where to stop copying at or before `stop` so that no document is cut: the last
        document end up to `stop`; the cursor when the next document must wait for the next
        sequence; `stop` itself for a document longer than a sequence, which is split."""
        last_end = int(np.searchsorted(window.ends, stop, side="right")) - 1
        if last_end >= 0 and window.ends[last_end] > self.cursor:
            return int(window.ends[last_end])
        if filled:
            return self.cursor
        if window.positions[self.cursor] == 0:
            self._count_split_document(window, length)
        return stop

    def _count_split_document(self, window: Window, length: int) -> None:
        self.split_documents += 1
        if self.split_documents == 1:
            lengths = np.diff(window.ends, prepend=0)
            logger.warning(
                "source %r: %d of the %d documents in this window are longer than seq_len %d, "
                "so packing=whole splits them across sequences; a longer data.seq_len keeps "
                "them whole (logged once per source and worker; "
                "PackedDataLoader.split_document_count() counts them all)",
                self.stream.source.name,
                int((lengths > length).sum()),
                len(lengths),
                length,
            )


class WholePackingCount:
    """How many sequences `whole` packing fills with documents of given lengths, in order,
    without packing them: a document that does not fit in what is left of the current
    sequence starts the next one, one longer than a sequence starts a fresh one and runs on
    into as many as it needs."""

    def __init__(self, seq_len: int):
        self.seq_len = seq_len
        self.sequences = 0
        """Sequences filled so far."""
        self.filled = 0
        """Tokens in the sequence being filled."""

    def add(self, lengths: np.ndarray) -> None:
        """The next documents, by length."""
        for length in lengths.tolist():
            if self.filled and self.filled + length > self.seq_len:
                self.sequences, self.filled = self.sequences + 1, 0
            self.sequences += (self.filled + length) // self.seq_len
            self.filled = (self.filled + length) % self.seq_len

    def tokens(self) -> int:
        """Tokens of the sequences the documents so far take, the last one counted whole."""
        return (self.sequences + (self.filled > 0)) * self.seq_len


def _pad(input_ids: np.ndarray, labels: np.ndarray, position_ids: np.ndarray, eos: int) -> None:
    """Fill the rest of a sequence with padding that is a document of its own to attention."""
    input_ids[:] = eos
    labels[:] = IGNORE_INDEX
    position_ids[:] = np.arange(len(position_ids))


def _restart_positions(position_ids: np.ndarray) -> None:
    """Make a document continued from the previous sequence start again at position 0."""
    first = position_ids[0]
    if first:
        # Positions are >= 0, so the first 0 (the next document's start) is the minimum.
        start = int(position_ids.argmin())
        position_ids[: start if position_ids[start] == 0 else len(position_ids)] -= first
