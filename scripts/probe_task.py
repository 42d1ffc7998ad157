"""How fast does a k-layer x T-step model learn a synthetic task? A one-process probe.

    python scripts/probe_task.py --task phop --params hops=3,length=16,symbols=8 \
        --layers 2 --loops 3 --steps 6000 --answer-only

Trains the model (looplm's, on the Stage I loss, or on the last step's alone with `--objective
last_step`) on single questions of the task, one per row (no packing, no DeepSpeed), and prints
the accuracy at every recurrent step on questions of its evaluation stream, for each difficulty
from 1 to the task's hardest (p-hop: hops; Mano: operators), every `--eval-every` steps. With
`--answer-only` only the answer is a target, without it every next token is (as in
pre-training). By default every training question is drawn fresh, so on a task of few distinct
questions (Mano modulo 11 with two operators has 23,958) the scored ones have mostly been
trained on: the score is then one of fitting the task's questions, not of answering new ones.
`--pool N` trains on a fixed set of N questions, as the job does on its source's documents,
and scores the hardest difficulty on questions outside the set, as the job's evaluation does.
`--chat` asks each question as the job's conversations (`chat=1` sources) do: the task's
instruction and the ChatML markup around it (22 tokens a two-operator Mano question, against 7),
with the answer and its closing `<|im_end|>` as the targets.
It answers in minutes on a CPU core what a grid of `scripts/reproduce.py` would answer in
hours: whether a budget is enough to learn a task at all, and which difficulty a model of some
depth masters first. It is a diagnostic; the reproduction's figures come from
the pre-training job.
"""

from __future__ import annotations

import argparse
import inspect
import math
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_pipelines import synthetic  # noqa: E402
from data_pipelines.tokenizer import IM_END, IM_START  # noqa: E402
from looplm import LoopLMConfig, LoopLMForCausalLM, Objective  # noqa: E402

DIFFICULTY = {"phop": "hops", "mano": "ops"}
BETA = 0.05
"""The entropy regularizer's weight by default (the reproduction's looped family's)."""
INIT_STD = inspect.signature(LoopLMForCausalLM.reset_parameters).parameters["std"].default
"""The std of the model's own initialization (Ouro's ``initializer_range``, 0.02)."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=sorted(DIFFICULTY), default="phop")
    parser.add_argument("--params", default="", help="task parameters, e.g. hops=3,length=16")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--loops", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument(
        "--intermediate", type=int, default=None,
        help="the MLP's width (default 3 x hidden, the reproduction's)",
    )  # fmt: skip
    parser.add_argument(
        "--init-std", type=float, default=INIT_STD,
        help=f"std of the normal initialization of linear and embedding weights (Ouro's {INIT_STD})",
    )  # fmt: skip
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--weight-decay", type=float, default=0.1,
        help="AdamW's weight decay on every parameter (the job's is 0.1, norms and biases free)",
    )  # fmt: skip
    parser.add_argument("--beta2", type=float, default=0.95, help="AdamW's second beta")
    parser.add_argument(
        "--rope-theta", type=float, default=LoopLMConfig.rope_theta,
        help="the RoPE base (the reproduction's jobs use 10000)",
    )  # fmt: skip
    parser.add_argument("--batch", type=int, default=64, help="questions per step")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--beta", type=float, default=None, help=f"entropy regularizer ({BETA})")
    parser.add_argument(
        "--objective",
        choices=["stage1", "last_step"],
        default="stage1",
        help="Stage I (every step, weighted by the exit distribution) or the last step only",
    )
    parser.add_argument("--answer-only", action="store_true")
    parser.add_argument(
        "--chat", action="store_true",
        help="each question as a conversation of the job's chat=1 sources: the instruction "
             "and ChatML markup around it, the answer and <|im_end|> the targets (needs "
             "--answer-only)",
    )  # fmt: skip
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--eval-items", type=int, default=256, help="per difficulty")
    parser.add_argument(
        "--pool", type=int, default=0,
        help="train on a fixed set of N questions, as the job trains on its source's num_docs, "
             "and score only the hardest difficulty, on questions outside the set (0: a fresh "
             "question every time, scored on questions the model may have trained on)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if not math.isfinite(args.init_std) or args.init_std <= 0:
        parser.error(f"--init-std must be a positive number, got {args.init_std}")
    if args.intermediate is not None and args.intermediate <= 0:
        parser.error(f"--intermediate must be a positive width, got {args.intermediate}")
    return args


def task_params(task: str, given: str) -> dict[str, int]:
    query = "&".join(given.split(",")) if given else ""
    _, params = synthetic.parse_uri(f"synthetic://{task}?{query}")
    if task == "mano" and not params["ops"]:
        raise ValueError("mano: give ops=L (the probe scores exactly 1..L operators)")
    return {key: params[key] for key in synthetic._TASK_DEFAULTS[task]}


def question(task: str, params: dict[str, int], rng: random.Random, level: int) -> list[str]:
    """The words of one question and its answer (the last word), of difficulty ``level``."""
    if task == "phop":
        line, answer = synthetic._phop_question(rng, params, level)
    else:
        line, answer = synthetic._operators_expression(rng, level, params["mod"])
    return [*line.split(), "=", str(answer)]


def instruction(task: str, params: dict[str, int]) -> list[str]:
    """The words of the line that opens every question of the task's conversations (none with
    ``instruction=0``)."""
    if not params.get("instruction", 1):
        return []
    prompt = synthetic.training_item(task, random.Random(0), params).prompt
    return [*prompt.split("\n")[0].split(), "\n"]


def conversation(instruction: list[str], words: list[str]) -> list[str]:
    """A question's words (its answer last) as the job renders its conversation: ChatML,
    the task's instruction, the answer and its closing ``<|im_end|>`` last."""
    return [IM_START, "user", "\n", *instruction, *words[:-1], IM_END, "\n", IM_START,
            "assistant", "\n", words[-1], IM_END]  # fmt: skip


