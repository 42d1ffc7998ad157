"""Reasoning SFT on 2 ranks: the run lowers the loss, and its exported Thinking model
reloads and chats."""

import json
import math
import random
import subprocess
import sys

import pytest
import torch

from data_pipelines.tokenizer import CHATML_TEMPLATE, load_tokenizer
from looplm import LoopLMForCausalLM
from tests.distributed.launch import REPO, environment, metrics, run
from tests.unit.test_sft_job import (
    IM_END,
    SFT_FAST,
    assistant_loss,
    compose_sft,
    conversation,
    own_data,
    render,
    save_init_model,
    write_conversations,
)
from train.export import load_checkpoint_model, prepare_source
from train.validation import read_records

# ---- the job -----------------------------------------------------------------------------


@pytest.mark.smoke
def test_sft_run_lowers_the_loss_and_exports_a_thinking_model_that_chats(tmp_path, cache_dir):
    data = write_conversations(tmp_path / "chat.jsonl", 300)
    held_out_file = write_conversations(tmp_path / "held_out.jsonl", 8, seed=1000)
    init = save_init_model(tmp_path / "init")
    run_dir, export = tmp_path / "run", tmp_path / "thinking"
    overrides = [
        *SFT_FAST,
        f"init_from={init}",
        f"run_dir={run_dir}",
        f"export_dir={export}",
        own_data(data),
        "data.seq_len=128",  # its short conversations: more, smaller steps
        "train.global_batch_tokens=512",
        f"data.cache_dir={cache_dir}",
        "eval.enabled=true",
        "eval.every_steps=20",
        f"eval.tasks=[{{name:chat,path:{held_out_file}}}]",
    ]
    code, out = run("train.sft", overrides, tmp_path / "log")
    assert code == 0, out[-3000:]
    # SFT starts the process group before the trainer does: still said once
    assert out.count("starting the process group (2 CPU ranks, gloo) ...") == 1

    # Evaluated during the run on the held-out conversations' last assistant message.
    evaluations = read_records(run_dir)
    assert evaluations[-1]["step"] == metrics(run_dir)[-1]["step"]
    assert [r["step"] for r in evaluations[:-1]] == list(range(20, evaluations[-1]["step"], 20))
    first, last = evaluations[0]["tasks"]["chat"], evaluations[-1]["tasks"]["chat"]
    assert last["n"] == 8 and len(last["accuracy_per_step"]) == 4 + 2
    assert last["loss_per_step"][-1] < first["loss_per_step"][-1]

    # An epoch is every conversation once: 2 epochs of global batches.
    records = [json.loads(line) for line in data.read_text().splitlines()]
    tokens = sum(len(render(record["messages"])) for record in records)
    counted = json.loads((run_dir / "dataset_tokens.json").read_text())["tokens"]["chat"]
    # Whole conversations: the padding is counted too.
    composed = compose_sft(*overrides)
    assert tokens < counted < tokens + len(records) * composed.data.seq_len
    steps = [r["step"] for r in metrics(run_dir)]
    batch = composed.train.global_batch_tokens
    assert steps == list(range(1, math.ceil(2 * counted / batch) + 1))
    losses = [r["loss"] for r in metrics(run_dir)]
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])

    # The export: Ouro format, the chat tokens, the tokenizer and its template.
    config = json.loads((export / "config.json").read_text())
    generation = json.loads((export / "generation_config.json").read_text())
    settings = json.loads((export / "tokenizer_config.json").read_text())
    for ids in (config, generation):
        assert (ids["eos_token_id"], ids["bos_token_id"], ids["pad_token_id"]) == (IM_END, 0, 0)
    assert settings["chat_template"] == CHATML_TEMPLATE
    assert (settings["eos_token"], settings["pad_token"]) == ("<|im_end|>", "<|endoftext|>")
    assert load_tokenizer(str(export / "tokenizer.json")).token_to_id("<|im_end|>") == IM_END
    thinking = LoopLMForCausalLM.from_pretrained(export)
    assert thinking.config.eos_token_id == IM_END
    trained = load_checkpoint_model(run_dir)
    for name, tensor in trained.state_dict().items():
        assert torch.equal(thinking.state_dict()[name], tensor), name

    # The assistant loss fell on conversations never seen.
    held_out = [conversation(random.Random(seed)) for seed in range(1000, 1008)]
    before = assistant_loss(LoopLMForCausalLM.from_pretrained(init), held_out)
    assert assistant_loss(thinking, held_out) < 0.5 * before

    # chat.py answers with Q-exit decoding and stops at <|im_end|>.
    command = [sys.executable, str(REPO / "scripts" / "chat.py"), str(export), "What is 3 + 4?"]
    options = [
        "--json",
        "--max-new-tokens",
        "48",
        "--exit-threshold",
        "0.5",
        "--kv-sharing",
        "last",
    ]
    done = subprocess.run(
        [*command, *options], capture_output=True, text=True, env=environment(), timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    answer = json.loads(done.stdout)
    assert answer["stopped"] == "eos" and answer["stop_token"] == "<|im_end|>", answer
    # A run directory is exported the same way first (its tokenizer from its config.yaml).
    command[2] = str(run_dir)
    done = subprocess.run(
        [*command, "--json", "--max-new-tokens", "48"],
        capture_output=True,
        text=True,
        env=environment(),
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["stopped"] == "eos"

    # A run checkpoint as init_from is written once as an Ouro-format source.
    source = LoopLMForCausalLM.from_pretrained(prepare_source(str(run_dir), tmp_path / "second"))
    for name, tensor in trained.state_dict().items():
        assert torch.equal(source.state_dict()[name], tensor), name
