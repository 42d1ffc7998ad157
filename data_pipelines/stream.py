"""One source's documents for one slot: epochs, shard order, windows, shuffle, position.

The stream reads its slot's pieces (see `shards.epoch_pieces`) a *window* at a time: up to
`shuffle_window` usable documents (fewer once they reach `window_tokens` tokens) read and
tokenized together, then, with shuffling, permuted by a generator seeded by the window's
place. A small source's windows are kept after their first reading (`data.tokenize_once_mb`),
so its later epochs tokenize nothing. The window's documents are laid end to end with their
labels and positions computed at once, so packing is plain slicing. The
resume position is three integers (epoch, piece, window start record), plus the packer's
cursor in the window: restoring re-reads and re-permutes that one window, which is what
makes the shuffle exact.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from data_pipelines.config import DataConfig, SourceConfig
from data_pipelines.encoding import DocumentEncoder, Documents
from data_pipelines.readers import (
    BadInputLog,
    RawRecord,
    ReadOptions,
    ShardReader,
    WholeFileReader,
    is_whole_file,
    parse_record,
)
from data_pipelines.shards import Piece, Shard, epoch_pieces
from data_pipelines.tokenized import read_token_window

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
_TOKENIZE_BATCH = 64


@dataclass
class StreamPosition:
    """Which window a source stream is on; small and JSON-serialisable via `asdict`."""

    epoch: int = 0
    piece: int = 0
    window_start: int = 0
    """Record index in the shard where the window starts."""


@dataclass
class Window:
    """A window's documents laid end to end, with what packing needs per token."""

    tokens: np.ndarray
    """Token ids, in the dtype they were read or tokenized in."""
    labels: np.ndarray
    """The next token of the same document where it is a target, else IGNORE_INDEX (int32)."""
    positions: np.ndarray
    """Position of each token in its document."""
    ends: np.ndarray
    """Offset after each document's last token (ascending; the last is the window's length)."""
    end: int | None
    """Record index after the window; None when the shard has nothing after it."""

    def __len__(self) -> int:
        return len(self.tokens)


def make_window(documents: Documents, end: int | None, order: np.ndarray | None = None) -> Window:
    """The window of `documents` (rearranged into `order` when given) with labels and
    in-document positions, all vectorised, in 32-bit integers where they fit, since a window
    of long documents is larger than the CPU caches."""
    tokens, lengths, targets = documents.tokens, documents.lengths, documents.targets
    index = np.int32 if len(tokens) < 2**31 else np.int64
    if order is not None:
        starts = (np.cumsum(lengths) - lengths)[order]
        lengths = lengths[order]
    ends = np.cumsum(lengths)
    positions = np.arange(len(tokens), dtype=index)
    positions -= np.repeat((ends - lengths).astype(index), lengths)
    if order is not None:
        gather = np.repeat(starts.astype(index), lengths)
        gather += positions
        tokens = tokens[gather]
        targets = None if targets is None else targets[gather]
    labels = np.empty(len(tokens), dtype=np.int32)
    labels[:-1] = tokens[1:]
    if targets is not None:
        labels[:-1][~targets[1:]] = IGNORE_INDEX
    labels[ends - 1] = IGNORE_INDEX
    return Window(tokens, labels, positions, ends, end)


@dataclass(frozen=True)
class Slot:
    """One (rank, worker) reader among all of them."""

    index: int
    count: int


