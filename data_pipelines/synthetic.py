"""Synthetic reasoning corpora in the spirit of the Ouro paper's small-scale studies.

Four tasks, each deterministic given its seed:

- `multi_hop`: a random knowledge base of people and relations; documents either state a
  person's facts or ask for a 1- to 4-hop composition of relations (Capo/3-hop QA style).
- `mano`: prefix-notation arithmetic modulo 23 (the paper's Mano task). By default the
  expressions are trees of depth 1 to 4; with `ops=L` each has l operators, l uniform in
  [1, L], and held-out questions have exactly L (the paper's hardest length); `mod=M` changes
  the modulus.
- `reachability`: a random directed graph and whether one node reaches another.
- `phop`: p-hop induction (Sanford et al. 2024; Saunshi et al. 2025): in a sequence of
  `length` letters over an alphabet of `symbols`, one hop goes from a position to the one after
  the latest earlier occurrence of its letter; the answer is the letter p hops from the end,
  p uniform in [1, `hops`] (held-out questions: p = `hops`). Sequences are drawn until each of
  the p hops moves to an earlier position and the answer differs from the answer of every
  fewer hops, so that only all p hops find it. In a uniformly random sequence the chain often
  stalls (a letter with no earlier occurrence, or a repeated letter): over 16 letters of 8 the
  3-hop answer would equal the 1-hop (induction-head) answer in 61% of questions, and still
  in 35% when only the moves are required.

A source path `synthetic://<task>?num_docs=N&shards=S&seed=K` is materialised once as S
JSONL shards in the cache directory (written atomically, so concurrent ranks agree) and then
read like any other JSONL source. With `chat=1` the documents are conversations for SFT
(`{"messages": [user, assistant]}`): the user asks one of the task's questions and the
assistant answers with the worked reasoning where the task has one (multi-hop's chain of
facts, reachability's path), about the same knowledge base as the plain source of that seed,
and at the difficulties the plain documents draw (p-hop's p and Mano's l uniform in [1, P]
and [1, L]), so that only the answer is a target and the hardest length is still held out.
Mano's and p-hop's documents and questions open with an instruction line ("Evaluate modulo
23 (prefix notation).", "Follow the hops."); `instruction=0` leaves it out, so that a question
is its expression alone.
"""

from __future__ import annotations

import json
import os
import random
import re
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlparse

from looplm.files import publishing

FORMAT_VERSION = 5
MODULUS = 23
_DEFAULTS = {"num_docs": 20000, "shards": 8, "seed": 0, "chat": 0}
_TASK_DEFAULTS = {
    "mano": {"ops": 0, "mod": MODULUS, "instruction": 1},
    "phop": {"hops": 4, "length": 16, "symbols": 4, "instruction": 1},
}
"""Parameters of one task: the directory of a source names those that differ from these."""
_SYLLABLES = "ka lo mi ren sa tor vel dan is ur bel cor fen gal hal jun kir lam nor pim".split()
_RELATIONS = ("mentor", "neighbor", "employer", "rival", "teacher", "partner")
_NUM_PEOPLE = 400


def parse_uri(uri: str) -> tuple[str, dict[str, int]]:
    """Task name and integer parameters of a `synthetic://` path; ValueError when wrong."""
    parsed = urlparse(uri)
    task = parsed.netloc
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; known: {sorted(TASKS)}")
    params = {**_DEFAULTS, **_TASK_DEFAULTS.get(task, {})}
    for key, value in parse_qsl(parsed.query):
        if key not in params or not value.isdigit():
            raise ValueError(
                f"bad parameter {key}={value!r}; expected integers {sorted(params)} for {task}"
            )
        params[key] = int(value)
    if params["num_docs"] < 1 or params["shards"] < 1:
        raise ValueError("num_docs and shards must be positive")
    if params["chat"] not in (0, 1):
        raise ValueError(f"chat must be 0 (documents) or 1 (conversations), got {params['chat']}")
    if params.get("instruction", 1) not in (0, 1):
        raise ValueError(
            f"instruction must be 1 (each document or question opens with the task's "
            f"instruction line) or 0 (none), got {params['instruction']}"
        )
    if task == "mano" and params["mod"] < 2:
        raise ValueError(f"mano: mod must be >= 2, got {params['mod']}")
    if task == "phop" and not (
        1 <= params["hops"] < params["length"] and 2 <= params["symbols"] <= 26
        and params["length"] >= 4
    ):  # fmt: skip
        raise ValueError(
            "phop: needs 1 <= hops < length (each hop moves back), 2 <= symbols <= 26 and "
            f"length >= 4, got {params}"
        )
    return task, params


