"""Export a looplm training checkpoint as an Ouro-format (Hugging Face) model directory.

    python scripts/export_hf.py RUN_DIR_OR_CHECKPOINT OUT_DIR [--dtype bfloat16] \
        [--tokenizer PATH|embedded] [--chat]

A run directory exports its latest complete checkpoint. The directory is self-contained: the
weights, ``config.json`` (with an ``auto_map`` for ``trust_remote_code``), the generation
config and the tokenizer files (the run's ``data.tokenizer`` unless ``--tokenizer`` names
another) with the ChatML template. ``--chat`` exports a chat model, as an SFT run's export
has it: ``<|im_end|>`` is the EOS, or, for a run of ``data.template=plain``, ``<|endoftext|>``
with the plain template. It loads with ``LoopLMForCausalLM.from_pretrained``, with the released Ouro
modeling code, and with ``scripts/chat.py OUT_DIR``.
"""

import argparse

from train.export import export_checkpoint


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "checkpoint", help="a run directory or one of its checkpoints/step_* folders"
    )
    parser.add_argument("out_dir", help="where the Ouro-format directory is written")
    parser.add_argument("--dtype", default=None, help="float32 (default), bfloat16 or float16")
    parser.add_argument(
        "--tokenizer", default=None, help="tokenizer.json or `embedded` (default: the run's)"
    )
    parser.add_argument(
        "--chat",
        action="store_true",
        help="a chat model: EOS <|im_end|> (<|endoftext|> for a plain run)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = export_checkpoint(args.checkpoint, args.out_dir, args.dtype, args.tokenizer, args.chat)
    print(f"wrote {out}: " + ", ".join(sorted(path.name for path in out.iterdir())))


if __name__ == "__main__":
    main()
