"""The data loader on 2 gloo ranks x 2 workers: disjoint ranks, exact per-rank resume."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

from data_pipelines import SourceConfig, build_data_loader
from tests.distributed.launch import free_port
from tests.unit.test_data_fixtures import (
    assert_same_batches,
    labelled_token_documents,
    make_config,
    take,
    write_token_shards,
)

WORLD_SIZE = 2


def rank_main(rank: int, directory: str, port: int) -> None:
    # Ranks started by torchrun fork their loader workers; mp.spawn made this one spawn them.
    multiprocessing.set_start_method("fork", force=True)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        source = SourceConfig(name="docs", paths=[directory])
        cfg = make_config(Path(directory).parent, [source], num_workers=2, shuffle_window=6)
        uninterrupted = take(
            build_data_loader(cfg, rank=rank, world_size=WORLD_SIZE, micro_batch_size=2), 8
        )
        first = build_data_loader(cfg, rank=rank, world_size=WORLD_SIZE, micro_batch_size=2)
        resumed = take(first, 3)
        states = [None] * WORLD_SIZE
        dist.all_gather_object(states, first.state_dict())
        second = build_data_loader(cfg, rank=rank, world_size=WORLD_SIZE, micro_batch_size=2)
        second.load_state_dict(states[rank])
        resumed += take(second, 5)
        assert_same_batches(uninterrupted, resumed)
        seen = sorted(
            {
                int(token)
                for batch in uninterrupted
                for token in batch["input_ids"].reshape(-1)
                if token
            }
        )
        gathered = [None] * WORLD_SIZE
        dist.all_gather_object(gathered, seen)
        assert all(gathered), "a rank saw no documents"
        assert not set(gathered[0]) & set(gathered[1]), "two ranks read the same document"
    finally:
        dist.destroy_process_group()


def test_two_ranks_read_disjoint_documents_and_resume_exactly(tmp_path):
    directory = write_token_shards(tmp_path / "docs", labelled_token_documents(200), num_shards=5)
    mp.spawn(rank_main, args=(str(directory), free_port()), nprocs=WORLD_SIZE, join=True)
