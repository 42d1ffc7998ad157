"""Held-out evaluation tasks: questions with accepted answers, as token sequences.

A task is either one of the embedded synthetic generators, tied to the training source it
must be held out from (``synthetic://<task>?...``: the same knowledge base, its questions drawn
from a stream of their own, every question that occurs in that source's documents skipped),
or a user's JSONL file of ``{"prompt": ..., "answer": ...}`` records (``answer`` a string or a
list of accepted strings) or, for SFT, of ``{"messages": [...]}`` conversations whose last
message is the assistant's answer. In an SFT run a synthetic task's questions are asked as
conversations, the way its ``chat=1`` training sources ask them, in the run's rendering.

Every accepted answer becomes one ``EvalSequence``: the prompt's and the answer's tokens laid
end to end, with masks of the answer's tokens (scored by exact match) and of the tokens whose
loss counts. Greedy decoding reproduces an answer exactly if and only if every answer token
is the argmax given the tokens before it, so one teacher-forced forward pass scores it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_pipelines import synthetic
from data_pipelines.encoding import DocumentEncoder
from looplm.files import write_atomically

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskSpec:
    """Where a task's items come from: a synthetic training source, or a JSONL file."""

    name: str
    num_items: int
    source_uri: str | None = None
    path: str | None = None


@dataclass
class EvalSequence:
    """One accepted answer of one item, with its prompt."""

    task: str
    item: int
    """Index of the item within its task; an item is answered when any of its sequences is."""
    tokens: np.ndarray
    answer_mask: np.ndarray
    """bool per token: the answer's tokens, scored by exact match."""
    loss_mask: np.ndarray
    """bool per token: the tokens whose loss is reported: the first accepted answer's (the
    assistant's answer for SFT)."""


def file_problems(path: str, kind: str) -> list[str]:
    """Every problem of a user task file (missing, empty, a record without its fields)."""
    file = Path(path)
    if not file.is_file():
        return [f"{path}: no such file"]
    problems, count = [], 0
    with open(file) as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            count += 1
            problem = _record_problem(line, kind)
            if problem:
                problems.append(f"{path}, line {number}: {problem}")
                if len(problems) == 3:
                    break
    if count == 0:
        problems.append(f"{path}: the file holds no records")
    return problems


def _record_problem(line: str, kind: str) -> str | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        return f"not JSON ({e.msg})"
    if not isinstance(record, dict):
        return "a record must be a JSON object"
    if "messages" in record:
        messages = record["messages"]
        if kind != "sft":
            return "a messages record needs an SFT run (data.kind=sft); use prompt and answer"
        if (
            not isinstance(messages, list)
            or not messages
            or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) and "role" in m
                for m in messages
            )
        ):
            return "messages must be a non-empty list of {role, content}"
        if messages[-1]["role"] != "assistant":
            return "the last message must be the assistant's (the answer)"
        return None
    answer = record.get("answer")
    answers = answer if isinstance(answer, list) else [answer]
    if not isinstance(record.get("prompt"), str):
        return "a 'prompt' string is missing"
    if not answers or not all(isinstance(a, str) and a for a in answers):
        return "an 'answer' (a non-empty string or list of them) is missing"
    return None


def training_documents(uris: list[str], cache_dir: str) -> list[str]:
    """Every document of the given synthetic sources."""
    texts = []
    for uri in uris:
        for shard in synthetic.materialize(uri, cache_dir):
            with open(shard) as lines:
                texts += [
                    synthetic.document_text(json.loads(line)) for line in lines if line.strip()
                ]
    return texts


def held_out_synthetic(
    spec: TaskSpec, training_uris: list[str], cache_dir: str
) -> list[synthetic.HeldOutItem]:
    """The held-out questions of a synthetic task, proven held out once and then kept in the
    cache directory under a name that fixes every input of that proof."""
    inputs = json.dumps(
        [spec.source_uri, spec.num_items, sorted(training_uris), synthetic.FORMAT_VERSION]
    )
    digest = hashlib.sha256(inputs.encode()).hexdigest()[:16]
    cached = Path(
        os.path.expanduser(cache_dir), "synthetic", "held-out", f"{spec.name}-{digest}.json"
    )
    if cached.is_file():
        try:
            return [
                synthetic.HeldOutItem(k, p, tuple(a)) for k, p, a in json.loads(cached.read_text())
            ]
        except (ValueError, TypeError) as error:  # torn by a crash: prove the set again
            logger.warning("%s is unreadable (%s); building it again", cached, error)
    items = prove_held_out(spec, training_uris, cache_dir)
    cached.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(cached, json.dumps([[i.key, i.prompt, list(i.answers)] for i in items]))
    return items


