"""Turning a source's paths into shards, and deciding which slot reads which shard when.

A *slot* is one (rank, worker) pair: `slot = rank * num_workers + worker` among
`num_slots = world_size * num_workers`. With at least as many shards as slots, whole shards
are dealt to slots; with fewer, every slot reads every shard and keeps every
`num_slots`-th record. Either way each record belongs to exactly one slot per epoch.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import os
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import fsspec
import numpy as np

from data_pipelines import synthetic

if TYPE_CHECKING:
    from data_pipelines.config import SourceConfig

FORMATS = ("auto", "jsonl", "json.gz", "json.zst", "parquet", "arrow", "text", "tokens")

_SUFFIXES = {
    "jsonl": (".jsonl", ".json"),
    "json.gz": (".jsonl.gz", ".json.gz"),
    "json.zst": (".jsonl.zst", ".json.zst"),
    "parquet": (".parquet",),
    "arrow": (".arrow",),
    "text": (".txt", ".text", ".md", ".rst", ".py"),
    "tokens": (".bin",),
}
TOKENS_META = "tokens.json"
"""Written next to pre-tokenized shards; marks their directory as a `tokens` source."""
STDLIB = "stdlib://"
SYNTHETIC = "synthetic://"


class ShardResolutionError(ValueError):
    """A source's paths name nothing readable; `problems` lists every reason."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Shard:
    """One file of a source."""

    path: str
    format: str
    size: int = -1
    """Bytes, or -1 where unknown (remote files)."""

    @property
    def remote(self) -> bool:
        """A URL, streamed (by `datasets`, over fsspec) with retries."""
        return "://" in self.path


@dataclass(frozen=True)
class Piece:
    """What one slot reads of one shard in one epoch: records `offset, offset + stride, ...`."""

    shard: int
    offset: int
    stride: int


def detect_format(path: str) -> str | None:
    """Format implied by a file name's suffix, or None."""
    name = path.lower()
    for fmt in ("json.gz", "json.zst", "jsonl", "parquet", "arrow", "tokens", "text"):
        if name.endswith(_SUFFIXES[fmt]):
            return fmt
    return None


def is_remote(path: str) -> bool:
    """Whether `path` is read over the network."""
    return "://" in path or _is_hub_id(path)


def resolve_shards(source: SourceConfig, cache_dir: str, check_only: bool = False) -> list[Shard]:
    """The sorted shard list of `source`; raises ShardResolutionError listing every problem.

    With `check_only`, remote paths are not listed and synthetic sources not generated, so
    the check is cheap and offline.
    """
    shards, problems = [], []
    for path in source.paths:
        try:
            shards += _expand(path, source.format, cache_dir, check_only)
        except ShardResolutionError as error:
            problems += error.problems
    for shard in shards:
        if shard.format not in FORMATS or shard.format == "auto":
            problems.append(f"{shard.path}: unknown format; set the source's format")
    if not shards and not problems and not check_only:
        problems.append(f"no files found under {source.paths}")
    if problems:
        raise ShardResolutionError(problems)
    return sorted(set(shards), key=lambda shard: shard.path)


def _expand(path: str, fmt: str, cache_dir: str, check_only: bool) -> list[Shard]:
    if path.startswith(SYNTHETIC):
        try:
            files = synthetic.materialize(path, cache_dir, check_only)
        except ValueError as error:
            raise ShardResolutionError([f"{path}: {error}"]) from error
        return [_local_shard(file, "jsonl") for file in files]
    if path.startswith(STDLIB):
        files = _stdlib_files(path[len(STDLIB) :] or "**/*.py")
        return [_local_shard(file, "text" if fmt == "auto" else fmt) for file in files]
    if _is_hub_id(path) and os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", ""):
        raise ShardResolutionError([f"{path}: no such local path (and hub access is off)"])
    if is_remote(path):
        _require_filesystem(path)
        if check_only:
            return []
        try:
            return _expand_remote(path, fmt)
        except ShardResolutionError:
            raise
        except Exception as error:
            raise ShardResolutionError([f"{path}: cannot list it ({error!r})"]) from error
    return _expand_local(path, fmt)


@functools.cache
def _stdlib_files(pattern: str) -> tuple[str, ...]:
    """The standard library's files matching `pattern`, listed once per process. A leading
    `**/` is globbed per top-level folder, skipping `site-packages` (the installed packages
    under the library's folder, where a recursive glob spends 0.6 s of its 0.65)."""
    root = sysconfig.get_paths()["stdlib"]
    if pattern.startswith("**/"):  # "**" matches no folder, or one of the top level and more
        tops = [e.name for e in os.scandir(root) if e.is_dir() and e.name[0] != "."]
        roots = [root, *(os.path.join(root, top, "**") for top in tops if top != "site-packages")]
        paths = [os.path.join(r, pattern[3:]) for r in roots]
    else:
        paths = [os.path.join(root, pattern)]
    files = [file for path in paths for file in glob.glob(path, recursive=True)]
    return tuple(file for file in files if "site-packages" not in file and os.path.isfile(file))


