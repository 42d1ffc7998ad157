"""The reproduction driver end to end at a toy size: real pre-training jobs on 2 gloo ranks,
their evaluations, the exports and the report, and a second invocation, on the directory
moved, that trains nothing."""

import json
import subprocess
import sys

import pytest
import torch

from data_pipelines.tokenizer import load_tokenizer
from looplm import LoopLMForCausalLM
from tests.distributed.launch import REPO, environment

TOY = [
    "--quick", "--task", "phop", "--families", "looped", "iso_param", "--seeds", "0", "--steps", "4",
    "--set", "hidden_size=32", "--set", "heads=2", "--set", "batch_tokens=512",
    "--set", "seq_len=64", "--set", "eval_items=12", "--set", "warmup=1",
    "--set", "compile=false",  # the quick grid's compiled layers: tests/distributed/test_compile.py
    "--source", "phop=synthetic://phop?hops=2&length=8&symbols=3&num_docs=400&shards=2",
]  # fmt: skip


def reproduce(out, cwd=REPO) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "scripts" / "reproduce.py"), "--out", str(out), *TOY]
    return subprocess.run(
        command, cwd=cwd, env=environment(), capture_output=True, text=True, timeout=600
    )


def greedy_accuracy_per_step(model, tokenizer, items) -> list[float]:
    """Exact match of each held-out answer by exiting at each step, one item at a time."""
    hits = [0] * model.config.total_ut_steps
    for _key, prompt, answers in items:
        prompt_ids = tokenizer.encode(prompt).ids
        answer_ids = tokenizer.encode(answers[0]).ids
        ids = torch.tensor([prompt_ids + answer_ids])
        with torch.no_grad():
            logits = model(ids, return_all_steps=True).step_logits[:, 0]
        predicted = logits[:, len(prompt_ids) - 1 : -1].argmax(-1)
        for step in range(len(hits)):
            hits[step] += predicted[step].tolist() == answer_ids
    return [h / len(items) for h in hits]


def answer_exit_pdf(model, tokenizer, items) -> list[float]:
    """The mean exit distribution at the position predicting each answer's first token, in
    float64."""
    model = model.double()
    total = torch.zeros(model.config.total_ut_steps, dtype=torch.float64)
    for _key, prompt, _answers in items:
        ids = torch.tensor([tokenizer.encode(prompt).ids])
        with torch.no_grad():
            total += model(ids, return_all_steps=True).exit_pdf[0, -1]
    return (total / len(items)).tolist()


def test_a_toy_reproduction_trains_evaluates_exports_and_reports(tmp_path):
    out = tmp_path / "repro"
    first = reproduce(out)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert [(r["family"], r["layers"], r["loops"]) for r in results] == [
        ("looped", 1, 3),
        ("iso_param", 1, 1),
    ]
    looped, plain = results
    assert looped["params"] == plain["params"]
    assert looped["train_flops"] > 2.5 * plain["train_flops"]
    assert "[2/2] phop-iso_param-1x1-seed0: accuracy by step" in first.stdout
    # A job is never silent: every tenth of its steps (here each of 4) and every evaluation.
    progress = [
        line for line in first.stdout.splitlines() if "] phop-looped-1x3-seed0: step" in line
    ]
    assert [line.split(": step ")[1].split(",")[0] for line in progress if "loss" in line] == [
        "1/4", "2/4", "3/4", "4/4"
    ]  # fmt: skip
    evaluated = [line for line in progress if "held-out accuracy by step" in line]
    assert [line.split(": step ")[1].split(",")[0] for line in evaluated] == [
        "1/4", "2/4", "3/4", "4/4"
    ]  # fmt: skip
    for record in results:
        assert len(record["accuracy_per_step"]) == record["loops"] and record["n"] == 12
        assert record["accuracy"] == record["accuracy_per_step"][-1]
        # The job's own last evaluation, and an independent greedy recomputation on the export.
        evaluation = json.loads(
            (out / "runs" / record["name"] / "eval.jsonl").read_text().split("\n")[-2]
        )
        assert evaluation["step"] == 4
        export = out / "models" / record["name"]
        model = LoopLMForCausalLM.from_pretrained(export).eval()
        tokenizer = load_tokenizer(str(export / "tokenizer.json"))
        (held_out,) = (out / "cache" / "synthetic" / "held-out").glob("phop-*.json")
        items = json.loads(held_out.read_text())
        assert len(items) == 12
        expected = greedy_accuracy_per_step(model, tokenizer, items)
        assert record["accuracy_per_step"] == pytest.approx(expected)
        if record["loops"] == 1:
            assert record["answer_exit_pdf"] is None
        else:
            exits = answer_exit_pdf(model, tokenizer, items)
            assert record["answer_exit_pdf"] == pytest.approx(exits, abs=1e-5)
    table = (out / "results.md").read_text()
    assert "| phop | looped | 1 x 3 |" in table and "looped - iso_param" in table
    assert (out / "results.png").stat().st_size > 10_000

    # Move the directory and run again from elsewhere, naming it relatively: every model
    # finished with these settings, so nothing trains, and the report is the same.
    moved = tmp_path / "moved"
    out.rename(moved)
    stamps = {p: p.stat().st_mtime for p in (moved / "runs").glob("*/finished.json")}
    second = reproduce("moved", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert {p: p.stat().st_mtime for p in stamps} == stamps and not out.exists()
    assert "[1/2] phop-looped-1x3-seed0: trained before with these settings" in second.stdout
    assert "] phop-looped-1x3-seed0: training" in first.stdout
    assert "] phop-looped-1x3-seed0: training" not in second.stdout
    assert json.loads((moved / "results.json").read_text()) == results
