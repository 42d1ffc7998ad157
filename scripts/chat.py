"""Chat with a LoopLM: its chat template, Q-exit decoding, the answer up to its EOS.

    python scripts/chat.py MODEL_DIR "What is 3 + 4?" [--system "You are terse."] \
        [--exit-threshold 0.9] [--kv-sharing last] [--sample --temperature 0.7 --top-p 0.95] \
        [--show-thinking] [--json]

``MODEL_DIR`` is an Ouro-format directory (its ``tokenizer.json`` and the ``chat_template`` of
its ``tokenizer_config.json`` are used; ChatML when it has none), or a run directory or one of
its checkpoints, which is first exported like ``train.sft``'s export (the tokenizer: the
run's ``data.tokenizer`` from ``config.yaml``, or ``--tokenizer``; the template: the run's
``data.template``). Decoding runs every
recurrent step for the prompt and, with ``--exit-threshold q``, lets each new token exit at
the first step whose exit CDF reaches q, skipping the remaining steps (``early_exit=True``).
Generation stops at the model's EOS (and at ``<|im_end|>`` where the vocabulary has it). The answer is printed without its
``<think>...</think>`` part, which ``--show-thinking`` prints first; ``--json`` prints one
object with both, the token count and why decoding stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

import torch
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from data_pipelines.tokenizer import CHATML_TEMPLATE, IM_END, load_tokenizer, token_id
from looplm import LoopLMForCausalLM
from looplm.generation import KV_SHARING_MODES

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def load_chat_model(
    path: str, tokenizer: str | None, dtype: str, workdir: Path
) -> tuple[LoopLMForCausalLM, Tokenizer, str]:
    """The model, its tokenizer and its chat template. A run directory or checkpoint is
    exported into ``workdir`` first."""
    from train.export import export_thinking_model, resolve_checkpoint, run_tokenizer

    directory = Path(path)
    if not (directory / "config.json").is_file():
        checkpoint = resolve_checkpoint(directory)
        name = tokenizer or run_tokenizer(checkpoint)
        if name is None:
            raise FileNotFoundError(f"no config.yaml of the run of {checkpoint}; pass --tokenizer")
        directory = export_thinking_model(checkpoint, workdir / "model", name)
    model = LoopLMForCausalLM.from_pretrained(directory, dtype=dtype).eval()
    if tokenizer is None and not (directory / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{directory} holds no tokenizer.json; pass --tokenizer")
    settings = directory / "tokenizer_config.json"
    template = CHATML_TEMPLATE
    if settings.is_file():
        template = json.loads(settings.read_text()).get("chat_template") or CHATML_TEMPLATE
    return model, load_tokenizer(tokenizer or str(directory / "tokenizer.json")), template


def render_prompt(template: str, prompt: str, system: str | None = None) -> str:
    """The chat template applied to one user turn (after an optional system message), with the
    generation prompt that opens the assistant's turn."""
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}
    ]
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return environment.from_string(template).render(messages=messages, add_generation_prompt=True)


def split_thinking(text: str) -> tuple[str | None, str]:
    """(the ``<think>`` segment's content or None, the answer after it)."""
    start = text.find(THINK_OPEN)
    end = text.find(THINK_CLOSE, start + len(THINK_OPEN)) if start >= 0 else -1
    if start < 0 or end < 0:
        return None, text.strip()
    return text[start + len(THINK_OPEN) : end].strip(), text[end + len(THINK_CLOSE) :].strip()


def chat(model, tokenizer: Tokenizer, template: str, prompt: str, args) -> dict:
    """Decodes the answer to ``prompt``; returns the thinking, the answer, the number of new
    tokens and why decoding stopped (``eos`` or ``max_new_tokens``)."""
    text = render_prompt(template, prompt, args.system)
    input_ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False).ids])
    chatml = [token_id(tokenizer, IM_END)] if tokenizer.token_to_id(IM_END) is not None else []
    stop = [*chatml, *model.config.eos_token_ids]
    generator = torch.Generator().manual_seed(args.seed)
    output = model.generate(
        input_ids,
        args.max_new_tokens,
        do_sample=args.sample,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        eos_token_id=list(dict.fromkeys(stop)),
        kv_sharing=args.kv_sharing,
        num_steps=args.num_steps,
        exit_threshold=args.exit_threshold,
        early_exit=args.exit_threshold is not None,
        generator=generator,
    )
    new = output[0, input_ids.shape[1] :].tolist()
    stopped = "eos" if new and new[-1] in stop else "max_new_tokens"
    body = new[:-1] if stopped == "eos" else new
    thinking, answer = split_thinking(tokenizer.decode(body, skip_special_tokens=False))
    return {
        "thinking": thinking,
        "answer": answer,
        "new_tokens": len(new),
        "stopped": stopped,
        "stop_token": tokenizer.id_to_token(new[-1]) if stopped == "eos" else None,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", help="an Ouro-format directory, a run directory or a checkpoint")
    parser.add_argument("prompt", help="the user's message")
    parser.add_argument("--system", default=None, help="a system message before the prompt")
    parser.add_argument(
        "--tokenizer", default=None, help="a tokenizer.json or `embedded` (default: the model's)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument(
        "--exit-threshold",
        type=float,
        default=None,
        help="Q-exit threshold q in [0, 1]: each new token stops at the first step with exit "
        "CDF >= q (default: every step, the last step's logits)",
    )
    parser.add_argument("--num-steps", type=int, default=None, help="recurrent steps (default T)")
    parser.add_argument("--kv-sharing", choices=KV_SHARING_MODES, default="full")
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or auto")
    parser.add_argument("--show-thinking", action="store_true", help="print the <think> part")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.exit_threshold is not None and not 0.0 <= args.exit_threshold <= 1.0:
        parser.error(f"--exit-threshold must lie in [0, 1], got {args.exit_threshold}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as workdir:
        try:
            # What loading prints (DeepSpeed's notices, the export of a checkpoint) goes to
            # stderr: stdout holds the answer only (one JSON object with --json).
            with contextlib.redirect_stdout(sys.stderr):
                model, tokenizer, template = load_chat_model(
                    args.model, args.tokenizer, args.dtype, Path(workdir)
                )
        except (OSError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        result = chat(model, tokenizer, template, args.prompt, args)
    if args.json:
        print(json.dumps(result))
        return 0
    if args.show_thinking and result["thinking"] is not None:
        print(f"{THINK_OPEN}\n{result['thinking']}\n{THINK_CLOSE}")
    print(result["answer"])
    if result["stopped"] != "eos":
        print(f"[stopped after {result['new_tokens']} tokens, before any EOS]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
