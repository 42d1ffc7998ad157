"""Reasoning SFT in one process: its configs and checks, the epoch count, the loss over
assistant tokens only (against an independent rendering of the exported chat template). The
2-rank run and its export are in tests/distributed/test_sft.py, which uses the helpers here."""

import json
import math
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from jinja2.sandbox import ImmutableSandboxedEnvironment
from omegaconf import OmegaConf

from data_pipelines import build_data_loader
from data_pipelines.loader import count_source_tokens
from data_pipelines.packing import IGNORE_INDEX
from data_pipelines.shards import resolve_shards
from data_pipelines.tokenizer import CHATML_TEMPLATE, load_tokenizer
from looplm import LoopLMConfig, LoopLMForCausalLM, Objective
from train.sft import SFTConfig, dataset_tokens, epoch_steps, sft_problems
from train.trainer import CONFIG_DIR

ENDOFTEXT, IM_START, IM_END = 0, 1, 2  # the embedded tokenizer's ids
BETA = 0.05

SFT_FAST = [
    "experiment=tiny_thinking_sft",
    "train.deterministic=true",
    "train.log_every=1",
    "logging.wandb=false",
    "logging.plot_at_end=false",
]


def own_data(path: Path) -> str:
    """The override that trains the tiny twin on a conversation file instead of its own."""
    return f"data.sources=[{{name:chat,paths:[{path}]}}]"


def conversation(rng: random.Random, system: bool = False) -> list[dict]:
    a, b = rng.randrange(10), rng.randrange(10)
    messages = [{"role": "system", "content": "Answer briefly."}] if system else []
    return messages + [
        {"role": "user", "content": f"What is {a} + {b}?"},
        {
            "role": "assistant",
            "content": f"<think>Add the two numbers.</think>The answer is {a + b}.",
        },
    ]