class SourceStream:
    """Endless windows of one source for one slot, resumable from a `StreamPosition`."""

    def __init__(
        self,
        source: SourceConfig,
        shards: list[Shard],
        slot: Slot,
        cfg: DataConfig,
        encoder: DocumentEncoder,
        log: BadInputLog,
        position: StreamPosition | None = None,
    ):
        self.source, self.shards, self.slot, self.cfg = source, shards, slot, cfg
        self.encoder, self.log = encoder, log
        self.options = ReadOptions(
            source.text_field if cfg.kind == "pretrain" else source.messages_field,
            source.text_split,
            cfg.max_retries,
            cfg.retry_backoff_s,
            cfg.max_document_chars,
        )
        self.position = position or StreamPosition()
        self._epoch_pieces: tuple[int, list[Piece]] = (-1, [])
        self.reader: ShardReader | None = None
        """The shard being read, kept open from one window to the next."""
        self.files = WholeFileReader(self.options)
        self.kept: dict[tuple[int, int, int, int], tuple[Documents, int | None]] | None = (
            {} if tokenized_once(shards, cfg.tokenize_once_mb) else None
        )
        """The windows read so far, by (shard, offset, stride, start), for a source small
        enough to tokenize once (None: every epoch reads again)."""
        # A window re-read on resume was already counted before the state was saved.
        self.window = self._load_window(
            BadInputLog(cfg.on_bad_input, muted=True) if position else log
        )

    def next_window(self) -> Window:
        """Move to the next non-empty window, through shards and epochs as needed."""
        passed = 0
        while True:
            if self.window.end is None:
                self._next_piece()
                passed += 1
            else:
                self.position.window_start = self.window.end
            self.window = self._load_window(self.log)
            if len(self.window):
                return self.window
            # More pieces started than an epoch has, all without a usable document.
            if passed > len(self._pieces()):
                raise ValueError(
                    f"source {self.source.name!r} has no usable documents for slot "
                    f"{self.slot.index} of {self.slot.count} in a whole epoch"
                )

    def _next_piece(self) -> None:
        position = self.position
        position.piece += 1
        if position.piece >= len(self._pieces()):
            position.epoch, position.piece = position.epoch + 1, 0
            if self.slot.index == 0:  # one line per source, not one per reading slot
                logger.info(
                    "source %r: epoch %d begins (its documents are read again, reshuffled)",
                    self.source.name,
                    position.epoch + 1,
                )
        position.window_start = 0

    def _pieces(self) -> list[Piece]:
        if self._epoch_pieces[0] != self.position.epoch:
            self._epoch_pieces = (self.position.epoch, self._compute_pieces())
        return self._epoch_pieces[1]

    def _compute_pieces(self) -> list[Piece]:
        return epoch_pieces(
            len(self.shards),
            slot=self.slot.index,
            num_slots=self.slot.count,
            epoch=self.position.epoch,
            seed=self.cfg.seed,
            name=self.source.name,
            shuffle=self.cfg.shuffle,
        )

    def _load_window(self, log: BadInputLog) -> Window:
        """Read, tokenize and (with shuffling) permute the window at the current position."""
        piece = self._pieces()[self.position.piece]
        shard = self.shards[piece.shard]
        start = self.position.window_start
        if shard.format == "tokens":
            limits = (self.cfg.shuffle_window, self.cfg.window_tokens)
            documents, end = read_token_window(shard, start, piece.offset, piece.stride, *limits)
        else:
            key = (piece.shard, piece.offset, piece.stride, start)
            kept = None if self.kept is None else self.kept.get(key)
            if kept is None:
                documents, end, clean = self._read_documents(shard, start, piece, log)
                if self.kept is not None and clean:
                    self.kept[key] = (documents, end)
            else:
                documents, end = kept
        return make_window(documents, end, self._order(piece.shard, len(documents)))

    def _read_documents(
        self, shard: Shard, start: int, piece: Piece, log: BadInputLog
    ) -> tuple[Documents, int | None, bool]:
        """The window's documents from record `start` on, the record index after the last
        one (None when the shard ended before the window filled), and whether reading it
        reported or noted no record.

        Records are tokenized `_TOKENIZE_BATCH` at a time, so reading may run past the
        window's end; bad records found there are left for the next window to report.
        """
        builder = _WindowBuilder(self.cfg.shuffle_window, self.cfg.window_tokens)
        deferred = _DeferredLog(log)
        indices: list[int] = []
        payloads: list = []
        for record in self._records(shard, start, deferred):
            deferred.index = record.index
            if record.index % piece.stride != piece.offset:
                continue
            payload = parse_record(record, shard, self.options, self.cfg.kind, deferred)
            if payload is not None:
                indices.append(record.index)
                payloads.append(payload)
            if len(payloads) == builder.batch_size():
                builder.add(indices, payloads, self.encoder)
                indices, payloads = [], []
                if builder.full():
                    break
        if payloads:
            builder.add(indices, payloads, self.encoder)
        end = builder.last_index + 1 if builder.full() else None
        deferred.commit(end)
        clean = not deferred.reports and not deferred.notes
        return builder.documents(), end, clean

    def _records(self, shard: Shard, start: int, log: _DeferredLog) -> Iterator[RawRecord]:
        if start == 0 and is_whole_file(shard, self.options):
            pieces = self._pieces()
            following = (
                self.shards[pieces[i].shard] for i in range(self.position.piece + 1, len(pieces))
            )
            return self.files.records(shard, following, log)
        if self.reader is None or self.reader.shard is not shard:
            if self.reader is not None:
                self.reader.close()
            self.reader = ShardReader(shard, self.options)
        return self.reader.records(start, log)

    def _order(self, shard: int, count: int) -> np.ndarray | None:
        if not self.cfg.shuffle or count < 2:
            return None
        name = zlib.crc32(self.source.name.encode())
        seed = [
            self.cfg.seed,
            name,
            self.position.epoch,
            shard,
            self.position.window_start,
            self.slot.index,
        ]
        return np.random.default_rng(seed).permutation(count)


