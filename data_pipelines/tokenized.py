"""Pre-tokenized binary shards: writing them from any source, checking them, reading them back.

One output shard per input shard, in the input's order: `NNNNN.bin` holds the token ids of
every document back to back (EOS included) and `NNNNN.idx.npy` the int64 end offset of each
*record* of the input shard. A record skipped as bad input keeps its place as an empty
document, so a document's index is its record's index, on which the streamed path keys
windows, shuffle seeds and slot ownership; the reader skips empty documents where the
streamed reader skips bad records, so both give the same batches. `tokens.json` in the same
directory, written last and atomically once every shard is complete, marks the directory
finished and records the dtype (uint16 when the vocabulary fits, else uint32), the shard
count and the tokenizer with a fingerprint of it. Both files are memory-mapped per shard, so
nothing global is ever loaded.
"""

from __future__ import annotations

import glob
import json
import multiprocessing
import os
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from data_pipelines.encoding import DocumentEncoder, Documents
from data_pipelines.readers import BadInputLog, ReadOptions, parse_record, read_raw
from data_pipelines.shards import TOKENS_META, Shard, first_middle_last, is_remote, resolve_shards
from data_pipelines.tokenizer import tokenizer_problem, tokenizer_summary
from looplm.files import PARTIAL, write_atomically

if TYPE_CHECKING:  # config imports this module
    from data_pipelines.config import DataConfig, SourceConfig

META_FILE = TOKENS_META
_BIN, _INDEX, _PARTIAL = ".bin", ".idx.npy", ".partial"
_TOKEN_DTYPES = ("uint16", "uint32")
_MIN_NAME_DIGITS = 5


class TokenShardError(ValueError):
    """A pre-tokenized shard, its index or its directory's `tokens.json` is missing or
    damaged; the message names the file."""


class OutputNotEmptyError(ValueError):
    """`pretokenize` was pointed at a directory holding files, without `overwrite`."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype holding every id of a vocabulary."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def shard_name(index: int, count: int) -> str:
    """File stem of output shard `index` of `count`: zero-padded to a width that every index
    of the run shares, so that the names sort in the input's order."""
    return f"{index:0{max(_MIN_NAME_DIGITS, len(str(count - 1)))}d}"


def tokenizer_fingerprint(tokenizer: str) -> tuple[str, int]:
    """The sha256 of a tokenizer's canonical JSON and its vocabulary size: what
    `tokens.json` records (see `TokenizerSummary`)."""
    summary = tokenizer_summary(tokenizer)
    return summary.sha256, summary.vocab_size


@dataclass
class TokenShard:
    """A pre-tokenized shard: plain array views of its memory-mapped files (indexing an
    `np.memmap` itself runs Python code for every slice taken)."""

    tokens: np.ndarray
    ends: np.ndarray
    """End offset of each record's document; equal to the previous one for a skipped record."""

    def __len__(self) -> int:
        return len(self.ends)

    def document(self, index: int) -> np.ndarray:
        """Token ids of document `index` as int32 (none for a skipped record)."""
        start = self.ends[index - 1] if index else 0
        return np.asarray(self.tokens[start : self.ends[index]], dtype=np.int32)


@lru_cache(maxsize=64)
def open_token_shard(path: str) -> TokenShard:
    """Memory-map the shard at `path` (its .bin file) after checking it and its index against
    each other; raises TokenShardError naming the file when anything is missing or damaged."""
    dtype = np.dtype(_read_meta(Path(path).parent)["dtype"])
    ends = _checked_ends(path, dtype)
    if not os.path.getsize(path):
        return TokenShard(np.zeros(0, dtype=dtype), np.asarray(ends))
    tokens = np.memmap(path, dtype=dtype, mode="r")
    return TokenShard(np.asarray(tokens), np.asarray(ends))


def token_source_problems(
    path: str, tokenizer: str | None, every_shard: bool = True, eos_token: str | None = None
) -> list[str]:
    """Every problem of the pre-tokenized shards at `path` (a directory, a glob or a .bin
    file), found without reading their tokens; empty when there is none.

    Per directory of shards: `tokens.json` missing (an unfinished `pretokenize`) or
    unreadable, a shard count other than the one it records (when `path` lists the whole
    directory), and a tokenizer fingerprint other than `tokenizer`'s (not compared when
    `tokenizer` is None or `tokens.json` predates fingerprints), and an EOS token other than
    `eos_token` (when given and recorded). Per shard: the .bin or its
    .idx.npy missing, document ends that decrease, a .bin whose size is not its last end
    times the dtype's size. Remote paths, and paths naming no .bin or .idx.npy file (nor a
    directory with a `tokens.json`), have no problems here. Without `every_shard`, only the
    first, middle and last shards' indices are read (the loader checks each shard it opens),
    which keeps a start-up check on every rank cheap for directories of many shards.
    """
    if is_remote(path):
        return []
    expanded = os.path.expanduser(path)
    listed = os.path.isdir(expanded)
    stems: dict[Path, set[str]] = defaultdict(set)
    if listed and os.path.isfile(os.path.join(expanded, META_FILE)):
        stems[Path(expanded)] = set()
    for file in _local_files(expanded):
        for suffix in (_BIN, _INDEX):
            if file.endswith(suffix):
                stems[Path(file).parent].add(file[: -len(suffix)])
    problems = []
    for directory, directory_stems in sorted(stems.items()):
        problems += _directory_problems(
            directory, sorted(directory_stems), listed, tokenizer, every_shard, eos_token
        )
    return problems


