"""`model.compile=true` in the real job, under ZeRO-3 with activation checkpointing and
sequence parallelism (2 gloo ranks): eager's float32 losses, and no recompile when the
curriculum changes T, the sequence length and the RoPE base."""

import json
import random

from tests.distributed.golden import differences
from tests.distributed.launch import job, metrics, run

# T 2 -> 3, sequence length 64 -> 128, RoPE base 10K -> 40K: two steps in each stage.
STAGES = (
    "curriculum.stages=["
    "{name: a, tokens: 1024, global_batch_tokens: 512, num_recurrent_steps: 2},"
    "{name: b, tokens: 2048, seq_len: 128, global_batch_tokens: 1024, rope_theta: 40000.0,"
    " num_recurrent_steps: 3}]"
)


def short_documents(path, count: int = 2000) -> None:
    """Documents of 6-20 words: every row of 64 or more tokens then packs several of them, so
    every micro-batch takes the packed-attention graph (a row inside one long document would
    take the causal one, a second graph that depends on the data, not on the stage)."""
    rng = random.Random(0)
    words = "the loop reads its own state and writes the next step of a model".split()
    with open(path, "w") as f:
        for _ in range(count):
            f.write(json.dumps({"text": " ".join(rng.choices(words, k=rng.randint(6, 20)))}))
            f.write("\n")


def test_stages_change_steps_and_length_without_a_recompile(tmp_path, cache_dir):
    corpus = tmp_path / "short.jsonl"
    short_documents(corpus)
    source = f"data.sources=[{{name: short, paths: ['{corpus}'], format: jsonl, weight: 1.0}}]"
    overrides = [
        STAGES,
        "train.max_steps=null",
        source,
        "deepspeed=zero3",
        "deepspeed.sequence_parallel_size=2",
        "deepspeed.precision=fp32",  # auto would take bf16 on a CPU that has it
        "model.gradient_checkpointing=true",
    ]
    records = {}
    for name, compiled in [("eager", "false"), ("compiled", "true")]:
        run_dir = tmp_path / name
        args = job(run_dir, cache_dir, *overrides, f"model.compile={compiled}")
        code, out = run("train.pretrain", args, tmp_path / f"{name}.log")
        assert code == 0, out[-3000:]
        records[name] = metrics(run_dir)
    # The compiled run (the last) says why its first step is slow, and counts its graphs.
    assert "compiling the decoder layers in the first step" in out
    assert f"torch.compile: {records['compiled'][-1]['compiled_graphs']} graphs" in out
    assert [len(r["loss_per_step"]) for r in records["compiled"]] == [2, 2, 3, 3]
    graphs = [r["compiled_graphs"] for r in records["compiled"]]
    assert graphs[0] > 0
    assert graphs == [graphs[0]] * len(graphs), "a stage change recompiled the layers"
    # Inductor fuses and reorders float32 arithmetic: close to eager, not bit for bit.
    eager, compiled = (
        {"loss": [r["loss"] for r in rs], "loss_per_step": [r["loss_per_step"] for r in rs]}
        for rs in (records["eager"], records["compiled"])
    )
    assert differences(eager, compiled, exact=False, tolerance=1e-5) == []
