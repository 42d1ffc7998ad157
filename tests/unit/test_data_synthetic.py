"""The embedded corpus: deterministic synthetic tasks, correct answers, the shipped tokenizer."""

from __future__ import annotations

import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from data_pipelines import synthetic
from data_pipelines.tokenizer import SPECIAL_TOKENS, load_tokenizer

REPO = Path(__file__).resolve().parents[2]


def test_generation_is_deterministic_and_cached(tmp_path):
    uri = "synthetic://multi_hop?num_docs=30&shards=3&seed=4"
    first = synthetic.materialize(uri, str(tmp_path / "one"))
    second = synthetic.materialize(uri, str(tmp_path / "two"))
    assert len(first) == 3
    assert [Path(path).read_text() for path in first] == [Path(path).read_text() for path in second]
    assert sum(len(Path(path).read_text().splitlines()) for path in first) == 30
    assert synthetic.materialize(uri, str(tmp_path / "one")) == first


def evaluate_prefix(tokens: list[str]) -> tuple[int, list[str]]:
    head, rest = tokens[0], tokens[1:]
    if head.isdigit():
        return int(head), rest
    left, rest = evaluate_prefix(rest)
    right, rest = evaluate_prefix(rest)
    value = {"+": left + right, "-": left - right, "*": left * right}[head]
    return value % synthetic.MODULUS, rest


def test_mano_answers_are_right():
    rng = random.Random(0)
    for _ in range(20):
        for line in synthetic.mano(rng).splitlines()[1:]:
            expression, answer = line.split(" = ")
            value, rest = evaluate_prefix(expression.split())
            assert rest == [] and value == int(answer)


def reachable(edges: set[tuple[str, str]], source: str) -> dict[str, int]:
    """Distance from `source` to every node it reaches, by repeated relaxation."""
    distance = {source: 0}
    changed = True
    while changed:
        changed = False
        for a, b in edges:
            if a in distance and distance[a] + 1 < distance.get(b, len(edges) + 1):
                distance[b], changed = distance[a] + 1, True
    return distance


def test_reachability_answers_are_right_and_paths_shortest():
    rng = random.Random(1)
    answers = []
    for _ in range(200):
        text = synthetic.reachability(rng)
        edges = set(re.findall(r"(n\d+) -> (n\d+)", text.split(". Question")[0]))
        source, target = re.search(r"from (n\d+) to (n\d+)", text).groups()
        answer = text.split("Answer: ")[1][:-1]
        distance = reachable(edges, source)
        answers.append(answer.split(",")[0])
        if target not in distance:
            assert answer == "no", text
            continue
        path = answer[len("yes, ") :].split(" -> ")
        assert answer.startswith("yes, ") and path[0] == source and path[-1] == target
        assert all((a, b) in edges for a, b in zip(path, path[1:], strict=False))
        assert len(path) - 1 == distance[target], "not a shortest path"
    assert 0.2 < answers.count("no") / len(answers) < 0.8  # both answers are common


def test_multi_hop_answers_follow_the_biographies():
    rng, knowledge = random.Random(2), synthetic._knowledge_base(3)
    documents = [synthetic.multi_hop(rng, knowledge) for _ in range(2000)]
    facts = {}
    for document in documents:
        if document.startswith("About "):
            for relation, person, other in re.findall(
                r"The (\w+) of ([\w ]+?) is ([\w ]+?)\.", document
            ):
                facts[relation, person] = other
    checked = 0
    for document in documents:
        if not document.startswith("Question: "):
            continue
        question, answer = document[len("Question: Who is ") :].split("? Answer: ")
        *relations, person = re.split(r"the (\w+) of ", question)[1::2] + [
            question.rsplit(" of ", 1)[-1]
        ]
        current = person
        for relation in reversed(relations):
            if (relation, current) not in facts:
                break
            current = facts[relation, current]
        else:
            assert answer.endswith(f"{current}."), document
            checked += 1
    assert checked > 300


def test_the_shipped_tokenizer_has_ouro_special_tokens():
    tokenizer = load_tokenizer("embedded")
    assert [tokenizer.token_to_id(token) for token in SPECIAL_TOKENS] == [0, 1, 2]
    assert 4096 <= tokenizer.get_vocab_size() <= 8192
    text = "def f(x):\n    return x * 23  # caf\u00e9"
    assert tokenizer.decode(tokenizer.encode(text).ids) == text


def test_train_tokenizer_script_on_a_small_corpus(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"paragraph {i} about rivers and stones" for i in range(200)))
    out = tmp_path / "tokenizer.json"
    subprocess.run(
        [
            sys.executable,
            "scripts/train_tokenizer.py",
            "--paths",
            str(corpus),
            "--vocab-size",
            "300",
            "--out",
            str(out),
        ],
        cwd=REPO,
        check=True,
        capture_output=True,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    tokenizer = load_tokenizer(str(out))
    assert [tokenizer.token_to_id(token) for token in SPECIAL_TOKENS] == [0, 1, 2]
    assert tokenizer.get_vocab_size() == 300


def test_conversations_are_a_source_of_their_own_and_bad_parameters_are_named(tmp_path):
    plain = synthetic.materialize("synthetic://mano?num_docs=5&shards=1", str(tmp_path))
    chat = synthetic.materialize("synthetic://mano?num_docs=5&shards=1&chat=1", str(tmp_path))
    assert plain != chat and '"messages"' in Path(chat[0]).read_text()
    for uri, message in [
        ("synthetic://mano?chat=2", "chat must be 0 (documents) or 1 (conversations)"),
        ("synthetic://mano?chat=yes", "bad parameter chat='yes'"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            synthetic.parse_uri(uri)
