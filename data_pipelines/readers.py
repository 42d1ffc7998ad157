"""Streaming records out of shard files, and what happens to bad ones.

Every shard is read through `datasets.load_dataset(..., streaming=True)`, one
`IterableDataset` per shard, from a record index on (a line, a paragraph, a row), so a
resumed reader starts where the saved position says without downloading or loading the
file; files that are one record each share one stream (`WholeFileReader`). Line formats go through the `text` builder, which decompresses `.gz` by suffix, and
are parsed here line by line so a bad line is reported with its number; parquet and arrow
go through their own builders. A record that cannot be used is reported to a
`BadInputLog` with its file and line and skipped, or raises under the `error` policy. A
remote read that fails is retried with exponential backoff from the record where it broke.

Two kinds of line-format shard are read directly, as the `text` builder reads them (latin-1,
universal newlines): `json.zst`, because fsspec's zstd stream reader, which `datasets`
decompresses through, ends silently when the file ends inside a frame, so a truncated file
would pass unnoticed (`_ZstdReader` raises there instead); and http(s) URLs, because the
`text` builder's `encoding` argument reaches fsspec's HTTP filesystem as a request option,
which aiohttp rejects, so `datasets` cannot stream a text file over HTTP.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import logging
import time
import zlib
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice, takewhile
from typing import Any, NamedTuple

import datasets
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from data_pipelines.shards import Shard

logger = logging.getLogger(__name__)

# `load_dataset` otherwise pings the Hub once per call, here once per shard opened.
datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False

_TRUNCATION_ERRORS = (EOFError, zstandard.ZstdError, gzip.BadGzipFile, zlib.error, pa.ArrowInvalid)
_LOGGED_PER_KIND = 100
_BUILDERS = {
    "jsonl": "text",
    "json.gz": "text",
    "json.zst": "text",
    "text": "text",
    "parquet": "parquet",
    "arrow": "arrow",
}
_JSON_FORMATS = ("jsonl", "json.gz", "json.zst")
_ROWS_PER_BATCH = 1024
_CHUNK_BYTES = 1 << 20
"""Bytes of a line-format shard the `text` builder reads at a time."""
_FILES_PER_STREAM = 1024
"""Whole files read through one `datasets` stream at most."""


class BadInputError(ValueError):
    """A bad record under the `error` policy."""


class RemoteReadError(RuntimeError):
    """A remote shard kept failing after every retry."""


class BadInputLog:
    """Counts bad records by kind, logs them with their location, or raises (policy `error`);
    also counts and logs records that are used but noted (`note`: a long document).

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
        self._log(kind, "skipped " + message)

    def note(self, kind: str, where: str, detail: str) -> None:
        """Record one record of `kind` at `where` that is used, but not as it stands."""
        self.counts[kind] += 1
        self._log(kind, f"{where}: {kind.replace('_', ' ')}: {detail}")

    def _log(self, kind: str, message: str) -> None:
        if self.muted:
            return
        if self.counts[kind] <= _LOGGED_PER_KIND:
            logger.warning("%s", message)
        if self.counts[kind] == _LOGGED_PER_KIND:
            logger.warning("further %s records are counted but not logged", kind)


class RawRecord(NamedTuple):
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
    max_document_chars: int | None = None
    """Longer pre-training documents are noted (`long_document`), longer SFT conversations
    skipped (`too_long`); None: no limit."""
    salvage: bool = False
    """Reading a truncated shard again up to its break, a line or a row at a time: the
    builders lose the whole chunk or batch the file breaks in."""


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
        except BadInputError:
            raise
        except Exception as error:
            truncated = _is_truncation(error, shard)
            # A remote file that ends early may be a response cut short: read it again
            # first, and take it for a truncated file only when every attempt ends there.
            if truncated and (not shard.remote or attempt + 1 >= options.max_retries):
                if not options.salvage and not reads_directly(shard):
                    options = dataclasses.replace(options, salvage=True)
                    continue
                log.report("truncated_file", f"{shard.path}:{position + 1}", repr(error))
                return
            if not truncated and (isinstance(error, ValueError) or not shard.remote):
                raise
            if _is_missing(error):
                raise RemoteReadError(f"{shard.path}: no such remote file") from error
            attempt += 1
            if attempt >= options.max_retries:
                raise RemoteReadError(
                    f"reading {shard.path} failed {attempt} times, last with {error!r}"
                ) from error
            wait = options.retry_backoff_s * 2 ** (attempt - 1)
            logger.warning(
                "reading %s failed (%r); retry %d in %.3gs", shard.path, error, attempt, wait
            )
            time.sleep(wait)