def _expand_local(path: str, fmt: str) -> list[Shard]:
    expanded = os.path.expanduser(path)
    if os.path.isdir(expanded):
        if fmt == "auto" and os.path.isfile(os.path.join(expanded, TOKENS_META)):
            fmt = "tokens"
        files = [str(file) for file in Path(expanded).rglob("*") if file.is_file()]
        matching = [file for file in files if _matches(file, fmt)]
        if not matching:
            raise ShardResolutionError([f"{path}: the directory holds no {fmt} files"])
        return [_local_shard(file, _format_of(file, fmt)) for file in matching]
    if glob.has_magic(expanded):
        files = [file for file in glob.glob(expanded, recursive=True) if os.path.isfile(file)]
        if not files:
            raise ShardResolutionError([f"{path}: the pattern matches no files"])
        return [_local_shard(file, _format_of(file, fmt)) for file in files]
    if not os.path.isfile(expanded):
        raise ShardResolutionError([f"{path}: no such file or directory"])
    return [_local_shard(expanded, _format_of(expanded, fmt))]


def _require_filesystem(path: str) -> None:
    protocol = path.split("://", 1)[0] if "://" in path else "hf"
    try:
        fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError) as error:
        raise ShardResolutionError(
            [f"{path}: cannot read {protocol}:// paths here ({error})"]
        ) from error


def _expand_remote(path: str, fmt: str) -> list[Shard]:
    url = f"hf://datasets/{path}" if _is_hub_id(path) else path
    fs, _, _ = fsspec.get_fs_token_paths(url)
    if glob.has_magic(url) or _is_hub_id(path):
        pattern = url if glob.has_magic(url) else url.rstrip("/") + "/**"
        protocol = url.split("://", 1)[0]
        found = [file for file in fs.glob(pattern) if not fs.isdir(file)]
        # Some filesystems (HTTP) list full URLs, others paths without the protocol.
        files = [file if "://" in file else f"{protocol}://{file}" for file in found]
        files = [file for file in files if _matches(file, fmt)]
        if not files:
            kind = "data" if fmt == "auto" else fmt
            raise ShardResolutionError([f"{path}: no {kind} files found remotely"])
    else:
        files = [url]
    return [Shard(file, _format_of(file, fmt)) for file in files]


def _is_hub_id(path: str) -> bool:
    """`owner/name`, and not a local path that is missing: one whose directory exists or
    whose name has a data file's suffix is taken for a local path."""
    parts = path.split("/")
    return (
        len(parts) == 2
        and "://" not in path
        and not path.startswith((".", "~"))
        and not os.path.exists(os.path.expanduser(path))
        and not os.path.isdir(parts[0])
        and detect_format(path) is None
        and all(part and not glob.has_magic(part) for part in parts)
    )


def _matches(path: str, fmt: str) -> bool:
    if os.path.basename(path) == TOKENS_META:
        return False
    detected = detect_format(path)
    return detected is not None if fmt == "auto" else path.lower().endswith(_SUFFIXES[fmt])


def _format_of(path: str, fmt: str) -> str:
    return (detect_format(path) or "auto") if fmt == "auto" else fmt


def _local_shard(path: str, fmt: str) -> Shard:
    return Shard(os.path.abspath(path), fmt, os.path.getsize(path))


def fingerprint(shards: list[Shard]) -> str:
    """A short digest of the shard list to detect a changed file set.

    Local paths count relative to their common directory (with their sizes), so the same
    files under another root, on another machine, give the same digest.
    """
    local = [shard.path for shard in shards if not shard.remote]
    root = os.path.dirname(os.path.commonpath(local)) if local else ""
    digest = hashlib.sha1()
    for shard in shards:
        path = shard.path if shard.remote else os.path.relpath(shard.path, root)
        digest.update(f"{path}\t{shard.size}\n".encode())
    return digest.hexdigest()[:16]


def first_middle_last(items: list) -> list:
    """The first, middle and last of `items` (fewer when there are fewer): a cheap sample
    of a source's shards that a wrong setting shows in."""
    return [items[i] for i in sorted({0, len(items) // 2, len(items) - 1})] if items else []


def epoch_pieces(
    num_shards: int, *, slot: int, num_slots: int, epoch: int, seed: int, name: str, shuffle: bool
) -> list[Piece]:
    """The pieces `slot` reads in `epoch`, in reading order (a seeded shuffle of the shards)."""
    order = np.arange(num_shards)
    if shuffle:
        rng = np.random.default_rng([seed, zlib.crc32(name.encode()), epoch])
        order = rng.permutation(num_shards)
    if num_shards >= num_slots:
        return [Piece(int(order[i]), 0, 1) for i in range(slot, num_shards, num_slots)]
    return [Piece(int(shard), slot, num_slots) for shard in order]
