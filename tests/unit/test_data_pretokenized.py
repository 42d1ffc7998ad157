"""The pre-tokenized path gives the streamed path's tokens for the same documents."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_pipelines import SourceConfig, build_data_loader
from data_pipelines.tokenized import META_FILE, open_token_shard, pretokenize
from tests.unit.test_data_fixtures import (
    assert_same_batches,
    make_config,
    take,
    text_documents,
    write_jsonl_shards,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("window_tokens", [1_000_000, 30])
def test_pretokenized_shards_yield_the_streamed_batches(tmp_path, window_tokens):
    directory = write_jsonl_shards(tmp_path / "docs", text_documents(50), num_shards=3)
    with open(directory / "part-1.jsonl", "a") as file:
        file.write("{broken\n")
    streamed = SourceConfig(name="docs", paths=[str(directory)])
    cfg = make_config(tmp_path, [streamed], shuffle_window=4, window_tokens=window_tokens)
    progress = []
    counts = pretokenize(
        streamed,
        cfg,
        str(tmp_path / "tokens"),
        num_procs=1,
        progress=lambda *done: progress.append(done),
    )
    assert counts == {"malformed": 1}
    assert len(progress) == 3 and sum(documents for _, documents in progress) == 50
    assert json.loads((tmp_path / "tokens" / META_FILE).read_text())["dtype"] == "uint16"
    shard = open_token_shard(str(tmp_path / "tokens" / "00000.bin"))
    assert isinstance(shard.tokens.base, np.memmap) and shard.document(0)[-1] == 0

    pretokenized = make_config(
        tmp_path,
        [SourceConfig(name="docs", paths=[str(tmp_path / "tokens")])],
        shuffle_window=4,
        window_tokens=window_tokens,
    )
    for rank in range(2):
        expected = take(build_data_loader(cfg, rank=rank, world_size=2, micro_batch_size=2), 12)
        actual = take(
            build_data_loader(pretokenized, rank=rank, world_size=2, micro_batch_size=2), 12
        )
        assert_same_batches(expected, actual)


@pytest.mark.parametrize("procs", [1, 2])
def test_pretokenize_script_writes_readable_shards(tmp_path, procs):
    directory = write_jsonl_shards(tmp_path / "docs", text_documents(20), num_shards=2)
    out = tmp_path / "tokens"
    result = subprocess.run(
        [
            sys.executable,
            "scripts/pretokenize.py",
            "--paths",
            str(directory),
            "--procs",
            str(procs),
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr
    assert "2 shards, 20 documents" in result.stdout
    assert "leaked" not in result.stderr, "pool workers must exit on their own"
    cfg = make_config(tmp_path, [SourceConfig(name="docs", paths=[str(out)])])
    assert take(build_data_loader(cfg, rank=0, world_size=1, micro_batch_size=2), 1)
