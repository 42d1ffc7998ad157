"""A resumed job applies a changed setting from the resume point, logged, or refuses it by
name: checked over the shipped configs, as `run_job` writes and the trainer reads them."""

from __future__ import annotations

import logging

import pytest
from omegaconf import OmegaConf

from tests.unit.test_train_config import composed
from train.resume_settings import (
    DATA_POSITIONS,
    REFUSED,
    ResumeSettingsError,
    changed_settings,
    check_resume_settings,
    flatten,
)

BASE = ["experiment=tiny_cpu"]


def saved_run(tmp_path, *overrides: str):
    """A run directory whose config.yaml is what the job of `overrides` wrote."""
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(composed(*BASE, *overrides)))
    return tmp_path


def current(*overrides: str) -> dict:
    """The composed config as the job compares it (as config.yaml records it)."""
    return OmegaConf.to_container(composed(*BASE, *overrides), resolve=True, throw_on_missing=False)


def test_flatten_names_every_leaf_with_list_indices():
    tree = {"a": {"b": 1, "c": [2, {"d": 3}]}, "e": [], "f": {}}
    assert flatten(tree) == {"a.b": 1, "a.c.0": 2, "a.c.1.d": 3, "e": [], "f": {}}
    assert changed_settings({"a": [1, 2]}, {"a": [1]}) == {"a.1": (2, "<absent>")}


def test_an_unchanged_resume_says_nothing(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    assert check_resume_settings(saved_run(tmp_path), current(), step=300) == []
    assert caplog.text == ""


def test_a_moved_run_directory_is_said_once_and_is_not_a_changed_setting(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    saved = saved_run(tmp_path, "run_dir=/scratch/runs/tiny")
    assert check_resume_settings(saved, current("run_dir=/home/runs/tiny"), step=300) == []
    assert "the run directory moved: saved in /scratch/runs/tiny, resumed in /home/runs/tiny" in (
        caplog.text
    )
    assert "setting changed at resume" not in caplog.text


def test_nothing_is_compared_without_a_checkpoint_or_a_saved_config(tmp_path):
    assert check_resume_settings(tmp_path, current("seed=9"), step=10) == []
    assert check_resume_settings(saved_run(tmp_path), current("seed=9"), step=None) == []


APPLIED = [
    ("optim.lr=1e-4", "optim.lr: 0.002 -> 0.0001"),
    ("optim.weight_decay=0.2", "optim.weight_decay: 0.1 -> 0.2"),
    ("optim.betas=[0.8,0.9]", "optim.betas.0: 0.9 -> 0.8"),
    ("train.max_steps=600", "train.max_steps: 300 -> 600"),
    ("train.micro_batch_size=2", "train.micro_batch_size: 4 -> 2"),
    ("data.sources.1.weight=0.5", "data.sources.1.weight: 0.15 -> 0.5"),
    ("data.seq_len=128", "data.seq_len: 256 -> 128"),
    ("stability.window=10", "stability.window: 100 -> 10"),
    ("checkpoint.every_steps=50", "checkpoint.every_steps: 100 -> 50"),
    ("model.gradient_checkpointing=true", "model.gradient_checkpointing: False -> True"),
    ("eval=none", "eval.tasks.0.name: 'multi_hop' -> '<absent>'"),
]


@pytest.mark.parametrize(("override", "line"), APPLIED)
def test_a_changed_setting_that_can_apply_is_applied_and_logged(tmp_path, caplog, override, line):
    caplog.set_level(logging.WARNING)
    applied = check_resume_settings(saved_run(tmp_path), current(override), step=300)
    assert line in applied
    assert f"setting changed at resume, applies from step 300: {line}" in caplog.text


REFUSES = [
    ("seed=1", "seed: saved 0, now 1"),
    ("init_from=/elsewhere", "init_from: saved None, now '/elsewhere'"),
    ("model.hidden_size=64", "model.hidden_size: saved None, now 64"),
    ("model=small", "model.preset: saved 'tiny', now 'small'"),
    ("model.total_ut_steps=2", "model.total_ut_steps: saved None, now 2"),
    ("deepspeed.zero_stage=3", "deepspeed.zero_stage: saved 2, now 3"),
    ("deepspeed.precision=fp32", "deepspeed.precision: saved 'auto', now 'fp32'"),
    ("data.num_workers=2", "data.num_workers: saved 1, now 2"),
    ("data.seed=4", "data.seed: saved 0, now 4"),
    ("data.tokenizer=/t.json", "data.tokenizer: saved 'embedded', now '/t.json'"),
    ("data.max_document_chars=10", "data.max_document_chars: saved 1000000, now 10"),
    ("data.sources.0.text_split=line", "data.sources.0.text_split: saved 'file', now 'line'"),
    ("data.template=plain", "data.template: saved 'chatml', now 'plain'"),
]


@pytest.mark.parametrize(("override", "named"), REFUSES)
def test_a_setting_the_checkpoint_fixes_is_refused_by_name(tmp_path, override, named):
    with pytest.raises(ResumeSettingsError) as error:
        check_resume_settings(saved_run(tmp_path), current(override), step=300)
    assert "would change settings its checkpoint fixes" in str(error.value)
    assert named in str(error.value)


def test_every_refusal_is_named_at_once(tmp_path):
    with pytest.raises(ResumeSettingsError) as error:
        check_resume_settings(
            saved_run(tmp_path), current("seed=1", "deepspeed.zero_stage=3"), step=3
        )
    assert "seed: saved 0" in str(error.value) and "deepspeed.zero_stage: saved 2" in str(
        error.value
    )


def test_a_run_saved_before_a_setting_existed_had_its_value(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    run = saved_run(tmp_path)
    saved = OmegaConf.load(run / "config.yaml")
    del saved.data["template"]  # a run of before data.template: ChatML
    (run / "config.yaml").write_text(OmegaConf.to_yaml(saved))
    assert check_resume_settings(run, current(), step=3) == [] and caplog.text == ""
    with pytest.raises(ResumeSettingsError, match="data.template: saved 'chatml', now 'plain'"):
        check_resume_settings(run, current("data.template=plain"), step=3)


def test_data_position_settings_apply_when_the_source_change_is_allowed(tmp_path):
    allowed = current("data.seed=4", "data.allow_source_change=true")
    applied = check_resume_settings(saved_run(tmp_path), allowed, step=3)
    assert "data.seed: 0 -> 4" in applied


def test_a_curriculum_may_change_depth_and_rope_base(tmp_path):
    run = saved_run(tmp_path, "experiment=tiny_ouro_1.4b")
    changed = OmegaConf.to_container(
        composed("experiment=tiny_ouro_1.4b", "model.total_ut_steps=2"), resolve=True
    )
    assert "model.total_ut_steps: None -> 2" in check_resume_settings(run, changed, step=3)


def test_every_refused_key_is_a_setting_of_the_schema():
    keys = set(flatten(current()))
    for key in [*REFUSED, *DATA_POSITIONS]:
        assert key in keys, f"{key} names no setting"