def _is_missing(error: BaseException | None) -> bool:
    """A file that is not there, as opposed to a read that failed on the way: fsspec's HTTP
    filesystem raises FileNotFoundError for any failure to reach a file, from the actual
    error, which for a missing file is a 404 or 410 response."""
    if not isinstance(error, FileNotFoundError):
        return False
    cause = error.__cause__
    return cause is None or _is_missing(cause) or getattr(cause, "status", None) in (404, 410)


def _is_truncation(error: Exception, shard: Shard) -> bool:
    """A file that ends early: a decompressor or arrow error, or (local files) pyarrow's
    errno-less OSError for a short message body."""
    if isinstance(error, _TRUNCATION_ERRORS):
        return True
    return isinstance(error, OSError) and error.errno is None and not shard.remote


def shard_dataset(shard: Shard, options: ReadOptions) -> datasets.IterableDataset:
    """The streamed `datasets` view of one shard (split "train"): rows of {"text": line} for
    line formats (undecoded, as latin-1, so that each line's UTF-8 is checked here), or of
    `options.field` for parquet and arrow."""
    builder = _BUILDERS[shard.format]
    kwargs: dict[str, Any] = {}
    if builder == "text":
        kwargs = _text_options(
            whole=is_whole_file(shard, options),
            chunk_bytes=1 if options.salvage else _CHUNK_BYTES,
        )
    elif builder == "parquet":
        kwargs = dict(columns=[options.field])
    return datasets.load_dataset(
        builder, data_files=[shard.path], split="train", streaming=True, **kwargs
    )


def is_whole_file(shard: Shard, options: ReadOptions) -> bool:
    """Whether `shard` is one record: a `text` file read whole (`text_split: file`)."""
    return shard.format == "text" and options.text_split == "file"


def reads_directly(shard: Shard) -> bool:
    """Whether `shard` is read here rather than through `datasets` (see the module's doc)."""
    if shard.format == "json.zst":
        return True
    return _BUILDERS[shard.format] == "text" and shard.path.startswith(("http://", "https://"))


def _text_options(whole: bool, chunk_bytes: int) -> dict[str, Any]:
    return dict(
        encoding="latin-1",
        keep_linebreaks=True,
        chunksize=chunk_bytes,
        sample_by="document" if whole else "line",
    )


def _whole_file(text: str) -> bytes:
    return _latin1_bytes(text).rstrip(b"\r\n")


def _read_once(
    shard: Shard, start: int, options: ReadOptions, log: BadInputLog
) -> Iterator[RawRecord]:
    if _BUILDERS[shard.format] != "text":
        dataset = shard_dataset(shard, options)
        if options.field not in (dataset.features or {}):
            log.report("missing_field", f"{shard.path}:1", f"no column {options.field!r}")
            return
        batch_size = 1 if options.salvage else _ROWS_PER_BATCH
        yield from _rows(dataset, options.field, start, lambda value: value, batch_size)
    elif shard.format == "text" and options.text_split == "paragraph":
        lines = _line_records(shard, 0, _latin1_bytes, options)
        yield from (record for record in _paragraphs(lines) if record.index >= start)
    elif shard.format == "text":
        yield from _line_records(shard, start, _whole_file, options)
    else:
        yield from _line_records(shard, start, _latin1_bytes, options)