def materialize(uri: str, cache_dir: str, check_only: bool = False) -> list[str]:
    """Paths of the JSONL shards of a synthetic source, generating them when missing."""
    task, params = parse_uri(uri)
    if check_only:
        return []
    own = "".join(
        f"-{key}{value}"
        for key, value in params.items()
        if key in _TASK_DEFAULTS.get(task, {}) and value != _TASK_DEFAULTS[task][key]
    )
    name = (
        f"{task}-n{params['num_docs']}-s{params['shards']}-seed{params['seed']}{own}"
        f"{'-chat' if params['chat'] else ''}-v{FORMAT_VERSION}"
    )
    directory = Path(os.path.expanduser(cache_dir), "synthetic", name)
    if not directory.is_dir():
        _generate(task, params, directory)
    return sorted(str(path) for path in directory.glob("*.jsonl"))


def _generate(task: str, params: dict[str, int], directory: Path) -> None:
    generate = TASKS[task]
    context = _context(task, params)
    with publishing(directory, replace=False) as partial:  # the same files, whoever is first
        for shard in range(params["shards"]):
            rng = random.Random(_seed(params["seed"], task, shard))
            count = len(range(shard, params["num_docs"], params["shards"]))
            with open(partial / f"part-{shard:05d}.jsonl", "w") as file:
                for _ in range(count):
                    if params["chat"]:
                        record = {"messages": chat_messages(training_item(task, rng, context))}
                    else:
                        record = {"text": generate(rng, context)}
                    file.write(json.dumps(record) + "\n")


def _seed(seed: int, name: str, index: int) -> int:
    """An integer seed for `random.Random`, the same in every process and Python run."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) * 1_000_003 + index


def _context(task: str, params: dict[str, int]):
    """What a task's generators share: multi-hop's knowledge base, or the task's parameters."""
    return _knowledge_base(params["seed"]) if task == "multi_hop" else params


def _knowledge_base(seed: int) -> tuple[list[str], dict[str, list[int]]]:
    rng = random.Random(_seed(seed, "knowledge-base", 0))
    names: list[str] = []
    while len(names) < _NUM_PEOPLE:
        first = "".join(rng.choices(_SYLLABLES, k=2)).capitalize()
        last = "".join(rng.choices(_SYLLABLES, k=3)).capitalize()
        if f"{first} {last}" not in names:
            names.append(f"{first} {last}")
    relations = {
        relation: [rng.randrange(_NUM_PEOPLE) for _ in range(_NUM_PEOPLE)]
        for relation in _RELATIONS
    }
    return names, relations


@dataclass(frozen=True)
class HeldOutItem:
    """A question with its accepted answers, in the format the task's documents use."""

    key: str
    """The text that identifies the question in a training document."""
    prompt: str
    answers: tuple[str, ...]
    """Accepted continuations of the prompt (greedy decoding must produce one exactly)."""


def multi_hop(rng: random.Random, knowledge) -> str:
    """A biography (the facts) or a multi-hop question, with or without the worked chain."""
    names, relations = knowledge
    person = rng.randrange(_NUM_PEOPLE)
    if rng.random() < 0.4:
        facts = [
            f"The {relation} of {names[person]} is {names[table[person]]}."
            for relation, table in relations.items()
        ]
        return f"About {names[person]}. " + " ".join(facts)
    item = _multi_hop_question(knowledge, person, rng.choices(_RELATIONS, k=rng.randint(1, 4)))
    direct, worked = item.answers
    return item.prompt + (worked if rng.random() < 0.5 else direct)


def _multi_hop_question(knowledge, person: int, hops: list[str]) -> HeldOutItem:
    """The question composing ``hops`` from ``person``; answered directly or with the chain."""
    names, relations = knowledge
    question = names[person]
    chain, current = [], person
    for relation in hops:
        following = relations[relation][current]
        chain.append(f"The {relation} of {names[current]} is {names[following]}.")
        question, current = f"the {relation} of {question}", following
    key = f"Question: Who is {question}?"
    direct = f" {names[current]}."
    worked = f" {' '.join(chain)} So the answer is {names[current]}."
    return HeldOutItem(key, f"{key} Answer:", (direct, worked))


def multi_hop_item(rng: random.Random, knowledge) -> HeldOutItem:
    return _multi_hop_question(
        knowledge, rng.randrange(_NUM_PEOPLE), rng.choices(_RELATIONS, k=rng.randint(1, 4))
    )


def mano(rng: random.Random, params=None) -> str:
    """Several prefix-notation expressions modulo 23 (or ``mod``) with their values."""
    ops, mod = _mano_settings(params)
    lines = []
    for _ in range(rng.randint(4, 11)):
        if ops:
            expression, value = _operators_expression(rng, rng.randint(1, ops), mod)
        else:
            expression, value = _expression(rng, rng.randint(1, 4), mod)
        lines.append(f"{expression} = {value}")
    return _instruction("mano", params) + "\n".join(lines)


