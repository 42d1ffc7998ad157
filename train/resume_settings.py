"""What a resumed job does with settings that differ from the run's: apply them or refuse.

A job that resumes a run (its `run_dir` holds a complete checkpoint) compares its composed
config with the run's `config.yaml`, which the previous job wrote, before it builds anything.
A setting the checkpoint fixes (the model's shapes, the ZeRO layout, the precision, the RNG
seed, where the data positions point) is refused by name; every other changed setting
applies from the resume point and is logged, one line each. No setting changes silently.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

logger = logging.getLogger(__name__)

_ARCHITECTURE = "the checkpoint holds a model of the saved shape"
_LAYOUT = "the checkpoint's optimizer state is laid out for the saved setting"
_POSITIONS = (
    "the saved data positions point into documents read and tokenized this way "
    "(data.allow_source_change=true resumes anyway, restarting the current windows)"
)

REFUSED: dict[str, str] = {
    "seed": "the RNG state is restored from the checkpoint",
    "init_from": "a resumed run continues from its own checkpoint, not from init_from",
    "model.preset": _ARCHITECTURE,
    "model.vocab_size": _ARCHITECTURE,
    "model.hidden_size": _ARCHITECTURE,
    "model.intermediate_size": _ARCHITECTURE,
    "model.num_hidden_layers": _ARCHITECTURE,
    "model.num_attention_heads": _ARCHITECTURE,
    "model.num_key_value_heads": _ARCHITECTURE,
    "model.head_dim": _ARCHITECTURE,
    "model.tie_word_embeddings": _ARCHITECTURE,
    "model.max_position_embeddings": "the checkpoint's model config is resumed as saved",
    "deepspeed.zero_stage": _LAYOUT,
    "deepspeed.precision": _LAYOUT,
    "deepspeed.offload_optimizer": _LAYOUT,
    "deepspeed.offload_param": _LAYOUT,
    "deepspeed.sequence_parallel_size": "the saved data positions are per data-parallel rank",
    "data.num_workers": "the saved data positions are per loader worker",
}
"""Settings a resume refuses to change, with the reason given."""

DATA_POSITIONS = (
    "data.seed",
    "data.shuffle",
    "data.shuffle_window",
    "data.window_tokens",
    "data.max_document_chars",
    "data.tokenizer",
    "data.eos_token",
    "data.kind",
    "data.template",
)
"""Data settings that fix where the saved positions point; changing a source in any way but
its weight is one too. Refused unless `data.allow_source_change`."""

CURRICULUM_MANAGED = ("model.total_ut_steps", "model.rope_theta")
"""Model settings a curriculum changes between stages; without one, the checkpoint's."""


class ResumeSettingsError(ValueError):
    """A resumed job changes settings its checkpoint fixes."""


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Leaves of a nested dict/list config as dotted keys (list items by index)."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list):
        items = enumerate(tree)
    else:
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in items:
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    if not flat and prefix:
        flat[prefix] = tree
    return flat


ADDED_SETTINGS = {"data.template": "chatml"}
"""Settings added after runs were saved, with the value those runs had: a saved config that
lacks one had it."""


def changed_settings(saved: dict, current: dict) -> dict[str, tuple[Any, Any]]:
    """Every dotted key whose value differs, with (saved, current); a key on one side only
    has the missing side as `<absent>` (an `ADDED_SETTINGS` key missing from the saved side
    has its value there)."""
    before, after = flatten(saved), flatten(current)
    for key, value in ADDED_SETTINGS.items():
        if key in after:
            before.setdefault(key, value)
    absent = "<absent>"
    return {
        key: (before.get(key, absent), after.get(key, absent))
        for key in sorted(set(before) | set(after))
        if before.get(key, absent) != after.get(key, absent)
    }


def refusal(key: str, current: dict) -> str | None:
    """Why a change of `key` cannot apply at resume (None: it applies)."""
    if key in REFUSED:
        return REFUSED[key]
    if key in CURRICULUM_MANAGED and not _has_curriculum(current):
        return "without a curriculum the checkpoint's model config is resumed as saved"
    allowed = bool(current.get("data", {}).get("allow_source_change"))
    if key in DATA_POSITIONS and not allowed:
        return _POSITIONS
    if key.startswith("data.sources.") and not key.endswith(".weight") and not allowed:
        return _POSITIONS
    return None


def _has_curriculum(current: dict) -> bool:
    return bool((current.get("curriculum") or {}).get("stages"))


def check_resume_settings(
    run_dir: Path, current: dict, step: int | None, log: bool = True
) -> list[str]:
    """Compares `current` (the composed config, as plain containers) with the run's
    `config.yaml`: raises ResumeSettingsError naming every refused change; returns one line
    per change that applies, which is also logged (with `log`). A moved run directory (a
    changed `run_dir`) is said once, not as a setting. Nothing to compare (no checkpoint or no
    saved config) returns []."""
    saved_path = Path(run_dir) / "config.yaml"
    if step is None or not saved_path.is_file():
        return []
    try:
        saved = OmegaConf.to_container(OmegaConf.load(saved_path), resolve=True)
    except Exception as error:
        raise ResumeSettingsError(f"{saved_path} cannot be read: {error}") from error
    changes = changed_settings(saved, current)
    moved = changes.pop("run_dir", None)  # where the run is, not how it trains
    if moved and log:
        logger.info("the run directory moved: saved in %s, resumed in %s", *moved)
    refused = [
        f"{key}: saved {old!r}, now {new!r} ({reason})"
        for key, (old, new) in changes.items()
        if (reason := refusal(key, current))
    ]
    if refused:
        raise ResumeSettingsError(
            f"resuming {run_dir} at step {step} would change settings its checkpoint fixes:\n  "
            + "\n  ".join(refused)
            + "\nput them back, or start a new run_dir (init_from= a checkpoint or export "
            "carries the weights over)"
        )
    applied = [f"{key}: {old!r} -> {new!r}" for key, (old, new) in changes.items()]
    for line in applied if log else []:
        logger.warning("setting changed at resume, applies from step %d: %s", step, line)
    return applied