def tokenized_once(shards: list[Shard], limit_mb: float) -> bool:
    """Whether a source's windows are kept after their first reading: its files are local,
    of known size, at most ``limit_mb`` MB in all, and not token files (which are read as
    arrays, with nothing to tokenize)."""
    return (
        limit_mb > 0
        and all(not s.remote and s.size >= 0 and s.format != "tokens" for s in shards)
        and sum(s.size for s in shards) <= limit_mb * 1e6
    )


class _WindowBuilder:
    """Collects documents until `size` of them or `max_tokens` tokens (the document that
    reaches the limit included), the same rule as `read_token_window`."""

    def __init__(self, size: int, max_tokens: int):
        self.size, self.max_tokens = size, max_tokens
        self.parts: list[Documents] = []
        self.count = self.tokens = 0
        self.last_index = -1
        """Record index of the last document taken."""

    def batch_size(self) -> int:
        """Documents to tokenize next: enough to fill the window at the mean length so far,
        so that little is tokenized past the window's end."""
        room = self.size - self.count
        if not self.count:
            return min(_TOKENIZE_BATCH, room)
        mean = self.tokens / self.count
        return max(1, min(_TOKENIZE_BATCH, room, math.ceil((self.max_tokens - self.tokens) / mean)))

    def full(self) -> bool:
        return self.count == self.size or self.tokens >= self.max_tokens

    def add(self, indices: list[int], payloads: list, encoder: DocumentEncoder) -> None:
        """Tokenize a batch and take its documents up to the window's limits."""
        assert not self.full()
        documents = encoder.encode(payloads)
        totals = self.tokens + np.cumsum(documents.lengths)
        reaching = int(np.searchsorted(totals, self.max_tokens))
        keep = min(len(documents), self.size - self.count, reaching + 1)
        self.parts.append(documents.head(keep) if keep < len(documents) else documents)
        self.count += keep
        self.tokens = int(totals[keep - 1])
        self.last_index = indices[keep - 1]

    def documents(self) -> Documents:
        if not self.parts:
            return Documents(np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int64))
        return Documents.concatenate(self.parts)


class _DeferredLog:
    """Holds bad-record reports until the window's end is known (the error policy still
    raises at once)."""

    def __init__(self, log: BadInputLog):
        self.log, self.index = log, 0
        self.reports: list[tuple[int, str, str, str]] = []
        self.notes: list[tuple[int, str, str, str]] = []

    def report(self, kind: str, where: str, detail: str) -> None:
        if self.log.policy == "error":
            self.log.report(kind, where, detail)
        self.reports.append((self.index, kind, where, detail))

    def note(self, kind: str, where: str, detail: str) -> None:
        self.notes.append((self.index, kind, where, detail))

    def commit(self, end: int | None) -> None:
        """Pass on the reports and notes of records before `end` (all of them when None)."""
        for entries, record in ((self.reports, self.log.report), (self.notes, self.log.note)):
            for index, kind, where, detail in entries:
                if end is None or index < end:
                    record(kind, where, detail)
