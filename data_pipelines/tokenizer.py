"""Finding and loading the tokenizer, and Ouro's special tokens."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

from tokenizers import Tokenizer

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
"""Ouro's special tokens, in id order: 0, 1, 2."""

EMBEDDED = "embedded"
_HUB_NAME = re.compile(r"^[\w.-]+/[\w.-]+$")


def embedded_tokenizer_path() -> Path:
    """Path of the byte-level BPE tokenizer shipped with this package."""
    return Path(str(resources.files("data_pipelines") / "assets" / "tokenizer.json"))


def tokenizer_problem(name: str) -> str | None:
    """Why `name` cannot be a tokenizer (None when it can), without loading it."""
    if name == EMBEDDED:
        path = embedded_tokenizer_path()
        return None if path.is_file() else f"the embedded tokenizer is missing at {path}"
    path = Path(name).expanduser()
    if path.is_file():
        return None
    # A missing file whose directory exists, or named *.json, is a local path, not a hub name.
    local = path.suffix == ".json" or ("/" in name and path.parent.is_dir())
    if local:
        return f"no tokenizer file at {name!r}"
    if _HUB_NAME.match(name):
        return None
    return f"{name!r} is neither a tokenizer.json file, {EMBEDDED!r}, nor a hub name"


def special_token_problems(name: str, tokens: list[str]) -> list[str]:
    """What is wrong with the local tokenizer `name` (a file or `embedded`; hub names are not
    fetched here): unreadable, or lacking any of `tokens`."""
    if name != EMBEDDED and not Path(name).expanduser().is_file():
        return []
    try:
        tokenizer = load_tokenizer(name)
    except Exception as error:
        return [f"{name!r} is not a readable tokenizer.json ({error})"]
    missing = [token for token in tokens if tokenizer.token_to_id(token) is None]
    return [f"{name!r} has no token {token!r}" for token in missing]


def load_tokenizer(name: str) -> Tokenizer:
    """Load a tokenizer from a tokenizer.json path, `embedded`, or a hub name."""
    if name == EMBEDDED:
        return Tokenizer.from_file(str(embedded_tokenizer_path()))
    path = Path(name).expanduser()
    if path.is_file():
        return Tokenizer.from_file(str(path))
    return Tokenizer.from_pretrained(name)


def token_id(tokenizer: Tokenizer, token: str) -> int:
    """Id of a special token, with a clear error when the vocabulary lacks it."""
    index = tokenizer.token_to_id(token)
    if index is None:
        raise ValueError(f"the tokenizer has no token {token!r}")
    return index