def unseen(pool: list[list[str]], draw, count: int) -> list[list[str]]:
    """``count`` distinct questions from ``draw()`` that are not in ``pool``."""
    seen, found = {tuple(words) for words in pool}, {}
    for _ in range(1000 * count):
        words = draw()
        if tuple(words) not in seen:
            found.setdefault(tuple(words), words)
            if len(found) == count:
                return list(found.values())
    raise SystemExit(
        f"--pool {len(pool)}: found {len(found)} of {count} held-out questions outside the "
        "training pool (the pool covers nearly every question: give a smaller --pool)"
    )


def epochs(pool: list[list[int]], rng: random.Random):
    """The pool's questions in a fresh random order each pass."""
    while True:
        order = list(pool)
        rng.shuffle(order)
        yield from order


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


class Vocabulary(dict):
    def ids(self, words: list[str]) -> list[int]:
        return [self.setdefault(word, len(self)) for word in words]


def batch(
    rows: list[list[int]], answer_only: bool, after: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded inputs and targets (-100 on padding, and with ``answer_only`` on all but
    the answer and the ``after`` tokens that follow it, which end the row)."""
    width = max(map(len, rows))
    x = torch.zeros(len(rows), width, dtype=torch.long)
    y = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, row in enumerate(rows):
        x[i, : len(row)] = torch.tensor(row)
        if answer_only:
            targets = row[len(row) - 1 - after :]
            y[i, len(row) - 2 - after : len(row) - 1] = torch.tensor(targets)
        else:
            y[i, : len(row) - 1] = torch.tensor(row[1:])
    return x, y


@torch.no_grad()
def accuracy_by_step(model, rows: list[list[int]], after: int = 0) -> list[float]:
    """Exact match of the answer (``after`` tokens before the row's end) at every step."""
    model.eval()
    x, _ = batch(rows, answer_only=True)
    out = model(x, return_all_steps=True)
    where = torch.tensor([len(row) - 2 - after for row in rows])
    gold = torch.tensor([row[-1 - after] for row in rows])
    model.train()
    return [
        (step_logits[torch.arange(len(rows)), where].argmax(-1) == gold).float().mean().item()
        for step_logits in out.step_logits
    ]


def model_of(config: LoopLMConfig, args: argparse.Namespace) -> LoopLMForCausalLM:
    """The probe's model, initialized with ``--init-std``."""
    model = LoopLMForCausalLM(config)
    if args.init_std != INIT_STD:  # drawn again: the default keeps its earlier figures
        model.reset_parameters(std=args.init_std)
    return model


def optimizer_of(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.AdamW:
    """AdamW over every parameter, with the probe's learning rate, weight decay and betas."""
    return torch.optim.AdamW(
        model.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, args.beta2)
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.chat and not args.answer_only:
        raise SystemExit(
            "--chat trains on the answers, as the job's conversations do: add --answer-only"
        )
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    params = task_params(args.task, args.params)
    hardest = params[DIFFICULTY[args.task]]
    train_rng, eval_rng = random.Random(args.seed), random.Random(10_000 + args.seed)
    vocab = Vocabulary(pad=0)
    after = 1 if args.chat else 0  # the conversation's <|im_end|> follows its answer
    opening = instruction(args.task, params)

    def ids(words: list[str]) -> list[int]:
        return vocab.ids(conversation(opening, words) if args.chat else words)

    if args.pool:
        pool = [question(args.task, params, train_rng, train_rng.randint(1, hardest))
                for _ in range(args.pool)]  # fmt: skip
        outside = unseen(
            pool, lambda: question(args.task, params, eval_rng, hardest), args.eval_items
        )
        held_out = {hardest: [ids(words) for words in outside]}
        pool = [ids(words) for words in pool]
    else:
        held_out = {
            level: [ids(question(args.task, params, eval_rng, level)) for _ in range(args.eval_items)]
            for level in range(1, hardest + 1)
        }  # fmt: skip
    for _ in range(1000):  # every word the task uses
        ids(question(args.task, params, train_rng, train_rng.randint(1, hardest)))
    config = LoopLMConfig(
        vocab_size=64 * ((len(vocab) + 63) // 64),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate or 3 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        total_ut_steps=args.loops,
        max_position_embeddings=1024,
        rope_theta=args.rope_theta,
    )
    model = model_of(config, args)
    optimizer = optimizer_of(model, args)
    if args.objective == "last_step" and args.beta is not None:
        print(f"warning: --beta {args.beta} is ignored: the last_step loss has no exit regularizer")
    beta = BETA if args.beta is None else args.beta
    objective = Objective(kind=args.objective, beta=beta)
    print(
        f"{args.task} {params} | {plural(args.layers, 'layer')} x {plural(args.loops, 'step')}, "
        f"hidden {args.hidden}, MLP {config.intermediate_size}, init std {args.init_std}, "
        f"RoPE base {config.rope_theta:,.0f}, {config.num_parameters():,} parameters | "
        f"{args.batch} questions a step, lr {args.lr}, weight decay {args.weight_decay}, "
        f"beta2 {args.beta2}, "
        f"{'answer' if args.answer_only else 'every token'} as target, {args.objective} loss"
        f"{', as conversations' if args.chat else ''}",
        flush=True,
    )
    if args.pool:
        pool_order = epochs(pool, train_rng)
        distinct = len({tuple(row) for row in pool})
        print(f"training pool: {args.pool:,} questions ({distinct:,} distinct); held out: "
              f"{args.eval_items} questions of {hardest} {DIFFICULTY[args.task]}, none in the pool")  # fmt: skip
    start, tokens = time.time(), 0
    for step in range(1, args.steps + 1):
        lr = args.lr * min(1.0, step / args.warmup)
        lr *= min(1.0, (args.steps - step) / (0.2 * args.steps))  # linear decay over the last 20%
        for group in optimizer.param_groups:
            group["lr"] = lr
        if args.pool:
            rows = [next(pool_order) for _ in range(args.batch)]
        else:
            rows = [
                ids(question(args.task, params, train_rng, train_rng.randint(1, hardest)))
                for _ in range(args.batch)
            ]
        x, y = batch(rows, args.answer_only, after)
        tokens += int((x != 0).sum())
        loss = model(x, labels=y, objective=objective).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % args.eval_every == 0 or step == args.steps:
            scores = " | ".join(
                f"{level}: " + " ".join(f"{a:.2f}" for a in accuracy_by_step(model, rows, after))
                for level, rows in held_out.items()
            )
            print(
                f"step {step} loss {loss.item():.3f} tokens {tokens:,} {time.time() - start:.0f}s "
                f"| accuracy by step, per {DIFFICULTY[args.task]}: {scores}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
