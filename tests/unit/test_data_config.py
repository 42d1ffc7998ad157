"""The `data` config group: every shipped YAML composes; validation reports every problem."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from data_pipelines import DataConfig, SourceConfig, validate_data_config
from data_pipelines.config import load_data_config

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
DATA_CONFIGS = sorted(path.stem for path in (CONFIG_DIR / "data").glob("*.yaml"))


@pytest.mark.parametrize("name", DATA_CONFIGS)
def test_every_data_config_composes_against_the_schema(name):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose(overrides=[f"+data={name}"])
    data = OmegaConf.to_object(cfg.data)
    assert isinstance(data, DataConfig)
    assert data.sources and all(isinstance(source, SourceConfig) for source in data.sources)


def test_a_typo_fails_at_compose_time():
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        with pytest.raises(Exception, match="seq_lenn"):
            compose(overrides=["+data=embedded", "data.seq_lenn=3"])


def test_the_embedded_corpus_is_valid_offline(tmp_path):
    cfg = load_data_config(str(CONFIG_DIR / "data" / "embedded.yaml"), [f"cache_dir={tmp_path}"])
    assert validate_data_config(cfg) == []
    assert {source.name for source in cfg.sources} == {
        "python_stdlib",
        "multi_hop",
        "mano",
        "reachability",
    }


def test_validation_lists_every_problem(tmp_path):
    cfg = DataConfig(
        sources=[
            SourceConfig(name="a", paths=[str(tmp_path / "nothing.jsonl")], weight=-1.0),
            SourceConfig(name="a", paths=["corpus.xml"], format="xml"),
            SourceConfig(name="b", paths=["synthetic://sudoku"], format="jsonl"),
        ],
        kind="chat",
        seq_len=0,
        tokenizer=str(tmp_path / "missing.json"),
        on_bad_input="ignore",
    )
    problems = "\n".join(validate_data_config(cfg))
    for expected in (
        "data.kind",
        "data.seq_len",
        "data.on_bad_input",
        "duplicate names ['a']",
        "nothing.jsonl: no such file",
        "weight must be >= 0",
        "unknown format 'xml'",
        "unknown synthetic task 'sudoku'",
        "data.tokenizer",
    ):
        assert expected in problems