def _local_files(path: str) -> list[str]:
    if os.path.isdir(path):
        return [str(file) for file in Path(path).rglob("*") if file.is_file()]
    files = glob.glob(path, recursive=True) if glob.has_magic(path) else [path]
    return [file for file in files if os.path.isfile(file)]


def _directory_problems(
    directory: Path,
    stems: list[str],
    listed: bool,
    tokenizer: str | None,
    every_shard: bool,
    eos_token: str | None,
) -> list[str]:
    try:
        meta = _read_meta(directory)
    except TokenShardError as error:
        return [str(error)]
    problems = []
    recorded = meta.get("shards")
    if listed and recorded is not None and recorded != len(stems):
        problems.append(
            f"{directory / META_FILE}: records {recorded} shards, but the directory holds "
            f"{len(stems)}"
        )
    if tokenizer is not None:
        problems += _tokenizer_problems(directory / META_FILE, meta, tokenizer)
    recorded_eos = meta.get("eos_token")
    if eos_token is not None and recorded_eos is not None and recorded_eos != eos_token:
        problems.append(
            f"{directory / META_FILE}: the shards end documents with {recorded_eos!r}, not "
            f"data.eos_token {eos_token!r}"
        )
    dtype = np.dtype(meta["dtype"])
    if not every_shard:
        stems = first_middle_last(stems)
    for stem in stems:
        try:
            _checked_ends(stem + _BIN, dtype)
        except TokenShardError as error:
            problems.append(str(error))
    return problems


def _read_meta(directory: Path) -> dict:
    path = directory / META_FILE
    if not path.is_file():
        raise TokenShardError(
            f"{path}: missing, so the shards in {directory} are incomplete (an interrupted "
            "pretokenize run?)"
        )
    try:
        meta = json.loads(path.read_text())
        dtype = meta["dtype"]
    except (ValueError, KeyError, TypeError) as error:
        raise TokenShardError(f"{path}: unreadable ({error!r})") from None
    if dtype not in _TOKEN_DTYPES:
        raise TokenShardError(f"{path}: dtype {dtype!r} is not one of {_TOKEN_DTYPES}")
    return meta


def _checked_ends(path: str, dtype: np.dtype) -> np.ndarray:
    """The memory-mapped document ends of the shard at `path` (its .bin file), checked to be
    non-decreasing and to end where the .bin does."""
    index = path[: -len(_BIN)] + _INDEX
    if not os.path.isfile(index):
        raise TokenShardError(f"{index}: missing (the index of {path})")
    if not os.path.isfile(path):
        raise TokenShardError(f"{path}: missing (the shard of index {index})")
    try:
        ends = np.load(index, mmap_mode="r")
    except (ValueError, OSError) as error:
        raise TokenShardError(f"{index}: unreadable ({error})") from None
    if ends.ndim != 1 or ends.dtype.kind not in "iu":
        raise TokenShardError(f"{index}: not a 1-d integer array ({ends.dtype}, {ends.shape})")
    if len(ends) and (ends[0] < 0 or np.any(np.diff(ends) < 0)):
        raise TokenShardError(f"{index}: document end offsets decrease")
    last = int(ends[-1]) if len(ends) else 0
    size = os.path.getsize(path)
    if size != last * dtype.itemsize:
        raise TokenShardError(
            f"{path}: {size:,} bytes, but its index ends at token {last:,} "
            f"({last * dtype.itemsize:,} bytes of {dtype.name}): truncated, or not the shard "
            "its index was written for"
        )
    return ends


