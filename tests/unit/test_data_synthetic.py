"""The embedded corpus: deterministic synthetic tasks, correct answers, the shipped tokenizer."""

from __future__ import annotations

import collections
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from data_pipelines import synthetic
from data_pipelines.tokenizer import SPECIAL_TOKENS, load_tokenizer, word_level_tokenizer

REPO = Path(__file__).resolve().parents[2]


def test_generation_is_deterministic_and_cached(tmp_path):
    uri = "synthetic://multi_hop?num_docs=30&shards=3&seed=4"
    first = synthetic.materialize(uri, str(tmp_path / "one"))
    second = synthetic.materialize(uri, str(tmp_path / "two"))
    assert len(first) == 3
    assert [Path(path).read_text() for path in first] == [Path(path).read_text() for path in second]
    assert sum(len(Path(path).read_text().splitlines()) for path in first) == 30
    assert synthetic.materialize(uri, str(tmp_path / "one")) == first


def evaluate_prefix(tokens: list[str], mod: int = synthetic.MODULUS) -> tuple[int, list[str]]:
    head, rest = tokens[0], tokens[1:]
    if head.isdigit():
        return int(head), rest
    left, rest = evaluate_prefix(rest, mod)
    right, rest = evaluate_prefix(rest, mod)
    value = {"+": left + right, "-": left - right, "*": left * right}[head]
    return value % mod, rest


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


