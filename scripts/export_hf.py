"""Export a looplm training checkpoint as an Ouro-format (Hugging Face) model directory.

    python scripts/export_hf.py RUN_DIR_OR_CHECKPOINT OUT_DIR [--dtype bfloat16]

A run directory exports its latest complete checkpoint. The directory loads with
``LoopLMForCausalLM.from_pretrained`` and with the released Ouro modeling code.
"""

import argparse

from train.export import export_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "checkpoint", help="a run directory or one of its checkpoints/step_* folders"
    )
    parser.add_argument("out_dir", help="where the Ouro-format directory is written")
    parser.add_argument("--dtype", default=None, help="float32 (default), bfloat16 or float16")
    args = parser.parse_args()
    print(export_checkpoint(args.checkpoint, args.out_dir, args.dtype))


if __name__ == "__main__":
    main()
