"""Pre-tokenized binary shards: writing them from any source, and reading them back.

One output shard per input shard, in the input's order: `NNNNN.bin` holds the token ids of
every document back to back (EOS included), `NNNNN.idx.npy` the int64 end offset of each
document, and `tokens.json` in the same directory the dtype (uint16 when the vocabulary fits,
else uint32) and the tokenizer used. Both files are memory-mapped per shard, so nothing
global is ever loaded.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from functools import lru_cache
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from data_pipelines.config import DataConfig, SourceConfig
from data_pipelines.encoding import DocumentEncoder, Documents
from data_pipelines.readers import BadInputLog, ReadOptions, parse_record, read_raw
from data_pipelines.shards import TOKENS_META, Shard, resolve_shards

META_FILE = TOKENS_META


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype holding every id of a vocabulary."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


@dataclass
class TokenShard:
    """A pre-tokenized shard: plain array views of its memory-mapped files (indexing an
    `np.memmap` itself runs Python code for every slice taken)."""

    tokens: np.ndarray
    ends: np.ndarray

    def __len__(self) -> int:
        return len(self.ends)

    def document(self, index: int) -> np.ndarray:
        """Token ids of document `index` as int32."""
        start = self.ends[index - 1] if index else 0
        return np.asarray(self.tokens[start : self.ends[index]], dtype=np.int32)


@lru_cache(maxsize=64)
def open_token_shard(path: str) -> TokenShard:
    """Memory-map the shard at `path` (its .bin file)."""
    meta = json.loads((Path(path).parent / META_FILE).read_text())
    tokens = np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r")
    ends = np.load(path[: -len(".bin")] + ".idx.npy", mmap_mode="r")
    return TokenShard(np.asarray(tokens), np.asarray(ends))


def read_token_window(
    shard: Shard, start: int, offset: int, stride: int, size: int, max_tokens: int
) -> tuple[Documents, int | None]:
    """The window of documents owned by a slot (index % stride == offset) from index `start`
    on: up to `size` documents or `max_tokens` tokens (the document reaching it included).

    Returns the documents (tokens in the shard's dtype, no copy when `stride` is 1) and the
    index after the last one, or None when the shard ended before the window filled.
    """
    token_shard = open_token_shard(shard.path)
    first = start + (offset - start) % stride
    indices = np.arange(first, min(len(token_shard), first + size * stride), stride)
    ends = token_shard.ends[indices]
    starts = np.where(indices > 0, token_shard.ends[np.maximum(indices - 1, 0)], 0)
    lengths = ends - starts
    count = min(int(np.searchsorted(np.cumsum(lengths), max_tokens)) + 1, len(indices))
    indices, starts, lengths = indices[:count], starts[:count], lengths[:count]
    full = count == size or lengths.sum() >= max_tokens
    end = int(indices[-1]) + 1 if full and count else None
    if not count:
        return Documents(np.zeros(0, dtype=np.int32), lengths), end
    if stride == 1:
        tokens = token_shard.tokens[starts[0] : starts[0] + lengths.sum()]
    else:
        new_starts = np.cumsum(lengths) - lengths
        gather = np.arange(lengths.sum()) + np.repeat(starts - new_starts, lengths)
        tokens = token_shard.tokens[gather]
    return Documents(tokens, lengths), end


def pretokenize(
    source: SourceConfig, cfg: DataConfig, out_dir: str, num_procs: int, progress=None
) -> Counter:
    """Write `source` as pre-tokenized shards under `out_dir`; returns bad-input counts.

    Shards are tokenized in parallel by `num_procs` processes (in this one when 1);
    `progress(tokens, documents)`
    is called once per finished shard.
    """
    shards = resolve_shards(source, cfg.cache_dir)
    os.makedirs(out_dir, exist_ok=True)
    encoder = DocumentEncoder(cfg.tokenizer, "pretrain", cfg.eos_token)
    dtype = token_dtype(encoder.tokenizer.get_vocab_size())
    meta = {"dtype": dtype.name, "tokenizer": cfg.tokenizer, "source": source.name}
    Path(out_dir, META_FILE).write_text(json.dumps(meta, indent=1))
    jobs = [
        (shard, os.path.join(out_dir, f"{index:05d}"), source, cfg)
        for index, shard in enumerate(shards)
    ]
    counts: Counter = Counter()
    with get_context("spawn").Pool(num_procs) if num_procs > 1 else nullcontext() as pool:
        results = (
            pool.imap_unordered(_pretokenize_shard, jobs) if pool else map(_pretokenize_shard, jobs)
        )
        for tokens, documents, bad in results:
            counts.update(bad)
            if progress:
                progress(tokens, documents)
        if pool:
            # Workers must exit on their own: leaving the `with` terminates them, which skips
            # their exit handlers, and the semaphores that `datasets`' progress bars made in
            # them are then reported leaked by the resource tracker.
            pool.close()
            pool.join()
    return counts


def _pretokenize_shard(job) -> tuple[int, int, dict[str, int]]:
    shard, stem, source, cfg = job
    encoder = DocumentEncoder(cfg.tokenizer, "pretrain", cfg.eos_token)
    dtype = token_dtype(encoder.tokenizer.get_vocab_size())
    log = BadInputLog(cfg.on_bad_input)
    parts = [np.zeros(0, dtype=np.int64)]
    with open(stem + ".bin.partial", "wb") as out:
        for window in _windows(shard, source, cfg, log):
            documents = encoder.encode(window)
            out.write(documents.tokens.astype(dtype).tobytes())
            parts.append(documents.lengths)
    lengths = np.concatenate(parts)
    np.save(stem + ".idx.npy", np.cumsum(lengths))
    os.replace(stem + ".bin.partial", stem + ".bin")
    return int(lengths.sum()), len(lengths), dict(log.counts)


def _windows(
    shard: Shard, source: SourceConfig, cfg: DataConfig, log: BadInputLog
) -> Iterator[list]:
    options = ReadOptions(
        source.text_field, source.text_split, cfg.max_retries, cfg.retry_backoff_s
    )
    window = []
    for record in read_raw(shard, 0, options, log):
        payload = parse_record(record, shard, options, "pretrain", log)
        if payload is not None:
            window.append(payload)
        if len(window) == cfg.shuffle_window:
            yield window
            window = []
    if window:
        yield window