def _line_records(shard: Shard, start: int, convert, options: ReadOptions) -> Iterator[RawRecord]:
    """Records of a line-format shard (lines, or the whole file read whole) from `start` on."""
    if reads_directly(shard):
        yield from _direct_records(shard, start, convert, is_whole_file(shard, options))
        return
    batch_size = 1 if options.salvage else _ROWS_PER_BATCH
    yield from _rows(shard_dataset(shard, options), "text", start, convert, batch_size)


def _direct_records(shard: Shard, start: int, convert, whole: bool) -> Iterator[RawRecord]:
    """What the `text` builder would give for `shard`, read here: lines decoded as latin-1
    with universal newlines, each record handed to `convert` as the builder's row would be."""
    compression = "gzip" if shard.format == "json.gz" else None
    with _open_binary(shard.path, compression) as binary:
        raw = io.BufferedReader(_ZstdReader(binary)) if shard.format == "json.zst" else binary
        with io.TextIOWrapper(raw, encoding="latin-1", newline=None) as file:
            rows = [file.read()] if whole else file
            for index, line in enumerate(rows):
                if index >= start:
                    yield RawRecord(index, index + 1, convert(line))


def _rows(
    dataset: datasets.IterableDataset, column: str, start: int, convert, batch_size: int
) -> Iterator[RawRecord]:
    """Rows of `dataset` from `start` on (skipped by the stream, not loaded) as records."""
    if start:
        dataset = dataset.skip(start)
    index = start
    for table in dataset.with_format("arrow").iter(batch_size=batch_size):
        for value in table.column(column).to_pylist():
            yield RawRecord(index, index + 1, convert(value))
            index += 1


def _latin1_bytes(line: str) -> bytes:
    return line.encode("latin-1")


def _paragraphs(records: Iterator[RawRecord]) -> Iterator[RawRecord]:
    """Lines grouped into paragraphs at blank lines (whitespace-only ones included), each
    at the line where it starts; the `text` builder's own `sample_by="paragraph"` splits on
    exactly two newlines and keeps no line numbers."""
    index, first_line, lines = 0, 1, []
    for record in records:
        if record.value.strip():
            if not lines:
                first_line = record.line
            lines.append(record.value)
        elif lines:
            yield RawRecord(index, first_line, b"".join(lines).rstrip(b"\r\n"))
            index, lines = index + 1, []
    if lines:
        yield RawRecord(index, first_line, b"".join(lines).rstrip(b"\r\n"))


def _open_binary(path: str, compression: str | None):
    """A context manager of `path` opened for reading bytes in order, whose exit closes
    every layer (fsspec's `OpenFile`: a gzip stream does not close the response under it);
    over HTTP one streamed response (`block_size=0`), which needs no range requests, so any
    server will do."""
    if "://" not in path:
        return gzip.open(path) if compression else open(path, "rb")
    options = {"block_size": 0} if path.startswith(("http://", "https://")) else {}
    return fsspec.open(path, "rb", compression=compression, **options)


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


class ShardReader:
    """One shard read for successive windows through one open stream.

    A window may read records past its end (they are tokenized in batches), so the records
    read since the last requested start are kept and replayed; a start outside them opens
    the shard again at that record. What the stream reports at its end (a truncated file)
    is reported again to a window that starts at or before the last record read, as a
    fresh read would.
    """

    def __init__(self, shard: Shard, options: ReadOptions):
        self.shard, self.options = shard, options
        self._records: Iterator[RawRecord] | None = None
        self._buffer: list[RawRecord] = []
        self._next = 0
        self._ended = False
        self._end_reports: list[tuple[int, str, str, str]] = []
        self._log: BadInputLog | None = None

    def close(self) -> None:
        """Close the open stream now: it refers back to this reader (its log), so dropping
        the reader alone leaves the file or HTTP response open until a garbage collection."""
        if self._records is not None:
            self._records.close()
            self._records = None

    def report(self, kind: str, where: str, detail: str) -> None:
        """Forwarded to the current window's log, and kept for a window that re-reads."""
        self._end_reports.append((self._next - 1, kind, where, detail))
        self._log.report(kind, where, detail)

    def records(self, start: int, log: BadInputLog) -> Iterator[RawRecord]:
        """The shard's records from index `start` on, reports going to `log`."""
        self._log = log
        first = self._buffer[0].index if self._buffer else self._next
        if self._records is None or not first <= start <= self._next:
            self.close()
            self._records = read_raw(self.shard, start, self.options, self)
            self._buffer, self._next, self._ended, self._end_reports = [], start, False, []
        self._buffer = [record for record in self._buffer if record.index >= start]
        yield from list(self._buffer)
        if self._ended:
            for last, kind, where, detail in self._end_reports:
                if start <= last:
                    log.report(kind, where, detail)
            return
        for record in self._records:
            self._buffer.append(record)
            self._next = record.index + 1
            yield record
        self._ended = True