def _tokenizer_problems(meta_path: Path, meta: dict, tokenizer: str) -> list[str]:
    if "tokenizer_sha256" not in meta or tokenizer_problem(tokenizer):
        # Written before fingerprints were recorded, or a tokenizer the config check reports.
        return []
    try:
        sha256, vocab_size = tokenizer_fingerprint(tokenizer)
    except Exception as error:
        return [f"{meta_path}: cannot load data.tokenizer {tokenizer!r} to compare ({error})"]
    if (sha256, vocab_size) == (meta["tokenizer_sha256"], meta.get("vocab_size")):
        return []
    return [
        f"{meta_path}: the shards were tokenized with {meta.get('tokenizer')!r} "
        f"({meta.get('vocab_size')} tokens, sha256 {meta['tokenizer_sha256'][:12]}), not "
        f"data.tokenizer {tokenizer!r} ({vocab_size} tokens, sha256 {sha256[:12]}); "
        "pretokenize again with it, or set data.tokenizer to the one used"
    ]


def read_token_window(
    shard: Shard, start: int, offset: int, stride: int, size: int, max_tokens: int
) -> tuple[Documents, int | None]:
    """The window of documents owned by a slot (index % stride == offset) from index `start`
    on: up to `size` non-empty documents or `max_tokens` tokens (the document reaching it
    included), empty ones (skipped records) passed over as the streamed reader passes over
    bad records.

    Returns the documents (tokens in the shard's dtype, no copy when `stride` is 1) and the
    index after the last one, or None when the shard ended before the window filled.
    """
    token_shard = open_token_shard(shard.path)
    first = start + (offset - start) % stride
    indices, starts, lengths = _owned_documents(token_shard, first, stride, size)
    count = min(int(np.searchsorted(np.cumsum(lengths), max_tokens)) + 1, len(indices))
    indices, starts, lengths = indices[:count], starts[:count], lengths[:count]
    full = count == size or lengths.sum() >= max_tokens
    end = int(indices[-1]) + 1 if full and count else None
    if not count:
        return Documents(np.zeros(0, dtype=np.int32), lengths), end
    if stride == 1:
        # Empty documents hold no tokens, so the window's tokens are one run.
        tokens = token_shard.tokens[starts[0] : starts[0] + lengths.sum()]
    else:
        new_starts = np.cumsum(lengths) - lengths
        gather = np.arange(lengths.sum()) + np.repeat(starts - new_starts, lengths)
        tokens = token_shard.tokens[gather]
    return Documents(tokens, lengths), end


