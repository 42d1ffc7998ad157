"""Streaming records out of shard files, and what happens to bad ones.

Every format is read as a stream from a record index on (a line, a paragraph, a row), so a
resumed reader starts where the saved position says without loading the file. A record that
cannot be used is reported to a `BadInputLog` with its file and line and skipped, or raises
under the `error` policy. A remote read that fails is retried with exponential backoff from
the record where it broke.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from data_pipelines.shards import Shard

logger = logging.getLogger(__name__)

_TRUNCATION_ERRORS = (EOFError, zstandard.ZstdError, gzip.BadGzipFile, zlib.error, pa.ArrowInvalid)
_LOGGED_PER_KIND = 100


class BadInputError(ValueError):
    """A bad record under the `error` policy."""


class RemoteReadError(RuntimeError):
    """A remote shard kept failing after every retry."""


class BadInputLog:
    """Counts bad records by kind, logs them with their location, or raises (policy `error`).

    A muted log counts and raises but does not log: it serves a window re-read on resume,
    whose bad records were logged before.
    """

    def __init__(self, policy: str, counts: dict[str, int] | None = None, muted: bool = False):
        self.policy = policy
        self.muted = muted
        self.counts: Counter[str] = Counter(counts or {})

    def report(self, kind: str, where: str, detail: str) -> None:
        """Record one bad record of `kind` found at `where` (file:line)."""
        self.counts[kind] += 1
        message = f"{where}: {kind.replace('_', ' ')}: {detail}"
        if self.policy == "error":
            raise BadInputError(message)
        if self.muted:
            return
        if self.counts[kind] <= _LOGGED_PER_KIND:
            logger.warning("skipped %s", message)
        if self.counts[kind] == _LOGGED_PER_KIND:
            logger.warning("further %s records are counted but not logged", kind)


@dataclass(frozen=True)
class RawRecord:
    """A record before parsing: its index in the shard, its line, and its raw value."""

    index: int
    line: int
    value: Any


@dataclass(frozen=True)
class ReadOptions:
    """How to read a shard: the fields to pull and the retry policy for remote files."""

    field: str
    text_split: str = "paragraph"
    max_retries: int = 5
    retry_backoff_s: float = 1.0


def read_raw(
    shard: Shard, start: int, options: ReadOptions, log: BadInputLog
) -> Iterator[RawRecord]:
    """Records of `shard` from index `start` on; retries remote failures with backoff."""
    attempt, position = 0, start
    while True:
        try:
            for record in _read_once(shard, position, options, log):
                position = record.index + 1
                yield record
            return
        except _TRUNCATION_ERRORS as error:
            log.report("truncated_file", f"{shard.path}:{position + 1}", repr(error))
            return
        except (BadInputError, ValueError):
            raise
        except Exception as error:
            if not shard.remote:
                raise
            attempt += 1
            if attempt >= options.max_retries:
                raise RemoteReadError(
                    f"reading {shard.path} failed {attempt} times, last with {error!r}"
                ) from error
            wait = options.retry_backoff_s * 2 ** (attempt - 1)
            logger.warning(
                "reading %s failed (%r); retry %d in %.1fs", shard.path, error, attempt, wait
            )
            time.sleep(wait)


def _read_once(
    shard: Shard, start: int, options: ReadOptions, log: BadInputLog
) -> Iterator[RawRecord]:
    if shard.format == "parquet":
        yield from _parquet_records(shard, start, options.field, log)
    elif shard.format == "arrow":
        yield from _arrow_records(shard, start, options.field, log)
    elif shard.format == "text":
        yield from _text_records(shard, start, options.text_split)
    else:
        yield from _line_records(shard, start)


def open_binary(shard: Shard):
    """A binary file object for `shard`, decompressed for json.gz and json.zst; closing it
    closes the underlying file."""
    if shard.format == "json.zst":
        raw = open(shard.path, "rb") if not shard.remote else fsspec.open(shard.path, "rb").open()
        return io.BufferedReader(_ZstdReader(raw))
    compression = "gzip" if shard.format == "json.gz" else None
    if shard.remote:
        return fsspec.open(shard.path, "rb", compression=compression).open()
    return gzip.open(shard.path, "rb") if compression else open(shard.path, "rb")


class _ZstdReader(io.RawIOBase):
    """Decompresses a zstd stream of one or more frames; EOFError when it ends inside one
    (zstandard's own stream reader ends silently there, hiding a truncated file)."""

    def __init__(self, raw):
        self.raw = raw
        self.decompressor = zstandard.ZstdDecompressor()
        self.frame = None
        self.pending, self.offset = memoryview(b""), 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self.offset == len(self.pending):
            chunk = self.raw.read(1 << 20)
            if not chunk:
                if self.frame is not None and not self.frame.eof:
                    raise EOFError("the zstd stream ends inside a frame")
                return 0
            self.pending, self.offset = memoryview(self._decompress(chunk)), 0
        size = min(len(buffer), len(self.pending) - self.offset)
        buffer[:size] = self.pending[self.offset : self.offset + size]
        self.offset += size
        return size

    def _decompress(self, chunk: bytes) -> bytes:
        parts = []
        while chunk:
            if self.frame is None or self.frame.eof:
                self.frame = self.decompressor.decompressobj()
            parts.append(self.frame.decompress(chunk))
            chunk = self.frame.unused_data if self.frame.eof else b""
        return b"".join(parts)

    def close(self) -> None:
        self.raw.close()
        super().close()


def _line_records(shard: Shard, start: int) -> Iterator[RawRecord]:
    with open_binary(shard) as file:
        for index, line in enumerate(file):
            if index >= start:
                yield RawRecord(index, index + 1, line)


def _text_records(shard: Shard, start: int, split: str) -> Iterator[RawRecord]:
    with open_binary(shard) as file:
        if split == "file":
            if start == 0:
                yield RawRecord(0, 1, file.read())
            return
        if split == "line":
            lines = enumerate(file)
            yield from (
                RawRecord(i, i + 1, line.rstrip(b"\r\n")) for i, line in lines if i >= start
            )
            return
        yield from (record for record in _paragraphs(file) if record.index >= start)


def _paragraphs(file) -> Iterator[RawRecord]:
    index, first_line, lines = 0, 1, []
    for number, line in enumerate(file, start=1):
        if line.strip():
            if not lines:
                first_line = number
            lines.append(line)
        elif lines:
            yield RawRecord(index, first_line, b"".join(lines).rstrip(b"\r\n"))
            index, lines = index + 1, []
    if lines:
        yield RawRecord(index, first_line, b"".join(lines).rstrip(b"\r\n"))


def _parquet_records(shard: Shard, start: int, field: str, log: BadInputLog) -> Iterator[RawRecord]:
    with open_binary(shard) as file:
        parquet = pq.ParquetFile(file)
        if field not in parquet.schema_arrow.names:
            log.report("missing_field", f"{shard.path}:1", f"no column {field!r}")
            return
        first = 0
        for group in range(parquet.num_row_groups):
            rows = parquet.metadata.row_group(group).num_rows
            if first + rows > start:
                table = parquet.read_row_group(group, columns=[field])
                yield from _column_records(table.column(field), first, start)
            first += rows


def _arrow_records(shard: Shard, start: int, field: str, log: BadInputLog) -> Iterator[RawRecord]:
    with open_binary(shard) as file:
        source = pa.PythonFile(file, mode="r")
        try:
            batches = pa.ipc.open_stream(source)
        except pa.ArrowInvalid:
            file.seek(0)
            reader = pa.ipc.open_file(pa.PythonFile(file, mode="r"))
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        first = 0
        for batch in batches:
            if field not in batch.schema.names:
                log.report("missing_field", f"{shard.path}:1", f"no column {field!r}")
                return
            if first + batch.num_rows > start:
                yield from _column_records(batch.column(field), first, start)
            first += batch.num_rows


def _column_records(column, first: int, start: int) -> Iterator[RawRecord]:
    for offset, value in enumerate(column.to_pylist()):
        index = first + offset
        if index >= start:
            yield RawRecord(index, index + 1, value)


def parse_record(
    record: RawRecord, shard: Shard, options: ReadOptions, kind: str, log: BadInputLog
):
    """The payload of a raw record: a document's text (pretrain) or its messages (sft).

    Returns None, after reporting to `log`, when the record is unusable.
    """
    where = f"{shard.path}:{record.line}"
    value = record.value
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as error:
            log.report("undecodable", where, str(error))
            return None
    if shard.format in ("jsonl", "json.gz", "json.zst"):
        value = _json_field(value, options.field, where, log)
        if value is None:
            return None
    if kind == "sft":
        return _messages(value, where, log)
    if not isinstance(value, str):
        log.report("missing_field", where, f"{options.field!r} is {type(value).__name__}, not text")
        return None
    if not value.strip():
        log.report("empty_document", where, "no text")
        return None
    return value


def _json_field(line: str, field: str, where: str, log: BadInputLog):
    if not line.strip():
        log.report("empty_document", where, "blank line")
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        log.report("malformed", where, str(error))
        return None
    if not isinstance(record, dict) or record.get(field) is None:
        log.report("missing_field", where, f"no field {field!r}")
        return None
    return record[field]


def _messages(value, where: str, log: BadInputLog) -> list[tuple[str, str]] | None:
    if not isinstance(value, list) or not value:
        log.report("bad_messages", where, "not a non-empty list of messages")
        return None
    messages = []
    for message in value:
        if not isinstance(message, dict):
            log.report("bad_messages", where, f"message {message!r} is not a mapping")
            return None
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            log.report("bad_messages", where, "a message lacks a text role or content")
            return None
        messages.append((role, content))
    if not any(role == "assistant" for role, _ in messages):
        log.report("bad_messages", where, "no assistant message, so nothing to learn")
        return None
    return messages
