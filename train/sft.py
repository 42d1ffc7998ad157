"""Reasoning SFT, the Thinking variants' recipe (OURO.md §3): ``python -m train.sft`` (or
``looplm-sft``), under torchrun.

    torchrun --nproc_per_node 8 -m train.sft init_from=/models/Ouro-1.4B run_dir=/ckpt/sft \
        export_dir=/models/Ouro-1.4B-Thinking data.tokenizer=/models/Ouro-1.4B/tokenizer.json \
        'data.sources=[{name: chat, paths: ["/data/sft/*.jsonl"]}]'

The data are conversations (``data.kind=sft``): records with a ``messages`` list of
``{role, content}``, assistant turns possibly opening with a ``<think>...</think>`` segment,
rendered in ChatML (``data.template=plain``: contents one space apart, then EOS, for
single-turn questions answered as completions). Only assistant tokens (content and closing
``<|im_end|>``, or the plain rendering's EOS) are targets; conversations are
packed into ``data.seq_len`` tokens and never attend to each other. The objective is Stage I
over those targets, with the run's ``train.beta`` (the exit gate keeps training). Streams,
DeepSpeed, checkpoints, exact resume, guards and metrics are the pre-training trainer's.

``init_from`` is an Ouro-format directory (or hub id), a run directory (its latest complete
checkpoint) or one checkpoint step directory; a run checkpoint is first written once as an
Ouro-format directory into ``RUN_DIR/source_model``.

**Epochs.** The sources are streamed, so one epoch is measured once: at start-up every rank
renders, tokenizes and packs its share of every source (each conversation is counted by
exactly one rank) and the counts are summed. The counts are kept in
``RUN_DIR/dataset_tokens.json`` and reused while the sources' files, the tokenizer and the
packing stay the same, so a resumed run plans the same steps. Packing makes every rendered
token an input exactly once; ``data.packing=whole`` (the default for SFT) also pads a
sequence where the next conversation does not fit, and the count includes that padding,
packed per loader worker as the loader packs (its last sequence per source and worker
counted whole). The run is
``ceil(sft.epochs x dataset_tokens / train.global_batch_tokens)`` optimizer steps
(``train.max_steps``, when set, caps them) and the LR schedule spans them. Each source's
mixture weight is set to its share of the tokens, so that every source ends its epoch at the
same time: an epoch is every conversation once.

**Export.** When the run reaches its last step, its latest checkpoint is written to
``export_dir`` as a self-contained Ouro-format Thinking model: weights, ``config.json`` and
``generation_config.json`` with ``<|im_end|>`` as EOS and ``<|endoftext|>`` as BOS and padding
(the released Thinking configs set all three to 0), ``tokenizer.json``, and
``tokenizer_config.json`` carrying those special tokens and the ChatML ``chat_template`` the
conversations were rendered with (a plain run's export: EOS ``<|endoftext|>`` and the plain
template).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import hydra
import torch
import torch.distributed as dist
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig
from tokenizers import Tokenizer

from data_pipelines.config import DataConfig, packs_whole_documents
from data_pipelines.loader import count_source_tokens
from data_pipelines.shards import fingerprint, resolve_shards
from data_pipelines.tokenizer import (
    ENDOFTEXT,
    is_local_tokenizer,
    tokenizer_summary,
)
from looplm.files import write_atomically
from train.checkpointing import read_json
from train.config import PretrainConfig, config_problems
from train.export import (
    export_dir_problems,
    export_thinking_model,
    prepare_source,
)
from train.trainer import CONFIG_DIR, Trainer, _environment, run_job

logger = logging.getLogger("looplm.sft")

TOKEN_COUNTS = "dataset_tokens.json"
EXPORT_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class SFTSettings:
    """How long the SFT run is."""

    epochs: float = 2.0
    """Passes over every conversation (the steps follow, see the module docstring)."""
    dataset_tokens: int | None = None
    """Rendered tokens of one epoch (all sources, EOS included). None: counted at start-up.
    Given, the counting pass is skipped and every source's weight is used as configured."""


@dataclass
class SFTConfig(PretrainConfig):
    """The SFT job: the pre-training schema, a required source model, epochs and the export."""

    init_from: str = MISSING
    """The model to fine-tune: an Ouro-format directory (or hub id), a run directory (its
    latest complete checkpoint) or one checkpoint step directory."""
    sft: SFTSettings = field(default_factory=SFTSettings)
    export_dir: str | None = None
    """Where the Thinking model is written in Ouro's format when the run ends (None: only the
    run checkpoints are written)."""
    export_dtype: str | None = None
    """dtype of the exported weights: float32 (None: the float32 master weights), bfloat16 or
    float16."""


