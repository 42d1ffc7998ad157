"""The training loader: micro-batches per rank, with an exact, small resume state.

Each rank runs `num_workers` DataLoader workers (or reads in-process with 0); worker `w` of
rank `r` is slot `r * num_workers + w`. A worker yields every batch together with its own
state after that batch; the DataLoader serves workers round-robin in order, and this loader
keeps the latest state of each worker and which worker is next. Restoring starts the
workers from those states, rotated so that the worker that was next comes first: the
resumed run yields exactly the batches the uninterrupted one would have.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipelines.config import DataConfig, packs_whole_documents, validate_data_config
from data_pipelines.encoding import DocumentEncoder
from data_pipelines.mixing import BATCH_KEYS, MixtureStream, SlotState, Stage
from data_pipelines.packing import WholePackingCount
from data_pipelines.readers import BadInputLog
from data_pipelines.shards import Shard, fingerprint, resolve_shards
from data_pipelines.stream import Slot, SourceStream
from data_pipelines.tokenizer import tokenizer_summary

logger = logging.getLogger(__name__)

STATE_VERSION = 1


def build_data_loader(
    cfg: DataConfig, *, rank: int, world_size: int, micro_batch_size: int
) -> PackedDataLoader:
    """The loader of `rank` among `world_size`, yielding [micro_batch_size, seq_len] batches.

    Raises ValueError listing every problem of `cfg` before reading anything.
    """
    problems = validate_data_config(cfg)
    if not 0 <= rank < world_size:
        problems.append(f"rank {rank} is outside world size {world_size}")
    if micro_batch_size < 1:
        problems.append(f"micro_batch_size must be positive, got {micro_batch_size}")
    if problems:
        raise ValueError("invalid data config:\n  " + "\n  ".join(problems))
    shards = {source.name: resolve_shards(source, cfg.cache_dir) for source in cfg.sources}
    return PackedDataLoader(cfg, shards, rank, world_size, micro_batch_size)


class PackedDataLoader:
    """Iterates micro-batches (dicts of int64 tensors `input_ids`, `labels`, `position_ids`,
    each [micro_batch_size, seq_len]) without end; see `state_dict` and `set_stage`.

    Use one iterator at a time: each `iter()` starts the workers from the current state.
    """

    def __init__(
        self,
        cfg: DataConfig,
        shards: dict[str, list[Shard]],
        rank: int,
        world_size: int,
        micro_batch_size: int,
    ):
        self.cfg, self.shards = cfg, shards
        self.rank, self.world_size, self.micro_batch_size = rank, world_size, micro_batch_size
        self.num_slots_per_rank = max(cfg.num_workers, 1)
        self.stage = Stage(0, {source.name: source.weight for source in cfg.sources}, cfg.seq_len)
        self.worker_states = [SlotState() for _ in range(self.num_slots_per_rank)]
        self.next_worker = 0
        self.fingerprints = {name: fingerprint(files) for name, files in shards.items()}
        self._settings: dict | None = None
        slots = world_size * self.num_slots_per_rank
        # Pre-tokenized shards are read by index: a slot reads only its own documents.
        few = {
            name: len(files)
            for name, files in shards.items()
            if len(files) < slots and any(file.format != "tokens" for file in files)
        }
        if few and rank == 0:
            logger.warning(
                "sources with fewer shards than the %d reading slots (ranks x workers): %s; "
                "every slot reads each of their shards through and keeps every %d-th record, "
                "so each shard is read %d times: split them into at least %d shards, or "
                "pre-tokenize them, where that matters",
                slots,
                ", ".join(f"{name} ({count})" for name, count in few.items()),
                slots,
                slots,
                slots,
            )
        self._generation = 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            generation = self._generation
            for worker, batch, state in self._worker_batches():
                self.worker_states[worker] = SlotState(**state)
                self.next_worker = (worker + 1) % self.num_slots_per_rank
                stacked = torch.from_numpy(batch)
                yield {key: stacked[index] for index, key in enumerate(BATCH_KEYS)}
                if generation != self._generation:
                    break

    def set_stage(
        self, weights: dict[str, float] | None = None, seq_len: int | None = None
    ) -> None:
        """Switch the mixture and/or the sequence length from the next batch on.

        `weights` maps source names to weights (renormalised); sources it leaves out get
        weight 0. Positions in every source are kept, so no document is skipped or repeated.
        Setting the stage already in force changes nothing, so a resumed job may re-apply
        its curriculum's current stage after `load_state_dict`.
        """
        new_weights = dict(self.stage.weights) if weights is None else dict(weights)
        problems = []
        unknown = sorted(set(new_weights) - set(self.shards))
        if unknown:
            problems.append(f"unknown sources {unknown}; known: {sorted(self.shards)}")
        if any(weight < 0 for weight in new_weights.values()) or sum(new_weights.values()) <= 0:
            problems.append(f"weights must be >= 0 with a positive sum, got {new_weights}")
        if seq_len is not None and seq_len < 1:
            problems.append(f"seq_len must be positive, got {seq_len}")
        if problems:
            raise ValueError("set_stage: " + "; ".join(problems))
        full_weights = {name: float(new_weights.get(name, 0.0)) for name in self.shards}
        new_seq_len = seq_len or self.stage.seq_len
        if full_weights == self.stage.weights and new_seq_len == self.stage.seq_len:
            return
        self.stage = Stage(self.stage.index + 1, full_weights, new_seq_len)
        for state in self.worker_states:
            state.samples = 0
        self._generation += 1

    def state_dict(self) -> dict:
        """This rank's loader state: plain ints, strings and dicts (JSON- and pickle-safe)."""
        return {
            "version": STATE_VERSION,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.cfg.num_workers,
            "fingerprints": dict(self.fingerprints),
            "settings": self.settings(),
            "stage": asdict(self.stage),
            "next_worker": self.next_worker,
            "workers": [state.to_dict() for state in self.worker_states],
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` (from `state_dict`) was taken.

        A different layout (rank, world size, workers) is an error. Changed sources or files,
        or changed settings that fix what a saved position points at (`settings`), are an
        error unless `allow_source_change`: then changed sources restart, and under changed
        settings every source keeps its window but starts it again (its cursor means
        something else now).
        """
        layout = ("version", "rank", "world_size", "num_workers")
        needed = (*layout, "fingerprints", "stage", "next_worker", "workers")
        missing = [key for key in needed if not isinstance(state, dict) or key not in state]
        if missing or len(state["workers"]) != max(state["num_workers"], 1):
            raise ValueError(
                "the data loader state is not one this loader saved: "
                + (f"missing {missing}" if missing else f"{len(state['workers'])} workers")
            )
        expected = self.state_dict()
        mismatched = [
            f"{key}: saved {state[key]}, now {expected[key]}"
            for key in layout
            if state[key] != expected[key]
        ]
        if mismatched:
            raise ValueError(
                "the data loader state does not fit this run: " + "; ".join(mismatched)
            )
        changed = self._changed_sources(state["fingerprints"])
        workers = [SlotState(**worker) for worker in state["workers"]]
        if self._changed_settings(state.get("settings", expected["settings"])):
            for worker in workers:
                for packer in worker.packers.values():
                    packer["cursor"] = 0
        stage = Stage(**state["stage"])
        for name in changed:
            for worker in workers:
                worker.packers.pop(name, None)
        configured = {source.name: source.weight for source in self.cfg.sources}
        stage.weights = {name: stage.weights.get(name, configured[name]) for name in self.shards}
        self.stage, self.worker_states = stage, workers
        self.next_worker = state["next_worker"]
        self._generation += 1

    def bad_input_counts(self) -> dict[str, int]:
        """Bad records skipped so far on this rank, by kind, and long documents noted
        (`long_document`, tokenized in pieces)."""
        total: Counter = Counter()
        for state in self.worker_states:
            total.update(state.bad_input)
        return dict(total)

    def split_document_count(self) -> int:
        """Documents longer than `seq_len` that whole-document packing split so far on this
        rank (0 with packing=split, which splits documents as a rule)."""
        return sum(state.split_documents for state in self.worker_states)

    def settings(self) -> dict:
        """What, beside the files, fixes where a saved position points: the shard and
        document order, the windows, the tokens, how each source's records are read."""
        if self._settings is None:
            cfg = self.cfg
            self._settings = {
                "seed": cfg.seed,
                "shuffle": cfg.shuffle,
                "shuffle_window": cfg.shuffle_window,
                "window_tokens": cfg.window_tokens,
                "max_document_chars": cfg.max_document_chars,
                "tokenizer": tokenizer_summary(cfg.tokenizer).sha256[:16],
                "eos_token": cfg.eos_token,
                "kind": cfg.kind,
                "template": cfg.template,
                "sources": {
                    source.name: [
                        source.format,
                        source.text_field,
                        source.messages_field,
                        source.text_split,
                    ]
                    for source in cfg.sources
                },
            }
        return self._settings

    def _changed_settings(self, saved: dict) -> bool:
        current = self.settings()
        changed = [
            f"{key}: saved {saved.get(key)!r}, now {current[key]!r}"
            for key in current
            # A key missing from the state is a setting added after it was saved.
            if key != "sources" and key in saved and saved[key] != current[key]
        ]
        changed += [
            f"sources.{name} (format, text_field, messages_field, text_split): saved "
            f"{saved['sources'][name]}, now {reading}"
            for name, reading in current["sources"].items()
            if name in saved.get("sources", {}) and saved["sources"][name] != reading
        ]
        if not changed:
            return False
        if not self.cfg.allow_source_change:
            raise ValueError(
                "data settings that fix the saved positions changed: "
                + "; ".join(changed)
                + "; set data.allow_source_change=true to resume anyway (every source starts "
                "its current window again, so the order is no longer exact)"
            )
        logger.warning(
            "resuming with changed data settings (%s); every source starts its current window "
            "again",
            "; ".join(changed),
        )
        return True

    def _changed_sources(self, saved: dict[str, str]) -> list[str]:
        changed = sorted(
            name
            for name in set(saved) | set(self.fingerprints)
            if saved.get(name) != self.fingerprints.get(name)
        )
        if not changed:
            return []
        detail = ", ".join(_describe_change(name, saved, self.fingerprints) for name in changed)
        if not self.cfg.allow_source_change:
            raise ValueError(
                f"the data sources changed since the state was saved: {detail}; "
                "set data.allow_source_change=true to resume anyway"
            )
        logger.warning(
            "resuming with changed data sources (%s); they restart from their beginning", detail
        )
        return changed

    def _worker_batches(self) -> Iterator[tuple[int, np.ndarray, dict]]:
        dataset = _SlotDataset(self, rotation=self.next_worker)
        if self.cfg.num_workers == 0:
            return iter(dataset)
        loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.cfg.num_workers,
            prefetch_factor=self.cfg.prefetch_factor,
            collate_fn=_unchanged,
            worker_init_fn=_start_worker,
        )
        return iter(loader)


# How long a worker keeps serving after SIGTERM before it exits quietly.
SIGTERM_GRACE_S = 60


def _start_worker(_worker_id: int) -> None:
    """What a loader worker does first, in the process just forked from its rank."""
    _leave_signals_to_the_trainer()
    _release_inherited_tqdm_locks()


def _release_inherited_tqdm_locks() -> None:
    """A forked worker runs only the thread that forked it, with a copy of every lock as it
    was at that moment: one held by another thread of the rank stays held in the worker for
    ever. tqdm's monitor thread takes tqdm's locks every 10 s while a bar exists, and
    `datasets` makes a (silent) bar whenever it opens a file: a worker forked at that moment
    waited for ever, and its rank with it. The worker starts on fresh locks instead."""
    from tqdm.std import TqdmDefaultWriteLock, tqdm

    TqdmDefaultWriteLock.th_lock = threading.RLock()  # shared by every tqdm lock
    pending = [tqdm]
    while pending:
        cls = pending.pop()
        pending += cls.__subclasses__()
        if "_lock" in vars(cls):
            cls._lock = TqdmDefaultWriteLock()


def _leave_signals_to_the_trainer() -> None:
    """A cluster's preemption signals every process of the job; the training process must
    be the one that finishes its step, saves and then ends its workers. So workers ignore
    SIGINT, and on SIGTERM go on serving for SIGTERM_GRACE_S seconds before exiting quietly
    (never hanging a shutdown that could not reach them)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_after_grace)


def _exit_after_grace(_signum, _frame) -> None:
    signal.signal(signal.SIGALRM, lambda *_: os._exit(0))
    signal.alarm(SIGTERM_GRACE_S)


class _SlotDataset(IterableDataset):
    """What one worker process runs: its slot's mixture stream, batch after batch."""

    def __init__(self, loader: PackedDataLoader, rotation: int):
        self.cfg, self.shards = loader.cfg, loader.shards
        self.rank, self.world_size = loader.rank, loader.world_size
        self.per_rank, self.micro_batch_size = loader.num_slots_per_rank, loader.micro_batch_size
        self.stage = loader.stage
        self.states = [state.to_dict() for state in loader.worker_states]
        self.rotation = rotation

    def __iter__(self) -> Iterator[tuple[int, np.ndarray, dict]]:
        info = get_worker_info()
        if info is not None:
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
        worker = ((info.id if info else 0) + self.rotation) % self.per_rank
        slot = Slot(self.rank * self.per_rank + worker, self.world_size * self.per_rank)
        encoder = DocumentEncoder.of(self.cfg)
        state = SlotState(**self.states[worker])
        mixture = MixtureStream(self.cfg, self.shards, slot, self.stage, state, encoder)
        while True:
            batch = mixture.next_batch(self.micro_batch_size)
            yield worker, batch, mixture.state().to_dict()


def _describe_change(name: str, saved: dict[str, str], current: dict[str, str]) -> str:
    if name not in saved:
        return f"{name} (added)"
    if name not in current:
        return f"{name} (removed)"
    return f"{name} (files changed)"


def _unchanged(item):
    return item


# ---- one epoch's tokens -------------------------------------------------------------------


def count_source_tokens(
    data: DataConfig, shards: dict[str, list[Shard]], rank: int, world_size: int
) -> dict[str, int]:
    """Packed tokens (EOS and any padding included) of one epoch of every source, counting
    only this rank's share: the records its loader workers read (the slots of rank ``rank``
    of ``world_size``), so that summing over the ranks counts every record once.
    ``shards``: each source's shards, by name. Whole-document packing is counted in the
    sequences each worker's packer fills, its last one counted whole."""
    encoder = DocumentEncoder.of(data)
    log = BadInputLog(data.on_bad_input, muted=True)  # the training loader reports them
    workers, whole = max(data.num_workers, 1), packs_whole_documents(data)
    counts = {}
    for source in data.sources:
        counts[source.name] = 0
        for worker in range(workers):
            slot = Slot(rank * workers + worker, world_size * workers)
            stream = SourceStream(source, shards[source.name], slot, data, encoder, log)
            packed = WholePackingCount(data.seq_len)
            while stream.position.epoch == 0:
                if whole:
                    packed.add(np.diff(stream.window.ends, prepend=0))
                else:
                    counts[source.name] += len(stream.window)
                stream.next_window()
            counts[source.name] += packed.tokens()
    return counts