def test_train_tokenizer_never_drops_a_file_silently(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = tmp_path / "a.jsonl"
    good.write_text("".join(json.dumps({"text": f"river {i} and stone"}) + "\n" for i in range(99)))
    pq.write_table(pa.table({"body": ["no text column here"] * 5}), tmp_path / "b.parquet")
    command = [sys.executable, "scripts/train_tokenizer.py", "--paths", str(good),
               str(tmp_path / "b.parquet"), "--vocab-size", "300", "--out", str(tmp_path / "t.json")]  # fmt: skip
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)
    assert result.returncode != 0
    assert f"{tmp_path / 'b.parquet'}:1: missing field: no column 'text'" in result.stderr
    assert not (tmp_path / "t.json").exists()
    result = subprocess.run(
        [*command, "--skip-bad-input"], cwd=REPO, capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
    assert "skipped: {'missing_field': 1}" in result.stdout
    # An empty document loses nothing: counted, never a stop.
    with open(good, "a") as file:
        file.write(json.dumps({"text": ""}) + "\n")
    alone = [*command[:3], str(good), *command[5:]]
    result = subprocess.run(alone, cwd=REPO, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert "skipped: {'empty_document': 1}" in result.stdout


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


def difficulty(question: str) -> int:
    """The hops of a p-hop question, the operators of a Mano expression."""
    hops = re.match(r"(\d+) hops: ", question)
    return int(hops.group(1)) if hops else sum(word in "+-*" for word in question.split())


@pytest.mark.parametrize("task", ["phop?hops=3&length=12", "mano?ops=3"])
def test_conversations_ask_every_difficulty_the_documents_do(tmp_path, task):
    """Conversations draw p-hop's p (Mano's l) uniform in [1, P] like the documents; only the
    held-out questions are all of the hardest."""
    uri = f"synthetic://{task}&num_docs=300&shards=1&chat=1"
    records = [json.loads(line) for line in open(synthetic.materialize(uri, tmp_path)[0])]
    counts = collections.Counter(
        difficulty(r["messages"][0]["content"].splitlines()[-1]) for r in records
    )
    assert sorted(counts) == [1, 2, 3] and min(counts.values()) > 60, counts
    held_out = synthetic.held_out_items(uri, 20, lambda key: False)
    assert {difficulty(item.key.strip()) for item in held_out} == {3}


def test_a_word_level_tokenizer_gives_every_symbol_one_token(tmp_path):
    uri = "synthetic://phop?num_docs=20&shards=1&hops=3&symbols=5"
    documents = [json.loads(line)["text"] for line in open(synthetic.materialize(uri, tmp_path)[0])]
    tokenizer = word_level_tokenizer(documents)
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    loaded = load_tokenizer(str(path))
    assert [loaded.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    assert loaded.get_vocab_size() == 4 + len({w for d in documents for w in d.split()})
    for item in synthetic.held_out_items(uri, 5, lambda key: False):
        prompt, (answer,) = item.prompt, item.answers
        apart = loaded.encode(prompt).ids + loaded.encode(answer).ids
        assert apart == loaded.encode(prompt + answer).ids
        assert len(loaded.encode(answer).ids) == 2  # the letter and the newline
        assert 0 not in apart  # no unknown word
    line = documents[0].split("\n")[1]
    assert len(loaded.encode(line).ids) == len(line.split())


def _operators(expression: str) -> int:
    return sum(token in "+-*" for token in expression.split())


def test_mano_of_a_given_length_counts_operators_and_holds_out_the_hardest():
    params = {"ops": 5, "mod": 7}
    rng = random.Random(3)
    lengths = set()
    for _ in range(30):
        text = synthetic.mano(rng, params)
        assert text.startswith("Evaluate modulo 7 (prefix notation).\n")
        for line in text.splitlines()[1:]:
            expression, value = line.split(" = ")
            lengths.add(_operators(expression))
            assert evaluate_prefix(expression.split(), 7) == (int(value), [])
    assert lengths == {1, 2, 3, 4, 5}
    for _ in range(20):
        item = synthetic.mano_item(rng, params)
        expression = item.key.strip().removesuffix(" =")
        assert _operators(expression) == 5
        assert evaluate_prefix(expression.split(), 7)[0] == int(item.answers[0])


def _hop_positions(letters: list[str], hops: int) -> list[int]:
    """p-hop induction as Sanford et al. define it: find(i) = max{j <= i : x[j-1] = x[i]} (i
    itself when there is no such j); the positions n-1, find(n-1), ..., find^p(n-1)."""
    positions = [len(letters) - 1]
    for _ in range(hops):
        i = positions[-1]
        positions.append(
            max([j for j in range(1, i + 1) if letters[j - 1] == letters[i]], default=i)
        )
    return positions


def _hop_answer(letters: list[str], hops: int) -> str:
    return letters[_hop_positions(letters, hops)[-1]]


def test_phop_answers_follow_the_hops():
    params = {"hops": 5, "length": 12, "symbols": 3}
    rng = random.Random(4)
    hops_seen = set()
    for _ in range(40):
        text = synthetic.phop(rng, params)
        for line in text.splitlines()[1:]:
            question, answer = line.split(" = ")
            count, letters = question.split(" hops: ")
            letters = letters.split()
            hops_seen.add(int(count))
            assert len(letters) == 12 and set(letters) <= set("abc")
            assert _hop_answer(letters, int(count)) == answer
            assert len(set(_hop_positions(letters, int(count)))) == int(count) + 1
    assert hops_seen == {1, 2, 3, 4, 5}
    item = synthetic.phop_item(rng, params)
    assert item.key.startswith("\n5 hops: ")
    assert synthetic.question_keys("phop", "Follow the hops.\n" + item.key[1:] + "a") == [item.key]


def test_a_phop_answer_needs_every_hop():
    """In uniformly random sequences the chain often stalls, and a model that only learnt one
    hop (an induction head) would answer 61% of 3-hop questions over 16 letters of 8; drawn so
    that every hop moves and the answer is no fewer hops' answer, it answers none."""
    params = {"hops": 3, "length": 16, "symbols": 8}
    rng = random.Random(0)
    for _ in range(500):
        item = synthetic.phop_item(rng, params)
        letters = item.key.split(" hops: ")[1].removesuffix(" = ").split()
        assert item.answers == (f" {_hop_answer(letters, 3)}\n",)
        assert len(set(_hop_positions(letters, 3))) == 4
        assert _hop_answer(letters, 3) not in (_hop_answer(letters, 1), _hop_answer(letters, 2))
        assert _hop_answer(letters, 3) != letters[-1]  # no 0-hop answer either
    stalled, rng = 0, random.Random(0)
    for _ in range(2000):  # what uniformly random sequences would have given
        letters = [rng.choice("abcdefgh") for _ in range(16)]
        stalled += _hop_answer(letters, 1) == _hop_answer(letters, 3)
    assert stalled / 2000 > 0.5


def test_a_two_hop_answer_is_never_the_last_letter():
    """Drawn only until the answer differed from the 1-hop one, the 2-hop answer over 12
    letters of 4 was the last letter (the query) in 53% of questions: one layer, which cannot
    follow a hop, answered that way at 0.52-0.60."""
    params = {"hops": 2, "length": 12, "symbols": 4}
    rng = random.Random(1)
    for _ in range(1000):
        item = synthetic.phop_item(rng, params)
        letters = item.key.split(" hops: ")[1].removesuffix(" = ").split()
        answer = _hop_answer(letters, 2)
        assert answer not in (letters[-1], _hop_answer(letters, 1))
        assert item.answers == (f" {answer}\n",)
    kept, last, rng = 0, 0, random.Random(1)
    for _ in range(4000):  # the old rule: every hop moves, the answer is not the 1-hop one
        letters = [rng.choice("abcd") for _ in range(12)]
        positions = _hop_positions(letters, 2)
        if len(set(positions)) == 3 and _hop_answer(letters, 2) != _hop_answer(letters, 1):
            kept += 1
            last += _hop_answer(letters, 2) == letters[-1]
    assert last / kept > 0.45


def test_phop_settings_whose_hops_cannot_all_move_are_refused():
    with pytest.raises(ValueError, match="1 <= hops < length"):
        synthetic.parse_uri("synthetic://phop?hops=8&length=8")
    with pytest.raises(ValueError, match="needs all of its 7 hops; raise length or symbols"):
        synthetic._phop_question(random.Random(0), {"length": 8, "symbols": 2}, 7)