def register_configs() -> None:
    ConfigStore.instance().store(name="sft_schema", node=SFTConfig)


# ---- checks ------------------------------------------------------------------------------


def sft_problems(cfg: SFTConfig, world_size: int) -> list[str]:
    """Every problem of the config for a run on ``world_size`` ranks: the pre-training checks
    (which also resolve ``init_from``; the run's length is checked once known) and the job's
    own."""
    sized = replace(cfg.train, max_steps=1 if cfg.train.max_steps is None else cfg.train.max_steps)
    p = config_problems(replace(cfg, train=sized), world_size)
    if cfg.data.kind != "sft":
        p.append(f"data.kind must be 'sft' (conversations), got {cfg.data.kind!r}")
    if cfg.curriculum.stages:
        p.append("curriculum.stages: SFT runs one stage (its length comes from sft.epochs)")
    if cfg.sft.epochs <= 0:
        p.append(f"sft.epochs must be > 0, got {cfg.sft.epochs}")
    if cfg.sft.dataset_tokens is not None and cfg.sft.dataset_tokens < 1:
        p.append(f"sft.dataset_tokens must be >= 1, got {cfg.sft.dataset_tokens}")
    if cfg.export_dtype is not None and cfg.export_dtype not in EXPORT_DTYPES:
        p.append(f"export_dtype must be one of {EXPORT_DTYPES}, got {cfg.export_dtype!r}")
    p += export_dir_problems(cfg.init_from, cfg.run_dir, cfg.export_dir)
    p += _tokenizer_problems(cfg.data.tokenizer, Path(cfg.init_from))
    return p


def _tokenizer_problems(name: str, source: Path) -> list[str]:
    """The export's padding token must exist (the data checks cover EOS and the ChatML
    tokens), and a source model that ships a tokenizer must have been trained with the same
    vocabulary as the data's tokenizer."""
    if not is_local_tokenizer(name):
        return []  # reported by the data checks, or a hub tokenizer fetched later
    vocab = tokenizer_summary(name).vocab
    p = [] if ENDOFTEXT in vocab else [f"data.tokenizer {name!r} has no {ENDOFTEXT!r} token"]
    shipped = source / "tokenizer.json"
    if shipped.is_file() and Tokenizer.from_file(str(shipped)).get_vocab() != vocab:
        p.append(
            f"data.tokenizer {name!r} differs from the source model's tokenizer {shipped}; "
            f"set data.tokenizer={shipped}"
        )
    return p


def _ignored_model_settings(cfg: SFTConfig) -> list[str]:
    """Architecture fields of ``model`` that were set, though the architecture comes from
    ``init_from``."""
    # How the loaded model runs, not what it is: these apply to it.
    runtime = ("preset", "attn_implementation", "gradient_checkpointing", "kernels", "compile")
    return [
        f.name
        for f in dataclasses.fields(cfg.model)
        if f.name not in runtime and getattr(cfg.model, f.name) is not None
    ]


# ---- epochs ------------------------------------------------------------------------------


def _read_counts(path: Path, key: dict) -> dict[str, int] | None:
    if not path.is_file():
        return None
    saved = read_json(path)
    return saved["tokens"] if saved.get("key") == key else None


def _all_reduce(values: list[int], op=None) -> list[int]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tensor = torch.tensor(values, dtype=torch.int64, device=device)
    if dist.is_initialized():
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor.tolist()


def dataset_tokens(data: DataConfig, run_dir: Path, rank: int, world_size: int) -> dict[str, int]:
    """Tokens of one epoch per source: from ``run_dir/dataset_tokens.json`` when it describes
    these sources, else counted over all ranks (a collective: call on every rank) and saved."""
    path = run_dir / TOKEN_COUNTS
    shards = {s.name: resolve_shards(s, data.cache_dir) for s in data.sources}
    # What the counts depend on: the sources' files, the tokenizer's content, the EOS token,
    # the packing, the rendering. Not the ranks' layout, which moves whole-packing padding only slightly:
    # a run resumed on other ranks keeps its count, so its schedule stays the same.
    key = {
        "tokenizer": tokenizer_summary(data.tokenizer).sha256,
        "eos_token": data.eos_token,
        "sources": {name: fingerprint(files) for name, files in shards.items()},
    }
    if packs_whole_documents(data):
        key["whole_documents_in"] = data.seq_len
    if data.template != "chatml":  # ChatML's counts of before the setting stay valid
        key["template"] = data.template
    saved = _read_counts(path, key)
    if not _all_reduce([int(saved is None)], dist.ReduceOp.MAX)[0]:
        return saved
    names = list(shards)
    local = count_source_tokens(data, shards, rank, world_size)
    counts = dict(zip(names, _all_reduce([local[n] for n in names]), strict=True))
    if rank == 0:
        write_atomically(path, json.dumps({"key": key, "tokens": counts}, indent=2) + "\n")
    return counts


