"""DeepSpeed-Ulysses sequence parallelism: 2 ranks splitting every sequence compute what one
rank computes alone."""

import pytest
import torch

from looplm import LoopLMConfig
from tests.distributed.launch import job, metrics, run
from train.export import export_checkpoint, load_checkpoint_model

# One data-parallel group: one rank alone, or two ranks sharing each sequence, read the same
# batches. fp32, so that the two differ only by the order of floating-point sums.
SAME = ["deepspeed.precision=fp32", "train.global_batch_tokens=256", "train.max_steps=3"]


@pytest.fixture(scope="module")
def alone(tmp_path_factory, cache_dir):
    """The run of one rank alone, which both variants are held to."""
    root = tmp_path_factory.mktemp("alone")
    code, out = run("train.pretrain", job(root / "run", cache_dir, *SAME), root / "log", nproc=1)
    assert code == 0, out[-3000:]
    return root / "run"


@pytest.mark.parametrize(
    "variant", [["deepspeed=zero2"], ["deepspeed=zero3", "model.gradient_checkpointing=true"]]
)
def test_sequence_parallel_equals_one_rank(tmp_path, cache_dir, alone, variant):
    split = tmp_path / "split"
    args = job(split, cache_dir, *SAME, *variant, "deepspeed.sequence_parallel_size=2")
    code, out = run("train.pretrain", args, tmp_path / "b", nproc=2)
    assert code == 0, out[-3000:]
    for one, two in zip(metrics(alone), metrics(split), strict=True):
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)
        assert two["loss_per_step"] == pytest.approx(one["loss_per_step"], rel=1e-6)
        assert two["exit_pdf_mean"] == pytest.approx(one["exit_pdf_mean"], abs=1e-6)
        assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5)
    # Three Adam steps: an update is ~1e-3 per weight; sums in another order move it ~1e-6.
    weights = [load_checkpoint_model(d).state_dict() for d in (alone, split)]
    for name, tensor in weights[0].items():
        torch.testing.assert_close(weights[1][name], tensor, rtol=1e-4, atol=1e-5)


def test_long_context_continuation_from_a_run_checkpoint(tmp_path, cache_dir):
    """The long-context twin: a short run's checkpoint goes on to 128-, then 512-token
    sequences split over 2 ranks, the RoPE base raised to 40K, then 1M; the export says so."""
    base = tmp_path / "base"
    steps = ["train.max_steps=10", "optim.lr=3e-3"]
    code, out = run("train.pretrain", job(base, cache_dir, *steps), tmp_path / "a")
    assert code == 0, out[-3000:]
    long = tmp_path / "long"
    args = [
        "experiment=tiny_long_context", f"init_from={base}", f"run_dir={long}",
        f"data.cache_dir={cache_dir}", "logging.wandb=false", "logging.plot_at_end=false",
    ]  # fmt: skip
    code, out = run("train.pretrain", args, tmp_path / "b")
    assert code == 0, out[-3000:]
    records = metrics(long)
    assert [r["stage"] for r in records] == ["long_16k"] * 8 + ["long_64k"] * 8
    assert all(r["batch_tokens"] == 1024 for r in records)
    started = load_checkpoint_model(base).state_dict()
    # The trained weights, not a fresh model's (whose loss is about ln 8192 = 9.01).
    assert records[0]["loss"] < metrics(base)[0]["loss"] - 1.0
    exported = export_checkpoint(long, tmp_path / "hf")
    config = LoopLMConfig.load(exported / "config.json")
    assert config.rope_theta == 1e6 and config.hidden_size == 64
    assert set(started) == set(load_checkpoint_model(long).state_dict())
