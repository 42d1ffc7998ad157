"""Slots through real DataLoader worker processes: 2 ranks x 2 workers read every document
exactly once per epoch, with more shards than slots and with fewer."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter

import numpy as np
import psutil
import pytest

from data_pipelines import SourceConfig, build_data_loader
from data_pipelines.tokenizer import ENDOFTEXT, load_tokenizer, token_id
from tests.unit.test_data_fixtures import make_config, text_documents, write_jsonl_shards

WORLD_SIZE, NUM_WORKERS = 2, 2
NUM_SLOTS = WORLD_SIZE * NUM_WORKERS
NUM_DOCUMENTS = 42
MAX_BATCHES = 400
"""A bound on the batches read per rank, so that a slot reading too little fails, not hangs."""


def epoch_share(slot: int, shard_sizes: list[int]) -> int:
    """Documents `slot` reads per epoch, by the rule of `data_pipelines.shards` recomputed:
    with at least as many shards as slots, the shuffled shards are dealt round-robin (slot
    `s` takes places s, s + NUM_SLOTS, ...), so with equal shards the shuffle cannot change
    the share; with fewer, every slot keeps records s, s + NUM_SLOTS, ... of every shard."""
    if len(shard_sizes) >= NUM_SLOTS:
        assert len(set(shard_sizes)) == 1, "unequal shards would make the share shuffle-dependent"
        return len(range(slot, len(shard_sizes), NUM_SLOTS)) * shard_sizes[0]
    return sum(len(range(slot, size, NUM_SLOTS)) for size in shard_sizes)


def worker_documents(batches: list[dict], eos: int) -> list[list[int]]:
    """The complete documents of one worker's rows, in the order packed, EOS included.

    Split packing lays a slot's documents end to end, each ending in its EOS, and continues a
    document cut at a row's end at the next row's start. Position ids restart at 0 at every
    row start, so a document starts where the position is 0 at a row start that follows an
    EOS, or inside a row right after an EOS; the assertion checks the rows agree with that.
    """
    tokens: list[int] = []
    for batch in batches:
        for inputs, positions in zip(batch["input_ids"], batch["position_ids"], strict=True):
            after_eos = np.flatnonzero(inputs[:-1] == eos) + 1
            assert np.flatnonzero(positions == 0).tolist() == [0, *after_eos.tolist()]
            tokens += inputs.tolist()
    ends = [index + 1 for index, token in enumerate(tokens) if token == eos]
    return [tokens[start:end] for start, end in zip([0, *ends], ends, strict=False)]


def rank_epoch(cfg, rank: int, shard_sizes: list[int], eos: int) -> dict[int, list[list[int]]]:
    """Each slot of `rank` mapped to its first epoch's documents, read through the loader.

    The DataLoader serves its workers round-robin, so batch `k` of a fresh loader comes from
    worker `k % NUM_WORKERS`, which is slot `rank * NUM_WORKERS + worker`. A slot's stream is
    its epoch 0 documents, then epoch 1's, ...; so its first `epoch_share` complete documents
    are exactly its epoch 0. Batches are read until every slot has that many.
    """
    loader = build_data_loader(cfg, rank=rank, world_size=WORLD_SIZE, micro_batch_size=2)
    slots = [rank * NUM_WORKERS + worker for worker in range(NUM_WORKERS)]
    shares = [epoch_share(slot, shard_sizes) for slot in slots]
    batches: list[list[dict]] = [[] for _ in slots]
    documents: list[list[list[int]]] = [[] for _ in slots]
    iterator = iter(loader)
    for count in range(MAX_BATCHES):
        if all(len(docs) >= share for docs, share in zip(documents, shares, strict=True)):
            break
        worker = count % NUM_WORKERS
        batches[worker].append({key: value.numpy() for key, value in next(iterator).items()})
        documents[worker] = worker_documents(batches[worker], eos)
    else:
        pytest.fail(f"rank {rank}: fewer than {shares} documents in {MAX_BATCHES} batches")
    return {slot: docs[:share] for slot, docs, share in zip(slots, documents, shares, strict=True)}


@pytest.mark.parametrize("num_shards", [6, 3, 1])
def test_two_ranks_by_two_worker_processes_read_each_document_once_per_epoch(tmp_path, num_shards):
    """With shuffling on. 6 shards of 7 documents: whole shards dealt to the 4 slots (2, 2,
    1 and 1 shards); 3 and 1 shards: every slot reads every shard with a stride of 4 (uneven
    remainders). Each slot's epoch is cut at its known share (`epoch_share`), documents are
    rebuilt from the rows (`worker_documents`) and decoded; over the 4 slots every source
    text must come out exactly once."""
    texts = text_documents(NUM_DOCUMENTS)
    directory = write_jsonl_shards(tmp_path / "docs", texts, num_shards)
    shard_sizes = [len(texts[shard::num_shards]) for shard in range(num_shards)]
    source = SourceConfig(name="docs", paths=[str(directory)])
    cfg = make_config(tmp_path, [source], num_workers=NUM_WORKERS, shuffle_window=4)
    assert cfg.shuffle
    tokenizer = load_tokenizer("embedded")
    eos = token_id(tokenizer, ENDOFTEXT)
    seen: Counter = Counter()
    for rank in range(WORLD_SIZE):
        for slot, documents in rank_epoch(cfg, rank, shard_sizes, eos).items():
            assert documents, f"slot {slot} read nothing"
            seen.update(tokenizer.decode(document[:-1]) for document in documents)
    repeated = sorted(text for text, count in seen.items() if count > 1)
    missing = sorted(set(texts) - set(seen))
    unknown = sorted(set(seen) - set(texts))
    assert not (repeated or missing or unknown), (
        f"read twice: {repeated}; never read: {missing}; not in the source: {unknown}"
    )


def test_sources_with_fewer_shards_than_slots_are_named_once(tmp_path, caplog):
    few = write_jsonl_shards(tmp_path / "few", text_documents(9), num_shards=3)
    many = write_jsonl_shards(tmp_path / "many", text_documents(9, "m"), num_shards=4)
    sources = [
        SourceConfig(name="few", paths=[str(few)]),
        SourceConfig(name="many", paths=[str(many)]),
    ]
    cfg = make_config(tmp_path, sources, num_workers=2)
    with caplog.at_level(logging.WARNING, logger="data_pipelines.loader"):
        for rank in (0, 1):
            build_data_loader(cfg, rank=rank, world_size=2, micro_batch_size=1)
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1 and "few (3)" in warnings[0] and "many" not in warnings[0]
    assert "each shard is read 4 times" in warnings[0]


def test_a_worker_forked_while_another_thread_holds_tqdms_lock_still_reads(tmp_path):
    """tqdm's monitor thread takes tqdm's lock every 10 s while a bar exists, and `datasets`
    takes it to open a file: a worker forked while the rank's monitor held it waited for ever
    for its copy, and its rank with it (a job of the test suite hung this way)."""
    from tqdm import tqdm

    path = write_jsonl_shards(tmp_path / "docs", text_documents(20), num_shards=1)
    cfg = make_config(tmp_path, [SourceConfig(name="docs", paths=[str(path)])], num_workers=1)
    loader = build_data_loader(cfg, rank=0, world_size=1, micro_batch_size=2)
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with tqdm.get_lock():
            held.set()
            release.wait()

    threading.Thread(target=hold, daemon=True).start()
    held.wait()
    got = []
    reader = threading.Thread(target=lambda: got.append(next(iter(loader))), daemon=True)
    reader.start()  # its first batch forks the worker while the lock is held
    while not psutil.Process().children():
        time.sleep(0.05)
    time.sleep(0.5)
    release.set()  # the rank lets go: only the worker's copy could stay held
    reader.join(60)
    if not got:
        for worker in psutil.Process().children(recursive=True):
            worker.kill()
    assert got, "the loader worker never answered: it waits on a lock it inherited held"
    assert got[0]["input_ids"].shape == (2, cfg.seq_len)
