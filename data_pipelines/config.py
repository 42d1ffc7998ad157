"""Config schemas of the `data` group and their validation.

`DataConfig` is registered in Hydra's ConfigStore as `data/schema`; a YAML file under
`configs/data/` starts with `defaults: [schema, _self_]` so that a typo'd key or a wrong type
fails at compose time. `validate_data_config` runs the cross-field and filesystem checks
before any process or worker starts and reports every problem at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from data_pipelines.readers import ReadOptions, probe_problem
from data_pipelines.shards import FORMATS, ShardResolutionError, first_middle_last, resolve_shards
from data_pipelines.tokenized import token_source_problems
from data_pipelines.tokenizer import (
    IM_END,
    IM_START,
    TEMPLATES,
    special_token_problems,
    tokenizer_problem,
)

KINDS = ("pretrain", "sft")
BAD_INPUT_POLICIES = ("skip", "error")
TEXT_SPLITS = ("file", "paragraph", "line")
PACKINGS = ("split", "whole", "auto")


@dataclass
class SourceConfig:
    """One data source of a mixture."""

    name: str = "???"
    """Unique name; mixture weights given to `set_stage` refer to it."""
    paths: list[str] = field(default_factory=list)
    """Local files, globs or directories; http(s)/s3 URLs; `hf://datasets/<id>/<glob>`;
    `stdlib://` (the Python standard library's sources); `synthetic://<task>?k=v`."""
    format: str = "auto"
    """jsonl, json.gz, json.zst, parquet, arrow, text, tokens (pre-tokenized shards), or
    auto (from each file's suffix)."""
    text_field: str = "text"
    """Record field holding a pre-training document."""
    messages_field: str = "messages"
    """Record field holding an SFT conversation: a list of {role, content} messages."""
    weight: float = 1.0
    """Mixture weight; weights are normalised over the sources."""
    text_split: str = "paragraph"
    """How plain text files become documents: one per file, per blank-line-separated
    paragraph, or per line."""


@dataclass
class DataConfig:
    """Where tokens come from and how they become batches."""

    sources: list[SourceConfig] = field(default_factory=list)
    """The mixture's sources."""
    kind: str = "pretrain"
    """pretrain: plain documents, every next token is a target. sft: conversations, only
    assistant tokens are targets."""
    template: str = "chatml"
    """How an sft run renders a conversation. chatml: `<|im_start|>role\ncontent<|im_end|>\n`
    per message; the assistant's content and `<|im_end|>` are targets; a chat model. plain:
    the contents one space apart, then EOS; the assistant's content and the EOS are targets
    (single-turn questions answered as completions: no markup, no roles); exported with
    EOS `<|endoftext|>`."""
    tokenizer: str = "embedded"
    """Path to a tokenizer.json, `embedded` (the tokenizer shipped in this package) or a hub
    name (needs network access)."""
    eos_token: str = "<|endoftext|>"
    """Token appended to every document."""
    seq_len: int = 2048
    """Tokens per packed sequence; `set_stage` may change it at a stage boundary."""
    packing: str = "auto"
    """split: a document cut at a sequence's end continues in the next sequence. whole: a
    document that does not fit in what is left of a sequence starts the next one, and the
    rest is padding (EOS inputs, no targets); only a document longer than `seq_len` is split.
    auto: whole for sft, split for pretrain."""
    num_workers: int = 1
    """DataLoader worker processes per rank (0: read in the training process)."""
    prefetch_factor: int = 2
    """Batches each worker prepares ahead."""
    seed: int = 0
    """Seeds the shard order, the document shuffle and the mixture draws."""
    shuffle: bool = True
    """Shuffle shards per epoch and documents within a window."""
    shuffle_window: int = 1024
    """Documents tokenized together and, with `shuffle`, permuted together. The window is
    re-read on resume, so the shuffle state is just a position."""
    window_tokens: int = 1_000_000
    """A window also ends at the document that brings it to this many tokens, which bounds
    memory and resume time for long documents."""
    tokenize_once_mb: float = 64.0
    """A source whose files are local and take at most this many MB in all is tokenized once:
    each reading slot keeps its windows and later epochs reuse them, permuted as before, so
    the batches are those of reading again (a window holding a bad record is read again, and
    reported each epoch as before). 0 reads and tokenizes every epoch again."""
    max_document_chars: int = 1_000_000
    """Characters of one document the tokenizer sees at a time, which bounds a reader's
    memory (the tokenizer holds about 100 bytes per character it is given). A longer
    pre-training document is tokenized in pieces of at most this many characters, cut at
    whitespace, and stays one document; a longer SFT conversation is skipped as bad input
    (`too_long`). Both are counted and logged with file and line."""
    on_bad_input: str = "skip"
    """skip: count, log with file and line, go on. error: raise at the first bad record."""
    allow_source_change: bool = False
    """Accept a resume state whose sources or files differ from the current ones."""
    cache_dir: str = "~/.cache/looplm"
    """Where generated synthetic sources are written."""
    max_retries: int = 5
    """Attempts at a remote read before giving up."""
    retry_backoff_s: float = 1.0
    """First wait between remote read attempts; doubles after each failure."""


def validate_data_config(cfg: DataConfig) -> list[str]:
    """Return every problem of `cfg` (empty when it is usable), cheaply and offline.

    Checks field values; that every local path exists and matches files of a known format;
    that the first, middle and last local shards of each source are what it declares (their
    first bytes, schema or first records); the indices and `tokens.json` of pre-tokenized
    shards; and that the tokenizer can be found and, when local, holds the needed tokens.
    """
    problems = _field_problems(cfg)
    names = [source.name for source in cfg.sources]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        problems.append(f"data.sources: duplicate names {duplicates}")
    for index, source in enumerate(cfg.sources):
        problems += _source_problems(source, f"data.sources[{index}] ({source.name})", cfg)
    if cfg.sources and sum(max(source.weight, 0.0) for source in cfg.sources) <= 0:
        problems.append("data.sources: the weights sum to zero")
    problem = tokenizer_problem(cfg.tokenizer)
    if problem:
        problems.append(f"data.tokenizer: {problem}")
    else:
        chatml = cfg.kind == "sft" and cfg.template == "chatml"
        needed = [cfg.eos_token] + ([IM_START, IM_END] if chatml else [])
        problems += [f"data.tokenizer: {p}" for p in special_token_problems(cfg.tokenizer, needed)]
    return problems


def _field_problems(cfg: DataConfig) -> list[str]:
    checks = [
        (not cfg.sources, "data.sources: at least one source is needed"),
        (cfg.kind not in KINDS, f"data.kind: {cfg.kind!r} is not one of {KINDS}"),
        (
            cfg.template not in TEMPLATES,
            f"data.template: {cfg.template!r} is not one of {tuple(TEMPLATES)}",
        ),
        (cfg.seq_len < 1, f"data.seq_len: must be positive, got {cfg.seq_len}"),
        (cfg.packing not in PACKINGS, f"data.packing: {cfg.packing!r} is not one of {PACKINGS}"),
        (cfg.num_workers < 0, f"data.num_workers: must be >= 0, got {cfg.num_workers}"),
        (cfg.prefetch_factor < 1, f"data.prefetch_factor: must be >= 1, got {cfg.prefetch_factor}"),
        (cfg.shuffle_window < 1, f"data.shuffle_window: must be >= 1, got {cfg.shuffle_window}"),
        (cfg.window_tokens < 1, f"data.window_tokens: must be >= 1, got {cfg.window_tokens}"),
        (
            not cfg.tokenize_once_mb >= 0,
            f"data.tokenize_once_mb: must be >= 0, got {cfg.tokenize_once_mb}",
        ),
        (
            cfg.max_document_chars < 1,
            f"data.max_document_chars: must be >= 1, got {cfg.max_document_chars}",
        ),
        (cfg.max_retries < 1, f"data.max_retries: must be >= 1, got {cfg.max_retries}"),
        (
            cfg.retry_backoff_s < 0,
            f"data.retry_backoff_s: must be >= 0, got {cfg.retry_backoff_s}",
        ),
        (cfg.seed < 0, f"data.seed: must be >= 0, got {cfg.seed}"),
        (
            cfg.on_bad_input not in BAD_INPUT_POLICIES,
            f"data.on_bad_input: {cfg.on_bad_input!r} is not one of {BAD_INPUT_POLICIES}",
        ),
    ]
    return [message for failed, message in checks if failed]


def _source_problems(source: SourceConfig, where: str, cfg: DataConfig) -> list[str]:
    problems = []
    if source.name in ("", "???"):
        problems.append(f"{where}: a name is needed")
    if source.format not in FORMATS:
        problems.append(f"{where}: unknown format {source.format!r}; known: {FORMATS}")
    if source.weight < 0:
        problems.append(f"{where}: weight must be >= 0, got {source.weight}")
    if source.text_split not in TEXT_SPLITS:
        problems.append(f"{where}: text_split {source.text_split!r} is not one of {TEXT_SPLITS}")
    if not source.paths:
        problems.append(f"{where}: no paths")
    if source.format == "tokens" and cfg.kind == "sft":
        problems.append(f"{where}: pre-tokenized shards carry no SFT masks; use kind=pretrain")
    if source.format in FORMATS and source.paths:
        try:
            shards = resolve_shards(source, cfg.cache_dir, check_only=True)
        except ShardResolutionError as error:
            problems += [f"{where}: {message}" for message in error.problems]
        else:
            problems += [f"{where}: {problem}" for problem in _probe(source, shards, cfg.kind)]
    if source.format in ("tokens", "auto"):
        tokenizer = None if tokenizer_problem(cfg.tokenizer) else cfg.tokenizer
        for path in source.paths:
            found = token_source_problems(path, tokenizer, False, cfg.eos_token)
            problems += [f"{where}: {problem}" for problem in found]
    return problems


def _probe(source: SourceConfig, shards, kind: str) -> list[str]:
    """A wrong format or field name shows in every shard: probe the first, middle and last
    local shards, and report only when all of them fail (one bad shard is bad input)."""
    local = first_middle_last([shard for shard in shards if not shard.remote])
    field = source.text_field if kind == "pretrain" else source.messages_field
    found = [probe_problem(shard, ReadOptions(field), kind) for shard in local]
    return [found[0]] if found and all(found) else []


def packs_whole_documents(cfg: DataConfig) -> bool:
    """Whether `cfg.packing`, with `auto` resolved by `cfg.kind`, keeps documents whole."""
    return cfg.packing == "whole" or (cfg.packing == "auto" and cfg.kind == "sft")


def rendering(cfg: DataConfig) -> str:
    """What a run trains on, in words (the job says it as it opens the data streams)."""
    packed = "whole" if packs_whole_documents(cfg) else "split"
    if cfg.kind == "sft":
        return f"{cfg.template} conversations packed {packed}, the assistant's tokens the targets"
    return f"documents packed {packed}, every token a target"


def load_data_config(path: str, overrides: list[str] | tuple[str, ...] = ()) -> DataConfig:
    """A `DataConfig` from a YAML file of the `data` group plus `key=value` overrides, for
    scripts that run outside a Hydra job (the file's `defaults` list is ignored)."""
    raw = OmegaConf.load(path)
    raw.pop("defaults", None)
    schema = OmegaConf.structured(DataConfig)
    return OmegaConf.to_object(
        OmegaConf.merge(schema, raw, OmegaConf.from_dotlist(list(overrides)))
    )


def register_configs() -> None:
    """Register the `data` group's schema with Hydra's ConfigStore."""
    ConfigStore.instance().store(group="data", name="schema", node=DataConfig)


register_configs()
