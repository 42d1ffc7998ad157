"""In-loop evaluation: scores against real greedy decoding and a float64 recomputation, held-out
sets that are held out, and task files checked before a run starts."""

import json
import re

import numpy as np
import pytest
import torch

from data_pipelines import synthetic
from data_pipelines.encoding import DocumentEncoder
from data_pipelines.eval_tasks import (
    EvalSequence,
    TaskSpec,
    build_sequences,
    file_problems,
    held_out_synthetic,
    prove_held_out,
    training_documents,
)
from looplm import LoopLMConfig, LoopLMForCausalLM
from train.validation import EvalSettings, Validator, console_line, wandb_values

VOCAB, T, EXTRA, THRESHOLDS = 53, 3, 1, [0.3, 0.6, 0.9]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Hundreds of tiny decoding calls: threads only add waiting (8x slower on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model() -> LoopLMForCausalLM:
    torch.manual_seed(3)
    cfg = LoopLMConfig.from_preset(
        "tiny", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, total_ut_steps=T
    )
    model = LoopLMForCausalLM(cfg).double().eval()
    with torch.no_grad():  # gates spread over the steps, so Q-exit thresholds differ
        model.model.early_exit_gate.weight.normal_(0, 2.0)
    return model


def _greedy(model, prompt: list[int], length: int, **rule) -> list[int]:
    """Real decoding through the KV cache: every step runs, each token from the rule's step."""
    out = model.generate(torch.tensor([prompt]), length, eos_token_id=[], **rule)
    return out[0, len(prompt) :].tolist()


def _sequences(model) -> list[EvalSequence]:
    """Items whose accepted answers are some exit rule's greedy answer (so some are right at
    some steps only), or random tokens (wrong everywhere)."""
    rng = np.random.default_rng(0)
    rules = [{"exit_at_step": t, "num_steps": T + EXTRA} for t in range(1, T + EXTRA + 1)]
    rules += [{"exit_threshold": q, "num_steps": T} for q in THRESHOLDS]
    sequences = []
    for item in range(16):
        prompt = rng.integers(0, VOCAB, int(rng.integers(3, 9))).tolist()
        length = int(rng.integers(1, 4))
        answers = [rng.integers(0, VOCAB, length).tolist()]
        if item % 4:
            answers.insert(item % 2, _greedy(model, prompt, length, **rules[item % len(rules)]))
        for number, answer in enumerate(answers):
            tokens = np.array(prompt + answer)
            is_answer = np.arange(len(tokens)) >= len(prompt)
            task = "even" if item % 2 == 0 else "odd"
            sequences.append(
                EvalSequence(task, item // 2, tokens, is_answer, is_answer & (number == 0))
            )
    return sequences


def _expected(model, sequences) -> dict:
    """Accuracy by decoding each prompt for real under each rule; loss, exit distribution and
    Q-exit depth from float64 step logits and the gate formula, written out here."""
    tasks = {}
    rules = {f"step_{t}": {"exit_at_step": t, "num_steps": T + EXTRA} for t in range(1, T + 2)}
    rules |= {f"q_{q}": {"exit_threshold": q, "num_steps": T} for q in THRESHOLDS}
    for name in ("even", "odd"):
        mine = [s for s in sequences if s.task == name]
        items = sorted({s.item for s in mine})
        right = {rule: 0 for rule in rules}
        for item in items:
            candidates = [s for s in mine if s.item == item]
            prompt = candidates[0].tokens[~candidates[0].answer_mask].tolist()
            answers = [s.tokens[s.answer_mask].tolist() for s in candidates]
            for rule, kwargs in rules.items():
                decoded = _greedy(model, prompt, len(answers[0]), **kwargs)
                right[rule] += any(
                    decoded == a[: len(decoded)] and len(a) == len(decoded) for a in answers
                )
        tasks[name] = {rule: count / len(items) for rule, count in right.items()}
    zeros = lambda n: torch.zeros(n, dtype=torch.float64)  # noqa: E731
    losses, pdfs, depths, count = zeros(T + EXTRA), zeros(T), zeros(len(THRESHOLDS)), 0
    for s in sequences:
        ids = torch.tensor(s.tokens)[None]
        out = model(ids, num_steps=T + EXTRA, return_all_steps=True)
        log_probs = torch.log_softmax(out.step_logits[:, 0].double(), dim=-1)  # [T+E, S, V]
        for position in np.flatnonzero(s.loss_mask):
            losses -= log_probs[:, position - 1, s.tokens[position]]
            lam = torch.sigmoid(out.gate_logits[0, position - 1, :T].double())
            survive = torch.cumprod(1 - lam, 0)
            pdf = torch.cat([lam[:1], lam[1:-1] * survive[:-2], survive[-2:-1]])
            pdfs += pdf
            cdf = 1 - survive
            cdf[-1] = 1.0
            depths += torch.tensor([1 + int(torch.nonzero(cdf >= q)[0]) for q in THRESHOLDS])
            count += 1
    return {"tasks": tasks, "loss": losses / count, "pdf": pdfs / count, "depth": depths / count}


def test_scores_equal_real_greedy_decoding_and_a_float64_recomputation(tmp_path):
    model = _model()
    sequences = _sequences(model)
    settings = EvalSettings(enabled=True, extra_steps=EXTRA, thresholds=THRESHOLDS, batch_size=5)
    record = Validator(settings, sequences, eos=0, path=tmp_path / "eval.jsonl").evaluate(model, T)
    expected = _expected(model, sequences)
    for name, task in record["tasks"].items():
        want = expected["tasks"][name]
        assert task["accuracy_per_step"] == [want[f"step_{t}"] for t in range(1, T + 2)]
        assert task["accuracy_q_exit"] == {str(q): want[f"q_{q}"] for q in THRESHOLDS}
        assert task["n"] == 8
    accuracies = [a for task in record["tasks"].values() for a in task["accuracy_per_step"]]
    assert len(set(accuracies)) > 2  # right at some steps, wrong at others
    loss = record["loss_per_step"] + record["loss_extra_steps"]
    torch.testing.assert_close(
        torch.tensor(loss, dtype=torch.float64), expected["loss"], rtol=1e-5, atol=0
    )
    torch.testing.assert_close(
        torch.tensor(record["exit_pdf_mean"], dtype=torch.float64),
        expected["pdf"],
        rtol=1e-9,
        atol=1e-12,
    )
    depth = torch.tensor(
        [record["mean_depth_q_exit"][str(q)] for q in THRESHOLDS], dtype=torch.float64
    )
    torch.testing.assert_close(depth, expected["depth"], rtol=1e-12, atol=0)
    assert len(set(depth.tolist())) > 1


def test_data_parallel_shares_cover_every_sequence_once(tmp_path):
    model = _model()
    sequences = _sequences(model)
    settings = EvalSettings(enabled=True, extra_steps=EXTRA, thresholds=THRESHOLDS, batch_size=4)
    shares = [Validator(settings, sequences, 0, tmp_path / "e", r, 3).mine for r in range(3)]
    assert sorted(i for share in shares for i in share) == list(range(len(sequences)))
    assert (
        len({Validator(settings, sequences, 0, tmp_path / "e", r, 3).num_batches for r in range(3)})
        == 1
    )


def test_the_record_reads_as_one_console_line_and_flat_wandb_keys(tmp_path):
    model = _model()
    settings = EvalSettings(enabled=True, extra_steps=EXTRA, thresholds=THRESHOLDS)
    record = {
        "step": 7,
        **Validator(settings, _sequences(model), 0, tmp_path / "e").evaluate(model, T),
    }
    line = console_line(record)
    assert (
        line.startswith("eval step 7: loss/step ") and "even acc/step" in line and "q=0.9" in line
    )
    values = wandb_values(record)
    assert values["eval/odd/accuracy_step_4"] == record["tasks"]["odd"]["accuracy_per_step"][3]
    assert values["eval/loss_step_4"] == record["loss_extra_steps"][0]


# ---- held-out sets -----------------------------------------------------------------------

SOURCES = {
    task: f"synthetic://{task}?num_docs=3000&shards=2&seed=5"
    for task in ("multi_hop", "mano", "reachability", "phop")
}


@pytest.mark.parametrize("task", sorted(SOURCES))
def test_held_out_questions_never_occur_in_the_training_documents(tmp_path, task):
    items = prove_held_out(
        TaskSpec(task, 40, source_uri=SOURCES[task]), [SOURCES[task]], str(tmp_path)
    )
    assert len({item.key for item in items}) == 40
    documents = training_documents([SOURCES[task]], str(tmp_path))
    assert not any(item.key in doc for item in items for doc in documents)
    # Drawn from the source's generator: each answer is one the documents' format gives.
    for item in items:
        assert item.prompt.startswith(item.key.lstrip("\n")[:10]) or item.key.strip() in item.prompt


def test_a_torn_held_out_cache_is_built_again(tmp_path, caplog):
    spec = TaskSpec("mano", 20, source_uri=SOURCES["mano"])
    first = held_out_synthetic(spec, [SOURCES["mano"]], str(tmp_path))
    (cached,) = (tmp_path / "synthetic" / "held-out").glob("mano-*.json")
    cached.write_text(cached.read_text()[:100])
    assert held_out_synthetic(spec, [SOURCES["mano"]], str(tmp_path)) == first
    assert f"{cached} is unreadable" in caplog.text
    assert json.loads(cached.read_text())


def test_the_generators_questions_do_overlap_training_without_the_filter(tmp_path):
    # Without skipping seen questions, short questions repeat training ones: the proof matters.
    documents = training_documents([SOURCES["mano"]], str(tmp_path))
    keys = {k for text in documents for k in synthetic.question_keys("mano", text)}
    drawn = synthetic.held_out_items(SOURCES["mano"], 200, lambda key: False)
    assert any(item.key in keys for item in drawn)


def test_an_overlap_is_an_error_naming_the_task(tmp_path, monkeypatch):
    documents = training_documents([SOURCES["mano"]], str(tmp_path))
    line = documents[0].split("\n")[1]
    expression, value = line.split(" = ")
    leaked = synthetic.HeldOutItem(f"\n{expression} = ", f"x\n{expression} =", (f" {value}\n",))
    monkeypatch.setattr(synthetic, "held_out_items", lambda uri, count, seen: [leaked])
    with pytest.raises(
        ValueError, match="eval task 'arith': 1 held-out questions occur in its training data"
    ):
        prove_held_out(
            TaskSpec("arith", 1, source_uri=SOURCES["mano"]), [SOURCES["mano"]], str(tmp_path)
        )


def test_multi_hop_answers_are_the_knowledge_bases_facts(tmp_path):
    items = prove_held_out(
        TaskSpec("mh", 20, source_uri=SOURCES["multi_hop"]), [SOURCES["multi_hop"]], str(tmp_path)
    )
    names, relations = synthetic._knowledge_base(5)
    for item in items:
        direct, worked = item.answers
        assert worked.endswith(f"So the answer is {direct.strip()}")
        assert direct.strip()[:-1] in names


# ---- task files --------------------------------------------------------------------------


def _file(tmp_path, lines: list) -> str:
    path = tmp_path / "task.jsonl"
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return str(path)


@pytest.mark.parametrize(
    ("lines", "kind", "message"),
    [
        ([], "pretrain", "the file holds no records"),
        (["", "  "], "pretrain", "the file holds no records"),
        (["{not json"], "pretrain", "line 1: not JSON"),
        ([{"prompt": "a"}], "pretrain", "line 1: an 'answer'"),
        (
            [{"prompt": "a", "answer": "b"}, {"answer": "b"}],
            "pretrain",
            "line 2: a 'prompt' string",
        ),
        ([{"prompt": "a", "answer": []}], "pretrain", "an 'answer'"),
        ([{"messages": [{"role": "user", "content": "hi"}]}], "pretrain", "needs an SFT run"),
        ([{"messages": [{"role": "user", "content": "hi"}]}], "sft", "must be the assistant's"),
        ([{"messages": []}], "sft", "non-empty list of {role, content}"),
    ],
)
def test_a_bad_task_file_is_named_with_its_line(tmp_path, lines, kind, message):
    problems = file_problems(_file(tmp_path, lines), kind)
    assert problems and message in problems[0] and "task.jsonl" in problems[0]


def test_a_missing_task_file_is_named(tmp_path):
    assert file_problems(str(tmp_path / "nope.jsonl"), "pretrain") == [
        f"{tmp_path / 'nope.jsonl'}: no such file"
    ]


def test_file_items_become_one_sequence_per_accepted_answer(tmp_path):
    path = _file(
        tmp_path,
        [{"prompt": "2 + 2 =", "answer": [" 4", " four"]}, {"prompt": "x", "answer": " y"}],
    )
    assert file_problems(path, "pretrain") == []
    encoder = DocumentEncoder("embedded", "pretrain", "<|endoftext|>")
    sequences = build_sequences(
        [TaskSpec("add", 5, path=path)], [], encoder, "pretrain", str(tmp_path)
    )
    assert [(s.item, bool(s.loss_mask.any())) for s in sequences] == [
        (0, True),
        (0, False),
        (1, True),
    ]
    decode = encoder.tokenizer.decode
    assert decode(sequences[1].tokens[sequences[1].answer_mask].tolist()) == " four"
    assert decode(sequences[0].tokens.tolist()) == "2 + 2 = 4"


def test_a_conversation_is_scored_on_its_last_assistant_message(tmp_path):
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    path = _file(tmp_path, [{"messages": messages}])
    assert file_problems(path, "sft") == []
    encoder = DocumentEncoder("embedded", "sft", "<|endoftext|>")
    (sequence,) = build_sequences(
        [TaskSpec("chat", 5, path=path)], [], encoder, "sft", str(tmp_path)
    )
    answer = encoder.tokenizer.decode(
        sequence.tokens[sequence.answer_mask].tolist(), skip_special_tokens=False
    )
    assert answer == "4<|im_end|>"
    assert sequence.loss_mask.sum() > sequence.answer_mask.sum()  # both assistant turns


# ---- conversations of the synthetic tasks (the SFT twin's data) --------------------------


def _chat(uri: str) -> str:
    return uri + "&chat=1"


@pytest.mark.parametrize("task", sorted(SOURCES))
def test_chat_sources_ask_the_tasks_questions_with_worked_answers(tmp_path, task):
    (shard, *_) = synthetic.materialize(_chat(SOURCES[task]), str(tmp_path))
    records = [json.loads(line) for line in open(shard)]
    roles = {tuple(m["role"] for m in r["messages"]) for r in records}
    assert roles == {("user", "assistant")}
    if task == "multi_hop":  # every answer is the chain of facts, ending in the name
        names, relations = synthetic._knowledge_base(5)
        for record in records[:50]:
            user, assistant = (m["content"] for m in record["messages"])
            hops = re.findall(r"the (\w+) of", user)[::-1]
            person = names.index(re.search(r"of ([A-Z]\w+ [A-Z]\w+)\?", user).group(1))
            for hop in hops:
                person = relations[hop][person]
            assert assistant.endswith(f"So the answer is {names[person]}.")
            assert assistant.count(". ") == len(hops)
    if task == "mano":  # the user's expression, the value modulo 23
        for record in records[:50]:
            user, assistant = (m["content"] for m in record["messages"])
            expression = user.split("\n")[1].removesuffix(" =").split()
            assert int(assistant) == _prefix_value(expression)
    if task == "reachability":
        assert {r["messages"][1]["content"].split(",")[0].rstrip(".") for r in records} == {
            "yes",
            "no",
        }


def _prefix_value(tokens: list[str]) -> int:
    def walk(i: int) -> tuple[int, int]:
        if tokens[i].isdigit():
            return int(tokens[i]), i + 1
        left, j = walk(i + 1)
        right, k = walk(j)
        return {"+": left + right, "-": left - right, "*": left * right}[tokens[i]] % 23, k

    value, end = walk(0)
    assert end == len(tokens)
    return value


@pytest.mark.parametrize("task", sorted(SOURCES))
def test_held_out_questions_never_occur_in_the_training_conversations(tmp_path, task):
    uri = _chat(SOURCES[task])
    items = prove_held_out(TaskSpec(task, 40, source_uri=uri), [uri], str(tmp_path))
    questions = {
        json.loads(line)["messages"][0]["content"]
        for shard in synthetic.materialize(uri, str(tmp_path))
        for line in open(shard)
    }
    assert len(items) == 40 and not questions & {item.prompt for item in items}
    # Without the filter short expressions would: the proof reads the conversations.
    drawn = synthetic.held_out_items(uri, 300, lambda key: False)
    assert task != "mano" or questions & {item.prompt for item in drawn}


@pytest.mark.parametrize("task", ["mano", "phop"])
@pytest.mark.parametrize("chat", [0, 1])
def test_without_the_instruction_a_question_is_its_line_alone_and_is_still_held_out(
    tmp_path, monkeypatch, task, chat
):
    uri = f"{SOURCES[task]}&chat={chat}&instruction=0"
    (shard, *_) = synthetic.materialize(uri, str(tmp_path))
    records = [json.loads(line) for line in open(shard)]
    texts = [synthetic.document_text(record) for record in records]
    header = "Evaluate modulo" if task == "mano" else "Follow the hops"
    assert not any(header in text for text in texts)
    if chat:  # the question, one line: what the held-out prompts are too
        assert all("\n" not in r["messages"][0]["content"] for r in records)
        assert all(text.count(" = ") == 1 for text in texts)
    items = prove_held_out(TaskSpec(task, 40, source_uri=uri), [uri], str(tmp_path))
    assert all(item.prompt == item.key.strip() for item in items)
    # Every line is a question the proof knows, the first included (no instruction before it).
    keys = {key for text in texts for key in synthetic.question_keys(task, text)}
    assert all(f"\n{text.split(' = ')[0]} = " in keys for text in texts)
    assert not keys & {item.key for item in items}
    if task == "mano":  # short expressions recur: a parser that missed the keys is caught by
        # the proof's own search of the documents, which finds a key opening a document
        monkeypatch.setattr(synthetic, "question_keys", lambda task, text: [])
        with pytest.raises(ValueError, match="held-out questions occur in its training data"):
            prove_held_out(TaskSpec(task, 40, source_uri=uri), [uri], str(tmp_path / "again"))


def test_the_instruction_setting_is_a_flag_of_the_tasks_that_have_one():
    with pytest.raises(ValueError, match="instruction must be 1"):
        synthetic.parse_uri("synthetic://mano?instruction=2")
    with pytest.raises(ValueError, match="bad parameter instruction"):
        synthetic.parse_uri("synthetic://reachability?instruction=0")


@pytest.mark.parametrize("template", ["chatml", "plain"])
def test_sft_asks_a_synthetic_question_as_its_conversations_do(tmp_path, template):
    uri = _chat(SOURCES["multi_hop"])
    encoder = DocumentEncoder("embedded", "sft", "<|endoftext|>", template=template)
    sequences = build_sequences(
        [TaskSpec("mh", 3, source_uri=uri)], [uri], encoder, "sft", str(tmp_path)
    )
    items = synthetic.held_out_items(uri, 3, lambda key: False)
    assert [s.item for s in sequences] == [0, 0, 1, 1, 2, 2]  # worked, then direct
    decode = encoder.tokenizer.decode
    for sequence in sequences:
        item = items[sequence.item]
        direct, worked = (a.strip() for a in item.answers)
        answer = worked if sequence.loss_mask.any() else direct
        # The text the SFT data renders, as one string, up to the end of the answer.
        if template == "chatml":
            text = (
                f"<|im_start|>user\n{item.prompt}<|im_end|>\n"
                f"<|im_start|>assistant\n{answer}<|im_end|>"
            )
            ending = f"{answer}<|im_end|>"
        else:
            text, ending = f"{item.prompt} {answer}<|endoftext|>", f" {answer}<|endoftext|>"
        assert decode(sequence.tokens.tolist(), skip_special_tokens=False) == text
        scored = decode(sequence.tokens[sequence.answer_mask].tolist(), skip_special_tokens=False)
        assert scored == ending
        assert np.array_equal(sequence.loss_mask, sequence.answer_mask & (answer == worked))