class WholeFileReader:
    """Shards of one record each (see `is_whole_file`) read through one `datasets` stream
    over the files a slot reads next.

    `load_dataset` costs more than reading and tokenizing a typical source file, so it runs
    once per run of up to `_FILES_PER_STREAM` files rather than once per file. A file the
    stream fails on is read alone by `read_raw`, which retries or reports it as it does for
    any shard, and the stream reopens at the file after it.
    """

    def __init__(self, options: ReadOptions):
        self.options = options
        self._paths: deque[str] = deque()
        """Files left in the open stream, in its order."""
        self._rows: Iterator[str] = iter(())

    def records(
        self, shard: Shard, following: Iterable[Shard], log: BadInputLog
    ) -> Iterator[RawRecord]:
        """The record of `shard`; `following` are the shards the slot reads after it, of
        which those up to the first that is not a whole file join a stream opened here."""
        if reads_directly(shard):
            yield from read_raw(shard, 0, self.options, log)
            return
        try:
            if not self._paths or self._paths[0] != shard.path:
                whole = takewhile(
                    lambda other: is_whole_file(other, self.options) and not reads_directly(other),
                    following,
                )
                self._open([shard, *islice(whole, _FILES_PER_STREAM - 1)])
            self._paths.popleft()
            text = next(self._rows)
        except Exception as error:
            logger.debug("the stream of whole files failed at %s (%r)", shard.path, error)
            self._paths.clear()
            yield from read_raw(shard, 0, self.options, log)
            return
        yield RawRecord(0, 1, _whole_file(text))

    def _open(self, shards: list[Shard]) -> None:
        paths = [shard.path for shard in shards]
        dataset = datasets.load_dataset(
            "text",
            data_files=paths,
            split="train",
            streaming=True,
            **_text_options(whole=True, chunk_bytes=_CHUNK_BYTES),
        )
        if dataset.num_shards != len(paths):
            raise ValueError(f"{len(paths)} files resolved to {dataset.num_shards}")
        tables = dataset.with_format("arrow").iter(batch_size=1)
        self._rows = (table.column("text")[0].as_py() for table in tables)
        self._paths = deque(paths)


_PROBED_RECORDS = 20
_MAGIC = {
    "parquet": (b"PAR1",),
    "arrow": (b"ARROW1", b"\xff\xff\xff\xff"),
    "json.gz": (b"\x1f\x8b",),
    "json.zst": (b"\x28\xb5\x2f\xfd",),
}


def probe_problem(shard: Shard, options: ReadOptions, kind: str) -> str | None:
    """Why local `shard` cannot be what its source declares, judged from its first bytes,
    before any worker starts: not a parquet, arrow, gzip or zstd file at all; no column
    `options.field`; or a JSON line format whose first records are all unusable (a wrong
    field name or format: single bad records are bad input, skipped or raised by policy).
    None when it looks right; remote, text and pre-tokenized shards are not probed."""
    if shard.remote or shard.format not in (*_MAGIC, "jsonl"):
        return None
    with open(shard.path, "rb") as file:
        head = file.read(8)
    if not head:
        return f"{shard.path}: the file is empty"
    if shard.format in _MAGIC and not head.startswith(_MAGIC[shard.format]):
        return f"{shard.path}: not a {shard.format} file (it starts with {head!r})"
    try:
        if shard.format in ("parquet", "arrow"):
            names = _schema(shard).names
            missing = options.field not in names
            return f"{shard.path}: no column {options.field!r} (has {names})" if missing else None
        return _first_records_problem(shard, options, kind)
    except Exception as e:  # damaged: bad input, unless every probed file of the source is
        return f"{shard.path}: unreadable ({type(e).__name__}: {e})"


