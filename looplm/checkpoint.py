"""Reading and writing Ouro-format model directories.

A directory holds ``config.json`` (``model_type: "ouro"``), ``generation_config.json`` and
the weights as ``model.safetensors`` or as shards listed in ``model.safetensors.index.json``.
Loading is strict: a missing, unexpected or mis-shaped tensor is an error naming it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from looplm.config import LoopLMConfig
from looplm.files import publishing

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
OURO_CODE_REPO = "ByteDance/Ouro-1.4B"
"""The hub repository whose remote code (``trust_remote_code``) loads an Ouro directory."""
AUTO_CLASSES = {
    "AutoConfig": "configuration_ouro.OuroConfig",
    "AutoModel": "modeling_ouro.OuroModel",
    "AutoModelForCausalLM": "modeling_ouro.OuroForCausalLM",
}
"""The released ``auto_map``, whose modules sit next to the weights in the released repos."""
_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as '5GB' or '500MiB'."""
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    for unit in sorted(_UNITS, key=len, reverse=True):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * _UNITS[unit])
    return int(text)


def resolve_dtype(dtype, config: LoopLMConfig | None = None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if dtype == "auto":
        return _DTYPES.get(config.torch_dtype, torch.float32) if config else torch.float32
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(_DTYPES)} or 'auto'")
        return _DTYPES[dtype]
    return dtype


def _dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in _DTYPES.items()}[dtype]


# ---- writing -----------------------------------------------------------------------------


def _shard(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards, current, size = [], {}, 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += nbytes
    shards.append(current)
    return shards


def export_state_dict(model, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's tensors under Ouro's names (a tied head is stored once), contiguous, on CPU."""
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        tensor = tensor.detach().to("cpu", dtype=dtype or tensor.dtype).contiguous()
        state[name] = tensor
    return state


def save_pretrained(model, path, max_shard_size: int | str = "5GB", dtype=None) -> None:
    """Writes an Ouro-format directory. The files are written to a sibling folder and moved into
    place only when complete, so an interrupted save never leaves a half-written model."""
    path = Path(path)
    dtype = resolve_dtype(dtype) if dtype is not None else None
    state = export_state_dict(model, dtype)
    stored_dtype = next(iter(state.values())).dtype
    with publishing(path) as partial:
        shards = _shard(state, parse_size(max_shard_size))
        if len(shards) == 1:
            save_file(shards[0], partial / WEIGHTS_NAME, metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, start=1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, partial / name, metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, name))
            total = sum(t.numel() * t.element_size() for t in state.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (partial / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        config = model.config.replace(torch_dtype=_dtype_name(stored_dtype))
        config.extra = {**config.extra, "auto_map": auto_map(partial)}
        if "dtype" in config.extra:  # the newer name of torch_dtype: both say the same
            config.extra["dtype"] = config.torch_dtype
        config.save(partial / "config.json")
        _write_generation_config(config, partial)


def auto_map(directory: Path) -> dict[str, str]:
    """``auto_map`` for a directory: the released modules when they are in it, else the same
    modules in the released repository (``repo--module.Class``), so that
    ``trust_remote_code=True`` loads any export."""
    local = all((directory / f"{v.split('.')[0]}.py").is_file() for v in AUTO_CLASSES.values())
    return {k: v if local else f"{OURO_CODE_REPO}--{v}" for k, v in AUTO_CLASSES.items()}


def _write_generation_config(config: LoopLMConfig, directory: Path) -> None:
    generation = {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
    }
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


# ---- reading -----------------------------------------------------------------------------


def resolve_model_dir(path_or_id: str | os.PathLike) -> Path:
    """A local directory as it is; otherwise a hub repo id ('org/name'), fetched (config and
    safetensors only) into the local hub cache."""
    path = Path(path_or_id)
    if path.is_dir():
        return path
    text = str(path_or_id)
    if path.exists() or text.count("/") != 1 or text.startswith((".", "/")):
        raise FileNotFoundError(f"no model directory at {text}")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as e:  # offline, unknown repo, no access
        raise FileNotFoundError(
            f"{text} is neither a local directory nor a reachable hub model id ({type(e).__name__}: {e})"
        ) from e


def _weight_files(directory: Path) -> dict[str, Path]:
    """Which file holds each tensor."""
    index = directory / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{index} is not a safetensors index: {e!r}") from e
        files = {name: directory / file for name, file in weight_map.items()}
        missing = sorted({str(f) for f in files.values() if not f.is_file()})
        if missing:
            raise FileNotFoundError(f"{index} names shard files that are missing: {missing}")
        return files
    single = directory / WEIGHTS_NAME
    if not single.is_file():
        raise FileNotFoundError(f"{directory} holds neither {WEIGHTS_NAME} nor {INDEX_NAME}")
    with _open(single) as f:
        return dict.fromkeys(f.keys(), single)


def _open(path: Path):
    """A safetensors file, opened; a damaged one (truncated, not safetensors) is named."""
    try:
        return safe_open(path, framework="pt")
    except Exception as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e})") from e


def check_tensor_names(
    expected: dict[str, torch.Size], found: dict[str, torch.Size], where: str
) -> None:
    """Raises one error listing every missing, unexpected and mis-shaped tensor."""
    problems = [
        f"missing tensor {n} {tuple(expected[n])}" for n in sorted(expected.keys() - found.keys())
    ]
    problems += [
        f"unexpected tensor {n} {tuple(found[n])}" for n in sorted(found.keys() - expected.keys())
    ]
    problems += [
        f"tensor {n} has shape {tuple(found[n])}, the config needs {tuple(expected[n])}"
        for n in sorted(expected.keys() & found.keys())
        if tuple(found[n]) != tuple(expected[n])
    ]
    if problems:
        raise ValueError(f"{where} does not match its config:\n  - " + "\n  - ".join(problems))


def load_state_dict(directory: Path, expected: dict[str, torch.Size], dtype: torch.dtype):
    files = _weight_files(directory)
    handles = {f: _open(f) for f in set(files.values())}
    found = {name: torch.Size(handles[f].get_slice(name).get_shape()) for name, f in files.items()}
    check_tensor_names(expected, found, str(directory))
    state = {}
    for name, f in files.items():
        try:
            state[name] = handles[f].get_tensor(name).to(dtype)
        except Exception as e:
            raise ValueError(f"{f}: tensor {name} cannot be read ({e})") from e
    return state


def load_pretrained(cls, path, dtype=None, attn_implementation: str = "sdpa", device=None):
    directory = resolve_model_dir(path)
    config = LoopLMConfig.load(directory)
    dtype = resolve_dtype(dtype, config)
    with torch.device("meta"):
        model = cls(config, attn_implementation=attn_implementation)
    expected = {n: t.shape for n, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    state = load_state_dict(directory, expected, dtype)
    model.load_state_dict(state, strict=not config.tie_word_embeddings, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.to(device) if device is not None else model
