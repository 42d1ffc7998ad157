"""The `data` config group: every shipped YAML composes; validation reports every problem."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from data_pipelines import DataConfig, SourceConfig, validate_data_config
from data_pipelines.config import load_data_config, rendering

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
        template="markdown",
        seq_len=0,
        tokenizer=str(tmp_path / "missing.json"),
        on_bad_input="ignore",
    )
    problems = "\n".join(validate_data_config(cfg))
    for expected in (
        "data.kind",
        "data.template: 'markdown' is not one of ('chatml', 'plain')",
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


def test_missing_relative_paths_are_local_errors_not_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "assets").mkdir()
    cfg = DataConfig(
        sources=[
            SourceConfig(name="a", paths=["data/train.jsonl"]),  # a data file's suffix
            SourceConfig(name="b", paths=["assets/web"]),  # its directory exists
        ],
        tokenizer="assets/tokenizer.json",
    )
    problems = validate_data_config(cfg)
    assert "data.sources[0] (a): data/train.jsonl: no such file or directory" in problems
    assert "data.sources[1] (b): assets/web: no such file or directory" in problems
    assert "data.tokenizer: no tokenizer file at 'assets/tokenizer.json'" in problems
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    hub = DataConfig(sources=[SourceConfig(name="c", paths=["owner/corpus"])], tokenizer="o/t")
    assert validate_data_config(hub) == []  # hub ids, looked up when the loader starts


def test_an_unreadable_tokenizer_or_one_without_the_needed_tokens_fails_validation(tmp_path):
    from tokenizers import Tokenizer, models

    junk, plain = tmp_path / "junk.json", tmp_path / "plain.json"
    junk.write_text('{"model": 3}')
    plain.write_text(Tokenizer(models.WordLevel({"a": 0, "<|im_start|>": 1}, "a")).to_str())
    source = SourceConfig(name="a", paths=[str(tmp_path)])
    for tokenizer, kind, template, expected in (
        (junk, "pretrain", "chatml", [f"'{junk}' is not a readable tokenizer.json"]),
        (plain, "pretrain", "chatml", [f"'{plain}' has no token '<|endoftext|>'"]),
        (
            plain,
            "sft",
            "chatml",
            [f"'{plain}' has no token '<|endoftext|>'", "no token '<|im_end|>'"],
        ),
        # The plain rendering needs no ChatML tokens.
        (plain, "sft", "plain", [f"'{plain}' has no token '<|endoftext|>'"]),
    ):
        cfg = DataConfig(sources=[source], tokenizer=str(tokenizer), kind=kind, template=template)
        problems = [p for p in validate_data_config(cfg) if p.startswith("data.tokenizer")]
        assert len(problems) == len(expected)
        for problem, text in zip(problems, expected, strict=True):
            assert text in problem


def test_the_rendering_a_job_announces_follows_kind_template_and_packing():
    assert rendering(DataConfig()) == "documents packed split, every token a target"
    assert rendering(DataConfig(kind="sft", template="plain")) == (
        "plain conversations packed whole, the assistant's tokens the targets"
    )
    sft_split = DataConfig(kind="sft", packing="split")
    assert rendering(sft_split).startswith("chatml conversations packed split")
