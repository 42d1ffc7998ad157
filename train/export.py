"""Turning a training checkpoint into an Ouro-format model directory."""

from __future__ import annotations

import contextlib
import fcntl
import io
import logging
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from data_pipelines.tokenizer import (
    ENDOFTEXT,
    IM_END,
    TEMPLATES,
    load_tokenizer,
    token_id,
    write_tokenizer_files,
)
from looplm import LoopLMConfig, LoopLMForCausalLM
from looplm.files import publishing
from train.checkpointing import DEEPSPEED_TAG, MODEL_CONFIG, CheckpointManager

logger = logging.getLogger(__name__)

SOURCE_DIR = "source_model"
"""Where a job that exports a changed copy of its source writes a run checkpoint given as
``init_from``, as an Ouro-format directory."""


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint step directory as it is, or the latest complete one of a run directory."""
    path = Path(path)
    if (path / MODEL_CONFIG).is_file():
        return path
    latest = CheckpointManager(path, keep_last=1, rank=0).latest()
    if latest is None:
        raise FileNotFoundError(f"{path} is neither a checkpoint nor a run directory with one")
    return latest


def is_run_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a looplm checkpoint or a run directory holding one (rather than an
    Ouro-format model directory)."""
    path = Path(path)
    return (path / MODEL_CONFIG).is_file() or (path / "checkpoints").is_dir()


def load_checkpoint_model(path: str | Path, attn_implementation: str = "sdpa") -> LoopLMForCausalLM:
    """The model of a checkpoint, with its float32 master weights (any ZeRO stage)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    checkpoint = resolve_checkpoint(path)
    config = LoopLMConfig.load(checkpoint / MODEL_CONFIG)
    state = _quietly(get_fp32_state_dict_from_zero_checkpoint, str(checkpoint), tag=DEEPSPEED_TAG)
    with torch.device("meta"):
        model = LoopLMForCausalLM(config, attn_implementation)
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def _quietly(function, *args, **kwargs):
    """``function``'s result, with what it prints held back: DeepSpeed's checkpoint reader
    prints five lines and a progress bar for every checkpoint it reads (every export, chat or
    evaluation of a run). They are shown when it fails."""
    held = io.StringIO()
    try:
        with contextlib.redirect_stdout(held), contextlib.redirect_stderr(held):
            return function(*args, **kwargs)
    except BaseException:
        sys.stderr.write(held.getvalue())
        raise


def load_model(
    path: str | Path, dtype: str | torch.dtype = "float32", attn_implementation: str = "sdpa"
) -> LoopLMForCausalLM:
    """The model at ``path``, whatever holds it: a looplm checkpoint or run directory (its
    float32 master weights, any ZeRO stage), else an Ouro-format directory or hub id. Cast
    to ``dtype`` ("auto": as stored)."""
    if is_run_checkpoint(path):
        model = load_checkpoint_model(path, attn_implementation)
        if dtype != "auto":
            model = model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        return model
    return LoopLMForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=attn_implementation
    )


def run_tokenizer(checkpoint: str | Path) -> str | None:
    """The ``data.tokenizer`` of the run a checkpoint (or run directory) belongs to, from the
    run's ``config.yaml``; None when there is none."""
    return _run_setting(checkpoint, "data.tokenizer")


def run_template(checkpoint: str | Path) -> str:
    """How the run a checkpoint (or run directory) belongs to rendered conversations, its
    ``data.template``; ChatML when its ``config.yaml`` is missing or names none."""
    return _run_setting(checkpoint, "data.template") or "chatml"


def _run_setting(checkpoint: str | Path, key: str):
    checkpoint = Path(checkpoint)
    for run_dir in (checkpoint, checkpoint.parent.parent):
        config = run_dir / "config.yaml"
        if config.is_file():
            return OmegaConf.select(OmegaConf.load(config), key)
    return None


