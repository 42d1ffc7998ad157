"""Exact resume: restored loaders yield token-identical batches to an uninterrupted run."""

from __future__ import annotations

import json
import re

import pytest

from data_pipelines import SourceConfig, build_data_loader
from tests.unit.test_data_fixtures import (
    assert_same_batches,
    make_config,
    take,
    text_documents,
    write_jsonl,
    write_jsonl_shards,
)


def two_source_config(tmp_path, **overrides):
    web = write_jsonl_shards(tmp_path / "web", text_documents(40, "web"), num_shards=3)
    code = write_jsonl(tmp_path / "code.jsonl", text_documents(25, "code", seed=1))
    sources = [
        SourceConfig(name="web", paths=[str(web)], weight=0.7),
        SourceConfig(name="code", paths=[str(code)], weight=0.3),
    ]
    return make_config(tmp_path, sources, shuffle_window=4, **overrides)


def build(cfg, state=None):
    loader = build_data_loader(cfg, rank=0, world_size=1, micro_batch_size=2)
    if state is not None:
        loader.load_state_dict(json.loads(json.dumps(state)))
    return loader


def run_in_pieces(cfg, pieces: list[int]) -> list[dict]:
    batches, state = [], None
    for count in pieces:
        loader = build(cfg, state)
        batches += take(loader, count)
        state = loader.state_dict()
    return batches


@pytest.mark.parametrize(
    ("num_workers", "window_tokens"), [(0, 1_000_000), (2, 1_000_000), (0, 25)]
)
def test_resuming_twice_gives_the_uninterrupted_batches(tmp_path, num_workers, window_tokens):
    cfg = two_source_config(tmp_path, num_workers=num_workers, window_tokens=window_tokens)
    reference = take(build(cfg), 30)
    assert_same_batches(reference, run_in_pieces(cfg, [7, 10, 13]))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_across_a_stage_change(tmp_path, num_workers):
    cfg = two_source_config(tmp_path, num_workers=num_workers)
    loader = build(cfg)
    reference = take(loader, 4)
    loader.set_stage(weights={"code": 1.0}, seq_len=9)
    reference += take(loader, 10)
    assert reference[-1]["input_ids"].shape == (2, 9)

    loader = build(cfg)
    resumed = take(loader, 4)
    loader.set_stage(weights={"code": 1.0}, seq_len=9)
    resumed += take(loader, 3)
    resumed += take(build(cfg, loader.state_dict()), 7)
    assert_same_batches(reference, resumed)


def test_set_stage_rejects_unknown_sources(tmp_path):
    loader = build(two_source_config(tmp_path))
    with pytest.raises(ValueError, match="unknown sources"):
        loader.set_stage(weights={"books": 1.0})


def test_a_changed_file_set_is_detected_unless_allowed(tmp_path):
    cfg = two_source_config(tmp_path)
    loader = build(cfg)
    take(loader, 3)
    state = loader.state_dict()
    write_jsonl(tmp_path / "web" / "part-new.jsonl", text_documents(5, "late"))
    with pytest.raises(ValueError, match=r"web \(files changed\)"):
        build(cfg, state)
    cfg.allow_source_change = True
    take(build(cfg, state), 2)


def test_a_state_from_another_layout_is_refused(tmp_path):
    cfg = two_source_config(tmp_path)
    state = build(cfg).state_dict()
    cfg.num_workers = 2
    with pytest.raises(ValueError, match="num_workers"):
        build(cfg, state)


def test_a_state_from_another_layout_or_no_loader_is_refused_by_name(tmp_path):
    cfg = two_source_config(tmp_path)
    state = build(cfg).state_dict()
    for stale, expected in (
        (dict(state, world_size=4), "world_size: saved 4, now 1"),
        ({key: value for key, value in state.items() if key != "version"}, "missing ['version']"),
        (dict(state, workers=[]), "not one this loader saved: 0 workers"),
        ({"step": 3}, "missing ['version', 'rank'"),
    ):
        with pytest.raises(ValueError, match=re.escape(expected)):
            build(cfg, stale)


@pytest.mark.parametrize(
    ("setting", "value", "named"),
    [
        ("seed", 7, "seed: saved 0, now 7"),
        ("shuffle_window", 3, "shuffle_window: saved 4, now 3"),
        ("window_tokens", 9, "window_tokens: saved 1000000, now 9"),
        ("max_document_chars", 9, "max_document_chars: saved 1000000, now 9"),
        ("shuffle", False, "shuffle: saved True, now False"),
        ("eos_token", "<|im_end|>", "eos_token: saved '<|endoftext|>', now '<|im_end|>'"),
    ],
)
def test_a_changed_setting_that_moves_the_positions_is_refused_unless_allowed(
    tmp_path, setting, value, named
):
    cfg = two_source_config(tmp_path)
    loader = build(cfg)
    take(loader, 5)
    state = loader.state_dict()
    setattr(cfg, setting, value)
    with pytest.raises(ValueError, match=re.escape(named)):
        build(cfg, state)
    cfg.allow_source_change = True
    resumed = take(build(cfg, state), 12)  # starts the windows again, in the new order
    assert all(batch["input_ids"].shape == (2, cfg.seq_len) for batch in resumed)


def test_a_source_read_another_way_restarts_when_allowed(tmp_path):
    cfg = two_source_config(tmp_path)
    loader = build(cfg)
    take(loader, 5)
    state = loader.state_dict()
    cfg.sources[1].text_split = "line"
    with pytest.raises(
        ValueError, match=r"sources\.code .*saved \['auto', 'text', .*'paragraph'\]"
    ):
        build(cfg, state)
    cfg.allow_source_change = True
    assert len(take(build(cfg, state), 3)) == 3


def _without_max_document_chars(state: dict) -> dict:
    settings = {k: v for k, v in state["settings"].items() if k != "max_document_chars"}
    return {**state, "settings": settings}


@pytest.mark.parametrize(
    "older",
    [
        _without_max_document_chars,  # saved before that setting existed
        lambda state: {k: v for k, v in state.items() if k != "settings"},  # before any
    ],
    ids=["before_a_setting_existed", "before_settings_were_recorded"],
)
def test_a_state_saved_by_an_older_loader_still_resumes(tmp_path, older):
    cfg = two_source_config(tmp_path)
    loader = build(cfg)
    reference = take(loader, 8)
    loader = build(cfg)
    first = take(loader, 3)
    state = older(loader.state_dict())
    assert_same_batches(reference, first + take(build(cfg, state), 5))


def test_reapplying_the_current_stage_after_resume_changes_nothing(tmp_path):
    cfg = two_source_config(tmp_path)
    loader = build(cfg)
    loader.set_stage(weights={"web": 1.0, "code": 1.0}, seq_len=12)
    reference = take(loader, 6)
    loader = build(cfg)
    loader.set_stage(weights={"web": 1.0, "code": 1.0}, seq_len=12)
    resumed = take(loader, 2)
    loader = build(cfg, loader.state_dict())
    loader.set_stage(weights={"web": 1.0, "code": 1.0}, seq_len=12)
    assert_same_batches(reference, resumed + take(loader, 4))
