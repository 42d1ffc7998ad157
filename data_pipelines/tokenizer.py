"""Finding and loading the tokenizer, and Ouro's special tokens."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from tokenizers import Tokenizer

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '" + IM_START + "' + message['role'] + '\\n' + message['content'] + '" + IM_END + "\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + IM_START + "assistant\\n' }}{% endif %}"
)
"""ChatML as `data_pipelines.encoding` renders it for training: `<|im_start|>role\\ncontent<|im_end|>\\n`
per message; the generation prompt opens an assistant turn."""
PLAIN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if not loop.first %}{{ ' ' }}{% endif %}{{ message['content'] }}"
    "{% endfor %}"
)
"""The plain rendering (`data.template=plain`): the messages' contents, one space apart; the
assistant's answer follows the prompt as a completion does, and ends with EOS (`data.eos_token`)."""
TEMPLATES = {"chatml": CHATML_TEMPLATE, "plain": PLAIN_TEMPLATE}
"""`data.template`'s renderings of a conversation, as chat templates."""
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


def is_local_tokenizer(name: str) -> bool:
    """Whether `name` is a tokenizer on this machine (a file, or `embedded`), which can be
    read without the network."""
    return tokenizer_problem(name) is None and (
        name == EMBEDDED or Path(name).expanduser().is_file()
    )


@dataclass(frozen=True)
class TokenizerSummary:
    """What the checks need to know of a tokenizer, read once per process."""

    sha256: str
    """Of its canonical JSON (`Tokenizer.to_str()`): the same tokenizer under another name
    or path matches, a different one does not."""
    vocab_size: int
    vocab: dict[str, int]
    """Token to id, added tokens included."""


@lru_cache(maxsize=8)
def tokenizer_summary(name: str) -> TokenizerSummary:
    """The summary of the tokenizer `name` (loaded once per process and name)."""
    tokenizer = load_tokenizer(name)
    return TokenizerSummary(
        hashlib.sha256(tokenizer.to_str().encode()).hexdigest(),
        tokenizer.get_vocab_size(),
        tokenizer.get_vocab(with_added_tokens=True),
    )


def special_token_problems(name: str, tokens: list[str]) -> list[str]:
    """What is wrong with the local tokenizer `name` (hub names are not fetched here):
    unreadable, or lacking any of `tokens`."""
    if not is_local_tokenizer(name):
        return []
    try:
        vocab = tokenizer_summary(name).vocab
    except Exception as error:
        return [f"{name!r} is not a readable tokenizer.json ({error})"]
    return [f"{name!r} has no token {token!r}" for token in tokens if token not in vocab]


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


def word_level_tokenizer(texts) -> Tokenizer:
    """A tokenizer of one token per space-separated word and one per newline, over the words of
    ``texts``, with Ouro's special tokens first (ids 0, 1, 2). For synthetic tasks whose symbols
    are words (numbers, operators, letters): every symbol is exactly one token, so a prompt and
    its answer tokenize the same apart as together."""
    from tokenizers import Regex, decoders, models, pre_tokenizers

    words = sorted({word for text in texts for line in text.split("\n") for word in line.split()})
    vocabulary = {token: i for i, token in enumerate([*SPECIAL_TOKENS, "\n", *words])}
    tokenizer = Tokenizer(models.WordLevel(vocabulary, unk_token=ENDOFTEXT))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r"\n"), "isolated"), pre_tokenizers.Split(" ", "removed")]
    )
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins with spaces
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


def write_tokenizer_files(
    tokenizer: Tokenizer,
    directory: Path,
    model_max_length: int,
    eos_token: str = IM_END,
    chat_template: str | None = None,
) -> None:
    """`tokenizer.json`, and `tokenizer_config.json` / `special_tokens_map.json` as Hugging Face
    tokenizers read them: BOS and padding `<|endoftext|>`, EOS `eos_token` (`<|im_end|>` for a
    ChatML chat model, `<|endoftext|>` for a base model), and `chat_template` (None: ChatML
    when the vocabulary holds its tokens)."""
    directory = Path(directory)
    tokenizer.save(str(directory / "tokenizer.json"))
    special = {"bos_token": ENDOFTEXT, "eos_token": eos_token, "pad_token": ENDOFTEXT}
    chat = all(tokenizer.token_to_id(token) is not None for token in (IM_START, IM_END))
    if chat_template is None and chat:
        chat_template = CHATML_TEMPLATE
    extra = [IM_START, IM_END] if chat else []
    added = {
        str(index): {
            "content": token.content,
            "lstrip": token.lstrip,
            "normalized": token.normalized,
            "rstrip": token.rstrip,
            "single_word": token.single_word,
            "special": token.special,
        }
        for index, token in sorted(tokenizer.get_added_tokens_decoder().items())
    }
    config = {
        **special,
        "added_tokens_decoder": added,
        "additional_special_tokens": extra,
        **({"chat_template": chat_template} if chat_template is not None else {}),
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special_map = {**special, "additional_special_tokens": extra}
    (directory / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
