"""Packing a source's windows into fixed-length sequences.

Every token of the stream is an input exactly once: a sequence takes what is left of the
current window, then the next windows, and a document cut at a sequence's end continues at
the start of the next sequence. Position ids restart at 0 at every document start and at
every sequence start, which is how the model's attention finds document boundaries. The
label of a token is the next token of the same document where that one is a target, else
-100, so no prediction crosses a document boundary (EOS, a document's last token, has none).
"""

from __future__ import annotations

import numpy as np

from data_pipelines.stream import IGNORE_INDEX, SourceStream, StreamPosition

__all__ = ["IGNORE_INDEX", "Packer"]


class Packer:
    """Fills sequences from a `SourceStream`; its state is the stream's plus a cursor."""

    def __init__(self, stream: SourceStream, cursor: int = 0):
        self.stream = stream
        self.cursor = cursor

    @classmethod
    def restore(cls, make_stream, state: dict | None) -> Packer:
        """A packer at `state` (from `state()`), or at the start when None.

        `make_stream(position)` builds the source stream at a position.
        """
        if state is None:
            return cls(make_stream(None))
        return cls(make_stream(StreamPosition(**state["position"])), state["cursor"])

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
            take = min(length - filled, len(window) - self.cursor)
            source, target = slice(self.cursor, self.cursor + take), slice(filled, filled + take)
            input_ids[target] = window.tokens[source]
            labels[target] = window.labels[source]
            position_ids[target] = window.positions[source]
            filled, self.cursor = filled + take, self.cursor + take
        _restart_positions(position_ids)


def _restart_positions(position_ids: np.ndarray) -> None:
    """Make a document continued from the previous sequence start again at position 0."""
    first = position_ids[0]
    if first:
        # Positions are >= 0, so the first 0 (the next document's start) is the minimum.
        start = int(position_ids.argmin())
        position_ids[: start if position_ids[start] == 0 else len(position_ids)] -= first