def _mano_settings(params) -> tuple[int, int]:
    params = params or _TASK_DEFAULTS["mano"]
    return params["ops"], params["mod"]


def _instruction(task: str, params) -> str:
    """The line a Mano or p-hop document or question opens with ("" with ``instruction=0``)."""
    params = params or _TASK_DEFAULTS[task]
    if not params.get("instruction", 1):
        return ""
    return (
        f"Evaluate modulo {params['mod']} (prefix notation).\n" if task == "mano" else _PHOP_HEADER
    )


_OPERATORS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def _expression(rng: random.Random, depth: int, mod: int = MODULUS) -> tuple[str, int]:
    if depth == 0 or rng.random() < 0.2:
        value = rng.randrange(mod)
        return str(value), value
    operator = rng.choice("+-*")
    left, left_value = _expression(rng, depth - 1, mod)
    right, right_value = _expression(rng, depth - 1, mod)
    return f"{operator} {left} {right}", _OPERATORS[operator](left_value, right_value) % mod


def _operators_expression(rng: random.Random, ops: int, mod: int) -> tuple[str, int]:
    """A uniformly split random tree of exactly ``ops`` operators, in prefix notation."""
    if ops == 0:
        value = rng.randrange(mod)
        return str(value), value
    operator, left_ops = rng.choice("+-*"), rng.randrange(ops)
    left, left_value = _operators_expression(rng, left_ops, mod)
    right, right_value = _operators_expression(rng, ops - 1 - left_ops, mod)
    return f"{operator} {left} {right}", _OPERATORS[operator](left_value, right_value) % mod


def mano_item(rng: random.Random, params=None) -> HeldOutItem:
    """One expression as the first line of a document (always followed by another line); with
    ``ops=L``, of exactly L operators."""
    ops, mod = _mano_settings(params)
    if ops:
        expression, value = _operators_expression(rng, ops, mod)
    else:
        expression, value = _expression(rng, rng.randint(1, 4), mod)
    prompt = f"{_instruction('mano', params)}{expression} ="
    return HeldOutItem(f"\n{expression} = ", prompt, (f" {value}\n",))


_PHOP_HEADER = "Follow the hops.\n"


def phop(rng: random.Random, params) -> str:
    """Several p-hop questions with their answers, p uniform in [1, hops]."""
    lines = []
    for _ in range(rng.randint(2, 6)):
        line, answer = _phop_question(rng, params, rng.randint(1, params["hops"]))
        lines.append(f"{line} = {answer}")
    return _instruction("phop", params) + "\n".join(lines)


_PHOP_ATTEMPTS = 10_000


def _phop_question(rng: random.Random, params, hops: int) -> tuple[str, str]:
    """``"{p} hops: {letters}"`` and the letter ``hops`` hops from the last position, in a
    sequence drawn until every hop moves to an earlier position and the answer differs from
    that of every fewer hops, zero included (the last letter itself: without that, the 2-hop
    answer over 12 letters of 4 was the last letter in 53% of questions, a rate one layer
    reaches without following any hop)."""
    letters = "abcdefghijklmnopqrstuvwxyz"[: params["symbols"]]
    for _ in range(_PHOP_ATTEMPTS):
        sequence = [rng.choice(letters) for _ in range(params["length"])]
        path = hop_path(sequence, hops)
        answers = [sequence[position] for position in path]
        if len(set(path)) == hops + 1 and answers[-1] not in answers[:-1]:
            return f"{hops} hops: {' '.join(sequence)}", answers[-1]
    raise ValueError(
        f"phop: no sequence of {params['length']} letters over {params['symbols']} in "
        f"{_PHOP_ATTEMPTS} draws needs all of its {hops} hops; raise length or symbols"
    )


def hop_path(sequence: list[str], hops: int) -> list[int]:
    """The positions ``hops`` hops visit from the last one (it first); a hop from i goes to
    j + 1 for the latest j < i holding the same letter as i, and stays at i when there is
    none."""
    path = [len(sequence) - 1]
    for _ in range(hops):
        position = path[-1]
        earlier = [j for j in range(position) if sequence[j] == sequence[position]]
        path.append(earlier[-1] + 1 if earlier else position)
    return path


def phop_item(rng: random.Random, params) -> HeldOutItem:
    """One question of exactly ``hops`` hops, as the first line of a document."""
    line, answer = _phop_question(rng, params, params["hops"])
    return HeldOutItem(f"\n{line} = ", f"{_instruction('phop', params)}{line} =", (f" {answer}\n",))