def prove_held_out(
    spec: TaskSpec, training_uris: list[str], cache_dir: str
) -> list[synthetic.HeldOutItem]:
    """Draws the held-out questions of a synthetic task and proves them held out: none of
    their keys occurs anywhere in the training documents of the sources of the same generator
    (a plain substring search, independent of how questions are parsed)."""
    task, _ = synthetic.parse_uri(spec.source_uri)
    documents = training_documents(training_uris, cache_dir)
    keys = {key for text in documents for key in synthetic.question_keys(task, text)}
    items = synthetic.held_out_items(spec.source_uri, spec.num_items, keys.__contains__)
    corpus = "".join("\0\n" + text for text in documents)  # a key may open a document
    leaked = [item.key for item in items if item.key in corpus]
    if leaked:
        raise ValueError(
            f"eval task {spec.name!r}: {len(leaked)} held-out questions occur in its training "
            f"data (e.g. {leaked[0]!r})"
        )
    return items


def _file_items(spec: TaskSpec) -> list[dict]:
    records = []
    with open(spec.path) as lines:
        for line in lines:
            if line.strip():
                records.append(json.loads(line))
    return records[: spec.num_items]


def encode_items(name: str, items: list, encoder: DocumentEncoder, kind: str) -> list[EvalSequence]:
    """The sequences of a task's items: ``HeldOutItem``s, or records of a task file."""
    sequences = []
    for index, item in enumerate(items):
        if isinstance(item, dict) and "messages" in item:
            sequences.append(_conversation(name, index, item["messages"], encoder))
            continue
        if isinstance(item, synthetic.HeldOutItem) and kind == "sft":
            for number, answer in enumerate(synthetic.chat_answers(item)):
                messages = [
                    {"role": "user", "content": item.prompt},
                    {"role": "assistant", "content": answer},
                ]
                sequence = _conversation(name, index, messages, encoder)
                sequence.loss_mask &= number == 0
                sequences.append(sequence)
            continue
        if isinstance(item, dict):
            answer = item["answer"]
            prompt, answers = item["prompt"], answer if isinstance(answer, list) else [answer]
        else:
            prompt, answers = item.prompt, list(item.answers)
        prompt_ids = _ids(encoder, prompt)
        for number, answer in enumerate(answers):
            answer_ids = _ids(encoder, answer)
            tokens = np.concatenate([prompt_ids, answer_ids])
            is_answer = np.arange(len(tokens)) >= len(prompt_ids)
            loss_mask = is_answer & (number == 0)
            sequences.append(EvalSequence(name, index, tokens, is_answer, loss_mask))
    return sequences


def _ids(encoder: DocumentEncoder, text: str) -> np.ndarray:
    encoding = encoder.tokenizer.encode(text, add_special_tokens=False)
    return np.asarray(encoding.ids, dtype=np.int64)


def _conversation(name: str, index: int, messages: list[dict], encoder: DocumentEncoder):
    """The conversation as the SFT data renders it (``data.template``), up to its last target;
    the answer is the last (assistant) message and what ends it (ChatML's ``<|im_end|>``, the
    plain rendering's EOS)."""
    pairs = [(m["role"], m["content"]) for m in messages]
    documents = encoder.encode([pairs])
    end = int(np.flatnonzero(documents.targets)[-1])
    tokens, targets = documents.tokens[: end + 1].astype(np.int64), documents.targets[: end + 1]
    start = end
    while start > 0 and targets[start - 1]:
        start -= 1
    answer = np.zeros(len(tokens), bool)
    answer[start : end + 1] = True
    return EvalSequence(name, index, tokens, answer, targets.copy())


def build_sequences(
    specs: list[TaskSpec],
    synthetic_sources: list[str],
    encoder: DocumentEncoder,
    kind: str,
    cache_dir: str,
) -> list[EvalSequence]:
    """Every sequence of every task. ``synthetic_sources``: the training run's ``synthetic://``
    paths, against which the generated tasks are held out."""
    sequences = []
    for spec in specs:
        if spec.source_uri is not None:
            task, _ = synthetic.parse_uri(spec.source_uri)
            same_task = [u for u in synthetic_sources if synthetic.parse_uri(u)[0] == task]
            items = held_out_synthetic(spec, same_task, cache_dir)
        else:
            items = _file_items(spec)
        sequences += encode_items(spec.name, items, encoder, kind)
    return sequences