def export_checkpoint(
    path: str | Path,
    out_dir: str | Path,
    dtype: str | None = None,
    tokenizer: str | None = None,
    chat: bool = False,
    template: str | None = None,
) -> Path:
    """Writes the checkpoint at ``path`` (or the latest of a run directory) as a self-contained
    Ouro-format directory; returns ``out_dir``.

    With the tokenizer (``tokenizer``, else the run's ``data.tokenizer``) go its files, with the
    chat template of the run's conversations (``template``, else the run's ``data.template``):
    the plain rendering's, or ChatML when the vocabulary has the chat tokens. ``chat``: a chat
    model, whose EOS is the token that ends its answers (ChatML's ``<|im_end|>``, the plain
    rendering's EOS: the run's ``data.eos_token``; BOS and padding ``<|endoftext|>``) in
    ``config.json``, ``generation_config.json`` and the tokenizer files.
    Written to a sibling folder first and moved into place when complete; the files are as
    readable as the umask allows.
    """
    out_dir = Path(out_dir)
    checkpoint = resolve_checkpoint(path)
    name = tokenizer or run_tokenizer(checkpoint)
    if name is None and chat:
        raise FileNotFoundError(f"no config.yaml of the run of {checkpoint}; give a tokenizer")
    template = template or run_template(checkpoint)
    eos = ENDOFTEXT
    if chat:
        eos = IM_END if template == "chatml" else _run_setting(checkpoint, "data.eos_token") or eos
    files = load_tokenizer(name) if name is not None else None
    model = load_checkpoint_model(checkpoint)
    if chat:
        ids = {token: token_id(files, token) for token in (ENDOFTEXT, eos)}
        model.config = model.model.config = model.config.replace(
            bos_token_id=ids[ENDOFTEXT], eos_token_id=ids[eos], pad_token_id=ids[ENDOFTEXT]
        )
    if files is not None and files.get_vocab_size() > model.config.vocab_size:
        raise ValueError(
            f"the tokenizer {name!r} has {files.get_vocab_size()} tokens, more than the "
            f"model's vocab_size ({model.config.vocab_size})"
        )
    with publishing(out_dir) as staging:
        model.save_pretrained(staging, dtype=dtype)
        if files is not None:
            write_tokenizer_files(
                files,
                staging,
                model.config.max_position_embeddings,
                eos,
                TEMPLATES[template] if chat or template != "chatml" else None,
            )
        else:
            logger.warning(
                "no tokenizer written: %s has no run config.yaml to name one", checkpoint
            )
    return out_dir


def export_thinking_model(
    checkpoint: str | Path,
    out_dir: str | Path,
    tokenizer: str,
    dtype: str | None = None,
    template: str | None = None,
) -> Path:
    """A run checkpoint as a chat model (see ``export_checkpoint``)."""
    return export_checkpoint(checkpoint, out_dir, dtype, tokenizer, chat=True, template=template)


def prepare_source(init_from: str, run_dir: Path) -> str:
    """The Ouro-format directory (or hub id) the job starts from and exports into: ``init_from``
    itself, or, for a looplm run or checkpoint, the float32 weights of its checkpoint written
    once into ``run_dir/source_model``, so that a resumed job and its export keep to that
    checkpoint while the source run goes on. The first rank to take the lock writes it."""
    if not is_run_checkpoint(init_from):
        return init_from
    target = run_dir / SOURCE_DIR
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / f".{SOURCE_DIR}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").is_file():
            checkpoint = resolve_checkpoint(init_from)
            export_checkpoint(checkpoint, target)
            logger.info("wrote the weights of %s as %s", checkpoint, target)
    return str(target)


def export_dir_problems(init_from: str, run_dir: str, export_dir: str | None) -> list[str]:
    """An export directory must not be the source model a job reads (``init_from``, or the copy
    ``prepare_source`` writes into the run directory)."""
    sources = {Path(init_from).resolve(), (Path(run_dir) / SOURCE_DIR).resolve()}
    if export_dir is not None and Path(export_dir).resolve() in sources:
        return [f"export_dir {export_dir} would overwrite the source model"]
    return []