def reachability(rng: random.Random, _context=None) -> str:
    """A random directed graph's edges and whether a path joins two of its nodes."""
    item = reachability_item(rng)
    return item.prompt + item.answers[0]


def reachability_item(rng: random.Random, _context=None) -> HeldOutItem:
    num_nodes = rng.randint(5, 12)
    num_edges = rng.randint(num_nodes - 2, 2 * num_nodes - 1)
    pairs = ((rng.randrange(num_nodes), rng.randrange(num_nodes)) for _ in range(num_edges))
    edges = sorted({(a, b) for a, b in pairs if a != b})
    source, target = rng.sample(range(num_nodes), 2)
    path = _shortest_path(edges, source, target)
    listing = ", ".join(f"n{a} -> n{b}" for a, b in edges)
    answer = "yes, " + " -> ".join(f"n{node}" for node in path) if path else "no"
    prompt = f"Edges: {listing}. Question: is there a path from n{source} to n{target}? Answer:"
    return HeldOutItem(prompt, prompt, (f" {answer}.",))


def _shortest_path(edges: list[tuple[int, int]], source: int, target: int) -> list[int] | None:
    parents = {source: source}
    queue = deque([source])
    while queue:
        node = queue.popleft()
        if node == target:
            path = [node]
            while path[-1] != source:
                path.append(parents[path[-1]])
            return path[::-1]
        for a, b in edges:
            if a == node and b not in parents:
                parents[b] = node
                queue.append(b)
    return None


TASKS: dict[str, Callable] = {
    "multi_hop": multi_hop,
    "mano": mano,
    "reachability": reachability,
    "phop": phop,
}
HELD_OUT: dict[str, Callable] = {
    "multi_hop": multi_hop_item,
    "mano": mano_item,
    "reachability": reachability_item,
    "phop": phop_item,
}


def training_item(task: str, rng: random.Random, context) -> HeldOutItem:
    """A question as a conversation of the training data asks it: p-hop's p and Mano's l
    drawn as in the task's documents, uniform in [1, P] and [1, L] (held-out questions have
    exactly P and L); the other tasks' questions as held out."""
    if task == "phop":
        return phop_item(rng, {**context, "hops": rng.randint(1, context["hops"])})
    if task == "mano" and context and context["ops"]:
        return mano_item(rng, {**context, "ops": rng.randint(1, context["ops"])})
    return HELD_OUT[task](rng, context)


def held_out_items(uri: str, count: int, seen: Callable[[str], bool]) -> list[HeldOutItem]:
    """``count`` distinct questions of the task of a ``synthetic://`` source, drawn from a
    stream of their own (not the documents' seed) and skipping any whose key ``seen`` says
    occurs in training data. Multi-hop questions ask about the source's knowledge base.
    ValueError when the task cannot supply that many unseen questions."""
    task, params = parse_uri(uri)
    rng = random.Random(_seed(params["seed"], f"{task}/held-out", 0))
    context = _context(task, params)
    items: dict[str, HeldOutItem] = {}
    for _ in range(200 * count):
        item = HELD_OUT[task](rng, context)
        if item.key not in items and not seen(item.key):
            items[item.key] = item
            if len(items) == count:
                return list(items.values())
    raise ValueError(
        f"{uri}: only {len(items)} of {count} held-out questions could be drawn that do not "
        "occur in the training data"
    )


def chat_answers(item: HeldOutItem) -> list[str]:
    """The accepted answers of a question as an assistant message: the worked one (the
    conversations' form) first, then any other."""
    return [answer.strip() for answer in (item.answers[-1], *item.answers[:-1])]


def chat_messages(item: HeldOutItem) -> list[dict[str, str]]:
    """A question as a conversation: the prompt from the user, the worked answer back."""
    return [
        {"role": "user", "content": item.prompt},
        {"role": "assistant", "content": chat_answers(item)[0]},
    ]


def document_text(record: dict) -> str:
    """The text of a document of a synthetic source, a conversation's as the plain form would
    write it (prompt, a space, answer), so that ``question_keys`` finds its question."""
    if "text" in record:
        return record["text"]
    user, assistant = (message["content"] for message in record["messages"])
    return f"{user} {assistant}\n"


def question_keys(task: str, text: str) -> list[str]:
    """The keys (``HeldOutItem.key``) of the questions a training document of ``task`` holds."""
    if task == "multi_hop":
        return re.findall(r"Question: Who is [^?]*\?", text)
    if task in ("mano", "phop"):  # every line but the instruction
        return [f"\n{line.split(' = ')[0]} = " for line in text.split("\n") if " = " in line]
    return [text[: text.index("Answer:") + len("Answer:")]] if "Answer:" in text else []