def _schema(shard: Shard) -> pa.Schema:
    if shard.format == "parquet":
        return pq.read_schema(shard.path)
    with open(shard.path, "rb") as file:
        opener = pa.ipc.open_file if file.read(6) == b"ARROW1" else pa.ipc.open_stream
    with pa.memory_map(shard.path) as source:
        return opener(source).schema


def _first_records_problem(shard: Shard, options: ReadOptions, kind: str) -> str | None:
    seen, lines = Counter(), 0
    for record in islice(_direct_records(shard, 0, _latin1_bytes, False), _PROBED_RECORDS * 5):
        lines += 1
        if not record.value.strip():
            continue
        try:
            _payload(record.value, shard.format, options.field, kind)
            return None
        except _Unusable as problem:
            seen[f"{problem.kind.replace('_', ' ')}: {problem}"] += 1
        if sum(seen.values()) == _PROBED_RECORDS:
            break
    if not seen:  # blank lines only: the whole file, or as far as the probe reads
        return f"{shard.path}: holds no records" if lines < _PROBED_RECORDS * 5 else None
    count, (most, _) = sum(seen.values()), seen.most_common(1)[0]
    return (
        f"{shard.path}: its first {count} records are all unusable ({most}); check the "
        "source's format and field names"
    )


def parse_record(
    record: RawRecord, shard: Shard, options: ReadOptions, kind: str, log: BadInputLog
):
    """The payload of a raw record: a document's text (pretrain) or its messages (sft).

    Returns None, after reporting to `log`, when the record is unusable.
    """
    where = f"{shard.path}:{record.line}"
    try:
        payload = _payload(record.value, shard.format, options.field, kind)
        limit = options.max_document_chars
        if limit is not None:
            size = len(payload) if kind == "pretrain" else sum(len(c) for _, c in payload)
            if size > limit and kind == "sft":
                raise _Unusable(
                    "too_long",
                    f"{size:,} characters of content, over {limit:,} (max_document_chars)",
                )
            if size > limit:
                detail = f"{size:,} characters, tokenized in pieces of at most {limit:,}"
                log.note("long_document", where, detail)
        return payload
    except _Unusable as problem:
        log.report(problem.kind, where, str(problem))
        return None


class _Unusable(Exception):
    """Why a record cannot be used: a bad-input kind and the detail."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind


def _payload(value, fmt: str, field: str, kind: str):
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as error:
            raise _Unusable("undecodable", str(error)) from None
    if fmt in _JSON_FORMATS:
        value = _json_field(value, field)
    if kind == "sft":
        return _messages(value)
    if not isinstance(value, str):
        raise _Unusable("missing_field", f"{field!r} is {type(value).__name__}, not text")
    if _blank(value):
        raise _Unusable("empty_document", "no text")
    return value


def _blank(text: str) -> bool:
    """Whether `text` is empty or all whitespace (`not text.strip()`, without the copy)."""
    return not text or text.isspace()


def _json_field(line: str, field: str):
    if _blank(line):
        raise _Unusable("empty_document", "blank line")
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise _Unusable("malformed", str(error)) from None
    if not isinstance(record, dict) or record.get(field) is None:
        raise _Unusable("missing_field", f"no field {field!r}")
    return record[field]


def _messages(value) -> list[tuple[str, str]]:
    if not isinstance(value, list) or not value:
        raise _Unusable("bad_messages", "not a non-empty list of messages")
    messages = []
    for message in value:
        if not isinstance(message, dict):
            raise _Unusable("bad_messages", f"message {message!r} is not a mapping")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise _Unusable("bad_messages", "a message lacks a text role or content")
        messages.append((role, content))
    if not any(role == "assistant" for role, _ in messages):
        raise _Unusable("bad_messages", "no assistant message, so nothing to learn")
    return messages