def _owned_documents(
    token_shard: TokenShard, first: int, stride: int, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Index, start and length of the first `size` non-empty documents among `first`,
    `first + stride`, ...; read `size` candidates at a time, so a run of skipped records
    costs one more pass each."""
    parts, found = [], 0
    while found < size and first < len(token_shard):
        indices = np.arange(first, min(len(token_shard), first + size * stride), stride)
        ends = token_shard.ends[indices]
        starts = np.where(indices > 0, token_shard.ends[np.maximum(indices - 1, 0)], 0)
        keep = np.flatnonzero(ends > starts)[: size - found]
        parts.append((indices[keep], starts[keep], (ends - starts)[keep]))
        found += len(keep)
        first += size * stride
    if not parts:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    indices, starts, lengths = (np.concatenate(column) for column in zip(*parts, strict=True))
    return indices, starts, lengths


def pretokenize(
    source: SourceConfig,
    cfg: DataConfig,
    out_dir: str,
    num_procs: int,
    progress=None,
    overwrite: bool = False,
    progress_every_s: float = 5.0,
) -> Counter:
    """Write `source` as pre-tokenized shards under `out_dir`; returns bad-input counts.

    `out_dir` must be empty or absent; with `overwrite`, the pre-tokenized files already
    there (`tokens.json`, `*.bin`, `*.idx.npy`, `*.partial`) are removed first, other files
    left. Shards are tokenized in parallel by `num_procs` processes (in this one when 1).
    `progress(tokens, documents, shards)` gets the running totals (tokens and documents
    written, shards finished) at each shard's end and every `progress_every_s` seconds in
    between, so that a large shard is not minutes of silence. `tokens.json` is written
    last, so a directory without it is an unfinished run.
    """
    shards = resolve_shards(source, cfg.cache_dir)
    sha256, vocab_size = tokenizer_fingerprint(cfg.tokenizer)
    _prepare_output(out_dir, overwrite)
    meta = {
        "dtype": token_dtype(vocab_size).name,
        "tokenizer": cfg.tokenizer,
        "tokenizer_sha256": sha256,
        "vocab_size": vocab_size,
        "eos_token": cfg.eos_token,
        "source": source.name,
        "shards": len(shards),
    }
    jobs = [
        (shard, os.path.join(out_dir, shard_name(index, len(shards))), source, cfg)
        for index, shard in enumerate(shards)
    ]
    counts: Counter = Counter()
    context = get_context("spawn")
    written = context.Array("q", 2)  # tokens, documents of the windows written so far
    finished = 0

    def report() -> None:
        if progress:
            progress(written[0], written[1], finished)

    if num_procs > 1:
        with context.Pool(num_procs, _start_worker, (written, None)) as pool:
            results = pool.imap_unordered(_pretokenize_shard, jobs)
            while finished < len(jobs):
                try:
                    bad = results.next(timeout=progress_every_s)
                except multiprocessing.TimeoutError:
                    report()  # no shard finished meanwhile: say how far they are
                    continue
                counts.update(bad)
                finished += 1
                report()
            # Workers must exit on their own: leaving the `with` terminates them, which skips
            # their exit handlers, and the semaphores that `datasets`' progress bars made in
            # them are then reported leaked by the resource tracker.
            pool.close()
            pool.join()
    else:
        _start_worker(written, _every(progress_every_s, report))
        try:
            for bad in map(_pretokenize_shard, jobs):
                counts.update(bad)
                finished += 1
                report()
        finally:
            _start_worker(None, None)
    write_atomically(os.path.join(out_dir, META_FILE), json.dumps(meta, indent=1))
    return counts


_written = None
"""In a process tokenizing shards: the shared (tokens, documents) written so far."""
_on_window = None
"""In this process, when it tokenizes the shards itself: called after each window."""


def _start_worker(written, on_window) -> None:
    global _written, _on_window
    _written, _on_window = written, on_window


def _every(seconds: float, call):
    """`call`, at most once every `seconds`."""
    last = [time.monotonic()]

    def maybe() -> None:
        if time.monotonic() - last[0] >= seconds:
            last[0] = time.monotonic()
            call()

    return maybe


def _prepare_output(out_dir: str, overwrite: bool) -> None:
    """Create `out_dir`, or empty it of pre-tokenized files (`tokens.json` first, so that it
    reads as unfinished from then on) when `overwrite`; refuse a non-empty one otherwise."""
    os.makedirs(out_dir, exist_ok=True)
    entries = sorted(os.listdir(out_dir))
    if entries and not overwrite:
        raise OutputNotEmptyError(
            f"{out_dir} is not empty ({len(entries)} entries, e.g. {entries[0]!r}); old shards "
            "there would be read with the new ones: pick an empty directory, or overwrite "
            "(--overwrite) to remove its pre-tokenized files first"
        )
    ours = [n for n in entries if n.endswith((_BIN, _INDEX, _PARTIAL)) or PARTIAL in n]
    for name in ([META_FILE] if META_FILE in entries else []) + ours:
        os.remove(os.path.join(out_dir, name))


def _pretokenize_shard(job) -> dict[str, int]:
    """Tokenizes one shard; returns its bad-input counts (its totals go to `_written`)."""
    shard, stem, source, cfg = job
    encoder = DocumentEncoder(cfg.tokenizer, "pretrain", cfg.eos_token, cfg.max_document_chars)
    dtype = token_dtype(encoder.tokenizer.get_vocab_size())
    log = BadInputLog(cfg.on_bad_input)
    parts = [np.zeros(0, dtype=np.int64)]
    with open(stem + _BIN + _PARTIAL, "wb") as out:
        for payloads in _windows(shard, source, cfg, log):
            lengths = np.zeros(len(payloads), dtype=np.int64)
            usable = [index for index, payload in enumerate(payloads) if payload is not None]
            if usable:
                documents = encoder.encode([payloads[index] for index in usable])
                assert documents.lengths.all(), "only a skipped record is an empty document"
                out.write(documents.tokens.astype(dtype).tobytes())
                lengths[usable] = documents.lengths
            parts.append(lengths)
            if _written is not None:
                with _written.get_lock():
                    _written[0] += int(lengths.sum())
                    _written[1] += len(usable)
            if _on_window is not None:
                _on_window()
    lengths = np.concatenate(parts)
    np.save(stem + _INDEX, np.cumsum(lengths))
    os.replace(stem + _BIN + _PARTIAL, stem + _BIN)
    return dict(log.counts)


def _windows(
    shard: Shard, source: SourceConfig, cfg: DataConfig, log: BadInputLog
) -> Iterator[list]:
    """The payloads of the shard's records, `shuffle_window` at a time; None for a record
    skipped as bad input, so that a payload's place is its record's index."""
    options = ReadOptions(
        source.text_field,
        source.text_split,
        cfg.max_retries,
        cfg.retry_backoff_s,
        cfg.max_document_chars,
    )
    window = []
    for index, record in enumerate(read_raw(shard, 0, options, log)):
        assert record.index == index, "a shard's records are numbered from 0 without gaps"
        window.append(parse_record(record, shard, options, "pretrain", log))
        if len(window) == cfg.shuffle_window:
            yield window
            window = []
    if window:
        yield window