def write_conversations(path: Path, count: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    records = [{"messages": conversation(rng, system=i % 4 == 0)} for i in range(count)]
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def save_init_model(path: Path) -> Path:
    """A random tiny model in Ouro's format (its config has the released all-zero ids)."""
    torch.manual_seed(0)
    LoopLMForCausalLM(LoopLMConfig.from_preset("tiny")).save_pretrained(path)
    return path


def compose_sft(*overrides: str) -> SFTConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return OmegaConf.to_object(compose("sft", overrides=list(overrides)))


# ---- an independent rendering: the exported Jinja template, tokenized as one string ------


def render(messages: list[dict]) -> list[int]:
    """The conversation as the chat template writes it, tokenized whole, then EOS."""
    text = ImmutableSandboxedEnvironment().from_string(CHATML_TEMPLATE).render(messages=messages)
    ids = load_tokenizer("embedded").encode(text, add_special_tokens=False).ids
    return ids + [ENDOFTEXT]


def assistant_targets(ids: list[int]) -> list[bool]:
    """Whether each token is assistant content or an assistant's closing <|im_end|>, read
    from the token stream: <|im_start|>, a header up to its newline, content, <|im_end|>."""
    tokenizer = load_tokenizer("embedded")
    targets = [False] * len(ids)
    i = 0
    while i < len(ids):
        if ids[i] != IM_START:
            i += 1
            continue
        header_end = next(
            j for j in range(i + 1, len(ids)) if tokenizer.decode(ids[i + 1 : j + 1]).endswith("\n")
        )
        role = tokenizer.decode(ids[i + 1 : header_end]).strip()
        end = ids.index(IM_END, header_end)
        for j in range(header_end + 1, end + 1):
            targets[j] = role == "assistant"
        i = end + 1
    return targets


def expected_labels(ids: list[int]) -> list[int]:
    targets = assistant_targets(ids)
    return [ids[i + 1] if targets[i + 1] else IGNORE_INDEX for i in range(len(ids) - 1)] + [
        IGNORE_INDEX
    ]


def assistant_loss(model, conversations: list[list[dict]]) -> float:
    """Mean last-step cross-entropy of the assistant tokens, one conversation per row."""
    losses = []
    with torch.no_grad():
        for messages in conversations:
            ids = render(messages)
            labels = torch.tensor([expected_labels(ids)])
            out = model(torch.tensor([ids]), labels=labels, objective=Objective(beta=0.0))
            losses.append(out.loss_per_step[-1].item())
    return sum(losses) / len(losses)


# ---- configs -----------------------------------------------------------------------------


def ouro_config_dir(path: Path, **changes) -> Path:
    """An Ouro-1.4B config.json (no weights: the checks read only the config)."""
    path.mkdir(parents=True)
    LoopLMConfig.from_preset("ouro-1.4b", **changes).save(path / "config.json")
    return path


@pytest.mark.parametrize("seq_len", [32768, 65536])
def test_long_sequences_validate_where_the_model_allows(tmp_path, seq_len):
    data = write_conversations(tmp_path / "chat.jsonl", 4)
    overrides = [f"run_dir={tmp_path / 'run'}", f"data.sources.0.paths=[{data}]"]
    overrides.append(f"data.seq_len={seq_len}")
    cfg = compose_sft(f"init_from={ouro_config_dir(tmp_path / 'ouro')}", *overrides)
    assert cfg.optim.lr == 2e-5 and cfg.optim.betas == [0.9, 0.95] and cfg.sft.epochs == 2.0
    assert cfg.schedule.kind == "cosine" and cfg.model.gradient_checkpointing
    ranks = cfg.train.global_batch_tokens // seq_len  # one sequence per rank and step
    assert sft_problems(cfg, world_size=ranks) == []
    short = ouro_config_dir(tmp_path / "short", max_position_embeddings=32768)
    problems = sft_problems(replace(cfg, init_from=str(short)), world_size=ranks)
    assert (seq_len > 32768) == any("max_position_embeddings (32768)" in p for p in problems)


def test_experiments_compose_and_bad_settings_are_reported(tmp_path):
    data = write_conversations(tmp_path / "chat.jsonl", 4)
    model = ouro_config_dir(tmp_path / "ouro")
    full = compose_sft("experiment=thinking_sft", f"init_from={model}", "run_dir=r")
    assert [s.name for s in full.data.sources] == ["math", "code", "science", "chat"]
    assert full.data.seq_len == 32768 and full.train.global_batch_tokens == 4194304
    tiny = compose_sft(*SFT_FAST, f"init_from={model}", "run_dir=r", own_data(data), "eval=none")
    assert tiny.data.kind == "sft" and tiny.train.global_batch_tokens == 1024
    bad = replace(
        tiny,
        init_from=str(tmp_path / "nothing"),
        data=replace(tiny.data, kind="pretrain"),
        sft=replace(tiny.sft, epochs=0.0),
        export_dtype="int8",
    )
    problems = "\n".join(sft_problems(bad, world_size=2))
    for expected in ("init_from", "data.kind must be 'sft'", "sft.epochs", "export_dtype"):
        assert expected in problems


def test_an_epoch_is_counted_once_over_the_ranks_and_kept_for_resume(tmp_path):
    data = write_conversations(tmp_path / "chat.jsonl", 30)
    cfg = compose_sft(*SFT_FAST, f"init_from={tmp_path}", "run_dir=r", own_data(data))
    records = [json.loads(line) for line in data.read_text().splitlines()]
    lengths = [len(render(record["messages"])) for record in records]
    tokens = sum(lengths)
    shards = {"chat": resolve_shards(cfg.data.sources[0], cfg.data.cache_dir)}
    split = replace(cfg.data, packing="split")
    shares = [count_source_tokens(split, shards, rank, 3)["chat"] for rank in range(3)]
    assert sum(shares) == tokens and min(shares) > 0
    # Whole-conversation packing (SFT's default) counts the padding too: the sequences a
    # conversation that does not fit leaves for the next one, in file order here.
    in_order = replace(cfg.data, shuffle=False, num_workers=0)
    seq_len = cfg.data.seq_len
    assert count_source_tokens(in_order, shards, 0, 1)["chat"] == whole_packed(lengths, seq_len)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    whole = dataset_tokens(cfg.data, run_dir, 0, 1)["chat"]
    assert whole % seq_len == 0 and tokens < whole < tokens + len(records) * seq_len
    saved = json.loads((run_dir / "dataset_tokens.json").read_text())
    saved["tokens"] = {"chat": 7}
    (run_dir / "dataset_tokens.json").write_text(json.dumps(saved))
    assert dataset_tokens(cfg.data, run_dir, 0, 1) == {"chat": 7}  # a resumed run reads it
    assert dataset_tokens(split, run_dir, 0, 1) == {"chat": tokens}  # other packing: recounted
    write_conversations(data, 31)
    assert dataset_tokens(split, run_dir, 0, 1)["chat"] > tokens  # other files: recounted
    assert epoch_steps(2.0, tokens, 512) == math.ceil(2 * tokens / 512)


def whole_packed(lengths: list[int], seq_len: int) -> int:
    """Tokens of the rows that documents of `lengths` fill when none is split (all fit)."""
    rows, room = 0, 0
    for length in lengths:
        assert length <= seq_len
        if length > room:
            rows, room = rows + 1, seq_len
        room -= length
    return rows * seq_len


# ---- the loss ----------------------------------------------------------------------------


def test_the_loss_counts_only_assistant_tokens(tmp_path):
    rng = random.Random(1)
    multi_turn = (
        conversation(rng, system=True)
        + conversation(rng)[:1]
        + [{"role": "assistant", "content": "<think>\nAgain.\n</think>\n\n7"}]
    )
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": multi_turn}) + "\n")
    ids = render(multi_turn)
    cfg = compose_sft(
        *SFT_FAST,
        f"init_from={tmp_path}",
        "run_dir=r",
        own_data(data),
        f"data.seq_len={len(ids)}",
        "data.shuffle=false",
        "data.num_workers=0",
    )
    loader = iter(build_data_loader(cfg.data, rank=0, world_size=1, micro_batch_size=1))
    batch = next(loader)
    assert batch["input_ids"][0].tolist() == ids
    labels = expected_labels(ids)
    assert batch["labels"][0].tolist() == labels
    learned = [label for label in labels if label != IGNORE_INDEX]
    assert load_tokenizer("embedded").decode(learned, skip_special_tokens=False).count(
        "<|im_end|>"
    ) == sum(message["role"] == "assistant" for message in multi_turn)

    # The model's loss is Stage I over exactly those tokens (float64 reference).
    config = LoopLMConfig.from_preset("tiny", hidden_size=64, intermediate_size=128)
    torch.manual_seed(0)
    model = LoopLMForCausalLM(config).double()
    out = model(
        batch["input_ids"],
        position_ids=batch["position_ids"],
        labels=batch["labels"],
        objective=Objective(beta=BETA),
    )
    full = model(batch["input_ids"], position_ids=batch["position_ids"], return_all_steps=True)
    rows = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    targets = torch.tensor([labels[i] for i in rows])
    log_probs = full.step_logits[:, 0, rows].log_softmax(-1)  # [T, N, V]
    ce = -log_probs.gather(-1, targets[None, :, None].expand(len(log_probs), -1, 1))[..., 0]
    p = full.exit_pdf[0, rows].T  # [T, N]
    entropy = -(p * p.log()).sum(0)
    expected = ((p * ce).sum(0) - BETA * entropy).mean()
    assert out.num_tokens == len(rows)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-9)