def epoch_steps(epochs: float, tokens: int, global_batch_tokens: int) -> int:
    """Optimizer steps of ``epochs`` passes over ``tokens`` tokens."""
    return max(1, math.ceil(epochs * tokens / global_batch_tokens))


def _token_share_weights(data: DataConfig, counts: dict[str, int]) -> DataConfig:
    """The data config with every source weighted by its share of the tokens."""
    total = sum(counts.values())
    configured = {s.name: s.weight for s in data.sources}
    sources = [replace(s, weight=counts[s.name] / total) for s in data.sources]
    configured_total = sum(configured.values())
    if any(
        abs(configured[s.name] / configured_total - s.weight) > 0.01 * s.weight for s in sources
    ):
        logger.warning(
            "the sources' weights %s are replaced by their token shares %s, so that every "
            "source is read once per epoch",
            configured,
            {s.name: round(s.weight, 4) for s in sources},
        )
    return replace(data, sources=sources)


# ---- the export --------------------------------------------------------------------------


# ---- the job -----------------------------------------------------------------------------


class SFTTrainer(Trainer):
    """The pre-training trainer on conversations, for a number of epochs, exporting a chat
    model at the end."""

    def __init__(self, cfg: SFTConfig):
        rank, world_size, local_rank = _environment()
        problems = sft_problems(cfg, world_size)
        if problems:
            raise ValueError("invalid SFT config:\n  - " + "\n  - ".join(problems))
        ignored = _ignored_model_settings(cfg)
        if ignored:
            logger.warning("model.%s ignored: the architecture comes from init_from", ignored)
        run_dir = Path(cfg.run_dir)
        cfg = replace(cfg, init_from=prepare_source(cfg.init_from, run_dir))
        self._init_distributed(local_rank)  # the token count is a collective
        super().__init__(self._plan_epochs(cfg, run_dir, rank, world_size))

    @staticmethod
    def _plan_epochs(cfg: SFTConfig, run_dir: Path, rank: int, world_size: int) -> SFTConfig:
        """The config with the run's steps (and the sources' weights) set from the epochs."""
        data, tokens = cfg.data, cfg.sft.dataset_tokens
        if tokens is None:
            run_dir.mkdir(parents=True, exist_ok=True)
            counts = dataset_tokens(cfg.data, run_dir, rank, world_size)
            data, tokens = _token_share_weights(cfg.data, counts), sum(counts.values())
        else:
            counts = None
        steps = epoch_steps(cfg.sft.epochs, tokens, cfg.train.global_batch_tokens)
        cap = cfg.train.max_steps
        if rank == 0:
            logger.info(
                "SFT: %d tokens per epoch%s; %g epochs of %d-token batches = %d steps%s",
                tokens,
                f" ({counts})" if counts else "",
                cfg.sft.epochs,
                cfg.train.global_batch_tokens,
                steps,
                f", capped at train.max_steps={cap}" if cap is not None and cap < steps else "",
            )
        train = replace(cfg.train, max_steps=steps if cap is None else min(cap, steps))
        return replace(cfg, data=data, train=train)

    def finish(self) -> None:
        """Plots, then, once the run has reached its last step, the Thinking-model export."""
        super().finish()
        if self.cfg.export_dir is None or not self.finished():
            return
        if self.already_finished and Path(self.cfg.export_dir, "config.json").is_file():
            return  # exported when the run completed
        if self.rank == 0:
            out = export_thinking_model(
                self.checkpoints.latest(),
                self.cfg.export_dir,
                self.cfg.data.tokenizer,
                self.cfg.export_dtype,
                self.cfg.data.template,
            )
            logger.info("wrote the chat model (%s) to %s", self.cfg.data.template, out)
        if dist.is_initialized():
            dist.barrier()


register_configs()


@hydra.main(config_path=CONFIG_DIR, config_name="sft", version_base=None)
def main(raw: DictConfig) -> None:
    run_job(SFTTrainer, raw)


if __name__ == "__main__":
    main()
