"""Upcycle a LoopLM: L layers -> k x L layers by duplication (Ouro-2.6B came from 1.4B so).

    python scripts/upcycle.py IN_DIR OUT_DIR [--factor 2] [--order interleave|stack]

``interleave`` repeats each layer in place (0,0,1,1,...); ``stack`` repeats the whole stack
(0,1,...,L-1,0,1,...). Embeddings, the final norm, the exit gate and the LM head are kept as
they are; the result is an Ouro-format directory with num_hidden_layers = k x L.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from looplm import LoopLMForCausalLM
from looplm.upcycle import ORDERS, upcycle


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("in_dir", help="an Ouro-format model directory")
    parser.add_argument("out_dir")
    parser.add_argument("--factor", type=int, default=2)
    parser.add_argument("--order", choices=ORDERS, default="interleave")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    model = LoopLMForCausalLM.from_pretrained(args.in_dir, dtype="auto")
    with torch.no_grad():
        upcycle(model, args.factor, args.order).save_pretrained(
            args.out_dir, dtype=model.config.torch_dtype
        )
    print(Path(args.out_dir))


if __name__ == "__main__":
    main()
