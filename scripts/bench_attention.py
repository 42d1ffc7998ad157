"""Benchmark SDPA attention on a CPU in bf16: as PyTorch runs it, against looplm's dispatch,
which computes attention over at most ``CPU_FLOAT32_SDPA_MAX_KEYS`` keys in float32.

Two reports, forward + backward, one thread by default, both paths in the same process:

1. Attention alone, over packed rows (documents of a given length, the block-diagonal causal
   mask of ``data.packing``) and plain causal rows, at 64 to 2,048 keys: milliseconds a call
   for bf16 SDPA and for the dispatch, their ratio, and the largest difference of the
   outputs (the float32 path is the more exact one; both are compared with a float64 one).
2. A Stage I training step of the reproduction grid's looped model (one layer of 128 looped
   3 times, bf16, 8 rows of 128 tokens packed with 8-token documents): the dispatch turned off
   (the threshold set to 0) against on.

Usage (from the repository root):
    python scripts/bench_attention.py [--threads 1] [--repeats 10]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from looplm import LoopLMConfig, LoopLMForCausalLM, attention  # noqa: E402
from looplm.attention import AttentionLayout, attend  # noqa: E402
from looplm.losses import Objective  # noqa: E402

SHAPES = [  # keys, rows, document length (None: one causal row, no packing)
    (64, 16, 8),
    (128, 8, 8),
    (128, 8, 17),
    (256, 4, 64),
    (512, 2, 100),
    (1024, 1, 300),
    (2048, 1, 700),
    (128, 8, None),
    (512, 2, None),
]


def timed(fn, repeats: int) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` calls, after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def layout_of(keys: int, rows: int, doc: int | None) -> AttentionLayout:
    if doc is None:
        return AttentionLayout.build(torch.zeros(rows, keys, dtype=torch.long), 0, False, "sdpa")
    positions = (torch.arange(keys) % doc)[None].expand(rows, -1).contiguous()
    return AttentionLayout.build(positions, 0, True, "sdpa")


def bf16_sdpa(q, k, v, layout):
    """PyTorch's SDPA in the inputs' precision: the path before the dispatch."""
    if layout.mask is not None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=layout.mask)
    else:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=layout.causal)
    return out.transpose(1, 2)


def looplm_sdpa(q, k, v, layout):
    return attend(q, k, v, layout, "sdpa")


def backward(attention_fn, inputs, layout, grad) -> None:
    leaves = [x.detach().requires_grad_() for x in inputs]
    attention_fn(*leaves, layout).backward(grad)


def attention_report(repeats: int) -> None:
    print("attention alone, forward + backward, 4 heads of 32, bf16 inputs")
    print(f"{'keys':>5} {'rows':>4} {'document':>8} {'bf16 ms':>8} {'looplm ms':>9} {'ratio':>6}"
          f" {'err bf16':>9} {'err looplm':>10}")  # fmt: skip
    for keys, rows, doc in SHAPES:
        layout = layout_of(keys, rows, doc)
        torch.manual_seed(0)
        inputs = [torch.randn(rows, 4, keys, 32, dtype=torch.bfloat16) for _ in range(3)]
        grad = torch.randn(rows, keys, 4, 32, dtype=torch.bfloat16)

        before = timed(partial(backward, bf16_sdpa, inputs, layout, grad), repeats)
        after = timed(partial(backward, looplm_sdpa, inputs, layout, grad), repeats)
        exact = bf16_sdpa(*(x.double() for x in inputs), layout)
        err_before = (bf16_sdpa(*inputs, layout).double() - exact).abs().max().item()
        err_after = (looplm_sdpa(*inputs, layout).double() - exact).abs().max().item()
        print(f"{keys:>5} {rows:>4} {doc or 'causal':>8} {before:8.2f} {after:9.2f}"
              f" {before / after:6.2f} {err_before:9.2e} {err_after:10.2e}")  # fmt: skip


def model_report(repeats: int) -> None:
    config = LoopLMConfig.from_preset(
        "tiny",
        vocab_size=21,
        hidden_size=128,
        intermediate_size=384,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_hidden_layers=1,
        total_ut_steps=3,
    )
    torch.manual_seed(0)
    model = LoopLMForCausalLM(config, "sdpa").to(torch.bfloat16)
    ids = torch.randint(0, 21, (8, 128))
    positions = (torch.arange(128) % 8)[None].expand(8, -1).contiguous()
    labels = ids.clone()
    labels[:, ::2] = -100
    objective = Objective(kind="stage1", beta=0.05)

    def step():
        model.zero_grad(set_to_none=True)
        model(ids, position_ids=positions, labels=labels, objective=objective).loss.backward()

    default = attention.CPU_FLOAT32_SDPA_MAX_KEYS
    results = {}
    for label, threshold in (("bf16 SDPA", 0), ("looplm", default)):
        attention.CPU_FLOAT32_SDPA_MAX_KEYS = threshold
        results[label] = timed(step, repeats)
    attention.CPU_FLOAT32_SDPA_MAX_KEYS = default
    tokens = ids.numel()
    print("\nStage I step of the reproduction grid's looped model (1 layer of 128 x 3, bf16,")
    print("8 x 128 tokens packed with 8-token documents), forward + backward:")
    for label, ms in results.items():
        print(f"  {label:>9}: {ms:7.1f} ms, {tokens / ms * 1e3:8,.0f} tokens/s")
    print(f"  ratio: {results['bf16 SDPA'] / results['looplm']:.2f}x")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), float32 up to "
          f"{attention.CPU_FLOAT32_SDPA_MAX_KEYS} keys\n")  # fmt: skip
    attention_report(args.repeats)
    model_report(args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
