"""Evaluation inside the training jobs: quality by recurrent step on held-out tasks.

Every ``eval.every_steps`` optimizer steps and at the end of a run, each rank scores its share
of the held-out sequences (``data_pipelines.eval_tasks``) with one teacher-forced forward
pass of ``T + eval.extra_steps`` recurrent steps, and the sums are reduced over all ranks:

- the loss of every step 1..T (and of the extra steps, extrapolating past the trained depth),
  the mean exit distribution, and the mean Q-exit depth at each threshold;
- per task, exact-match accuracy when exiting at each step 1..T + extra, and under Q-exit
  (every token at its own exit step) at each threshold, with the mean depth used.

Greedy decoding reproduces an answer exactly if and only if each of its tokens is the argmax
after the ones before, so counting the answer tokens that are not the argmax scores greedy
decoding of every exit rule from that one pass. The evaluation reads no training data and
draws no random numbers, so the training run is the same with it on or off.

Shape legend: B sequences, S positions, T steps run, N scored target tokens, Q thresholds.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from data_pipelines import synthetic
from data_pipelines.config import DataConfig
from data_pipelines.encoding import DocumentEncoder
from data_pipelines.eval_tasks import EvalSequence, TaskSpec, build_sequences, file_problems
from looplm.losses import IGNORE_INDEX, exit_pdf, q_exit_steps
from train.metrics import truncate_jsonl_after

logger = logging.getLogger("looplm.eval")

EVAL_FILE = "eval.jsonl"


@dataclass
class EvalTaskSettings:
    """One held-out task."""

    name: str = "???"
    source: str | None = None
    """An embedded task: the name of the data source (a ``synthetic://`` path) whose generator
    and knowledge base the held-out questions come from, and whose documents they avoid."""
    path: str | None = None
    """A user task: a JSONL file of {prompt, answer} records (answer: a string or a list of
    accepted strings), or {messages} conversations for SFT."""
    num_items: int | None = None
    """Items scored (default: eval.num_items; a file's first ones)."""


@dataclass
class EvalSettings:
    """Evaluation during training (written to RUN_DIR/eval.jsonl)."""

    enabled: bool = False
    every_steps: int = 100
    """Optimizer steps between evaluations; the run's last step is always evaluated."""
    tasks: list[EvalTaskSettings] = field(default_factory=list)
    num_items: int = 32
    """Items per task."""
    extra_steps: int = 2
    """Recurrent steps scored beyond the trained T (extrapolation)."""
    thresholds: list[float] = field(default_factory=lambda: [0.5, 0.8, 0.95])
    """Q-exit thresholds q."""
    batch_size: int = 16
    """Sequences per forward pass on each rank."""


def eval_problems(settings: EvalSettings, data: DataConfig) -> list[str]:
    """Every problem of the eval settings, checked before any process group starts (task
    files included)."""
    if not settings.enabled:
        return []
    p = []
    if settings.every_steps < 1 or settings.num_items < 1 or settings.batch_size < 1:
        p.append("eval.every_steps, eval.num_items and eval.batch_size must be >= 1")
    if settings.extra_steps < 0:
        p.append(f"eval.extra_steps must be >= 0, got {settings.extra_steps}")
    if any(not 0.0 <= q <= 1.0 for q in settings.thresholds):
        p.append(f"eval.thresholds must lie in [0, 1], got {list(settings.thresholds)}")
    if not settings.tasks:
        p.append("eval.tasks: at least one task is needed when eval.enabled")
    names = [task.name for task in settings.tasks]
    if len(set(names)) != len(names):
        p.append(f"eval.tasks: duplicate names {sorted({n for n in names if names.count(n) > 1})}")
    sources = {source.name: source for source in data.sources}
    for task in settings.tasks:
        where = f"eval task {task.name!r}"
        if (task.source is None) == (task.path is None):
            p.append(f"{where}: give exactly one of source (an embedded task) and path (a file)")
        elif task.source is not None:
            p += _source_problems(where, task.source, sources)
        else:
            p += [f"{where}: {problem}" for problem in file_problems(task.path, data.kind)]
        if task.num_items is not None and task.num_items < 1:
            p.append(f"{where}: num_items must be >= 1, got {task.num_items}")
    return p


def _source_problems(where: str, name: str, sources: dict) -> list[str]:
    if name not in sources:
        return [f"{where}: data source {name!r} not found; the sources are {sorted(sources)}"]
    uris = [u for u in sources[name].paths if u.startswith("synthetic://")]
    if len(uris) != 1:
        return [
            f"{where}: data source {name!r} must have one synthetic:// path, not {sources[name].paths}"
        ]
    try:
        synthetic.parse_uri(uris[0])
    except ValueError as e:
        return [f"{where}: {e}"]
    return []


def task_specs(settings: EvalSettings, data: DataConfig) -> list[TaskSpec]:
    sources = {source.name: source for source in data.sources}
    return [
        TaskSpec(
            task.name,
            task.num_items or settings.num_items,
            source_uri=sources[task.source].paths[0] if task.source else None,
            path=task.path,
        )
        for task in settings.tasks
    ]


def synthetic_paths(data: DataConfig) -> list[str]:
    return [u for s in data.sources for u in s.paths if u.startswith("synthetic://")]


@dataclass
class _Sums:
    """What one rank adds up; reduced over ranks as one float64 tensor."""

    loss_T: torch.Tensor
    tokens: torch.Tensor
    pdf_T: torch.Tensor
    depth_Q: torch.Tensor
    misses_LT: torch.Tensor  # answer tokens that are not the argmax, per sequence and step
    misses_LQ: torch.Tensor
    answer_depth_L: torch.Tensor  # summed Q-exit depth of the answer tokens, per threshold
    task_loss_KT: torch.Tensor
    task_tokens_K: torch.Tensor

    def flat(self) -> torch.Tensor:
        return torch.cat([v.reshape(-1) for v in self.__dict__.values()])

    def unflat(self, flat: torch.Tensor) -> _Sums:
        values, offset = {}, 0
        for key, value in self.__dict__.items():
            values[key] = flat[offset : offset + value.numel()].view_as(value)
            offset += value.numel()
        return _Sums(**values)


class Validator:
    """The held-out sequences of one data-parallel rank and their scoring."""

    def __init__(
        self,
        settings: EvalSettings,
        sequences: list[EvalSequence],
        eos: int,
        path: Path,
        dp_rank: int = 0,
        dp_size: int = 1,
        write: bool = True,
    ):
        self.settings, self.sequences, self.eos = settings, sequences, eos
        self.thresholds = list(settings.thresholds)
        self.tasks = list(dict.fromkeys(s.task for s in sequences))
        self.items = {
            name: 1 + max(s.item for s in sequences if s.task == name) for name in self.tasks
        }
        # Sorted by length, so that a batch holds sequences of similar lengths.
        by_length = sorted(range(len(sequences)), key=lambda i: len(sequences[i].tokens))
        self.mine = by_length[dp_rank::dp_size]
        self.num_batches = math.ceil(math.ceil(len(sequences) / dp_size) / settings.batch_size)
        self.path, self.write = Path(path), write

    @classmethod
    def build(
        cls,
        settings: EvalSettings,
        data: DataConfig,
        run_dir: Path,
        dp_rank: int,
        dp_size: int,
        write: bool,
    ) -> Validator:
        """The tasks of ``settings`` as sequences, the synthetic ones proven held out from the
        training sources of ``data``."""
        start = time.time()
        encoder = DocumentEncoder.of(data)
        specs = task_specs(settings, data)
        sequences = build_sequences(
            specs, synthetic_paths(data), encoder, data.kind, data.cache_dir
        )
        validator = cls(
            settings, sequences, encoder.eos, Path(run_dir) / EVAL_FILE, dp_rank, dp_size, write
        )
        if write:
            logger.info(
                "eval: %d held-out sequences of tasks %s, ready in %.1f s",
                len(sequences),
                validator.items,
                time.time() - start,
            )
        return validator

    def truncate_after(self, step: int) -> None:
        """Drops evaluations of steps after a resumed checkpoint (they are run again)."""
        if self.write:
            truncate_jsonl_after(self.path, step)

    def due(self, step: int, last: bool) -> bool:
        return self.settings.enabled and (last or step % self.settings.every_steps == 0)

    @torch.no_grad()
    def evaluate(self, model, num_steps: int, sp=None, rope_theta: float | None = None) -> dict:
        """Scores every held-out sequence (collectively: every rank calls it) at the RoPE base
        ``rope_theta`` (default: the model config's)."""
        start = time.time()
        total = num_steps + self.settings.extra_steps
        sums = self._empty(num_steps, total)
        device = next(model.parameters()).device
        for index in range(self.num_batches):
            chosen = self.mine[
                index * self.settings.batch_size : (index + 1) * self.settings.batch_size
            ]
            batch = self._batch(chosen, sp)
            self._score(model, batch, chosen, num_steps, total, sums, device, sp, rope_theta)
        flat = sums.flat()
        if dist.is_initialized():
            dist.all_reduce(flat)
        record = self._record(sums.unflat(flat), num_steps)
        record["seconds"] = time.time() - start
        return record

    def _empty(self, t: int, total: int) -> _Sums:
        q, n, k = len(self.thresholds), len(self.sequences), len(self.tasks)
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64)  # noqa: E731
        return _Sums(
            zeros(total), zeros(1), zeros(t), zeros(q), zeros(n, total), zeros(n, q),
            zeros(n, q), zeros(k, total), zeros(k),
        )  # fmt: skip

    def _batch(self, chosen: list[int], sp) -> dict:
        """Right-padded [B, S] tensors (S a multiple of the sequence-parallel size); a rank
        with no sequences left runs one padding row, so every rank makes the same calls."""
        rows = [self.sequences[i] for i in chosen]
        length = max([len(r.tokens) for r in rows] + [2])
        multiple = sp.size if sp is not None else 1
        length = math.ceil(length / multiple) * multiple
        count = max(len(rows), 1)
        ids = torch.full((count, length), self.eos, dtype=torch.long)
        answer = torch.zeros(count, length, dtype=torch.bool)
        counted = torch.zeros(count, length, dtype=torch.bool)
        for b, row in enumerate(rows):
            ids[b, : len(row.tokens)] = torch.from_numpy(row.tokens)
            # Position s predicts token s + 1.
            answer[b, : len(row.tokens) - 1] = torch.from_numpy(row.answer_mask[1:])
            counted[b, : len(row.tokens) - 1] = torch.from_numpy(row.loss_mask[1:])
        labels = torch.full_like(ids, IGNORE_INDEX)
        scored = answer | counted
        labels[:, :-1] = torch.where(scored[:, :-1], ids[:, 1:], labels[:, :-1])
        positions = torch.arange(length).expand(count, length)
        batch = {"input_ids": ids, "position_ids": positions, "labels": labels,
                 "answer": answer, "counted": counted}  # fmt: skip
        if sp is not None:
            batch = {k: v.chunk(sp.size, dim=1)[sp.rank] for k, v in batch.items()}
        return batch

    def _score(self, model, batch, chosen, t, total, sums: _Sums, device, sp, rope_theta) -> None:
        ids, positions = batch["input_ids"].to(device), batch["position_ids"].to(device)
        body = model.model(ids, positions, total, rope_theta=rope_theta, sequence_parallel=sp)
        labels = batch["labels"]
        rows_N = (labels.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)
        if rows_N.numel() == 0:
            return
        targets_N = labels.reshape(-1)[rows_N]
        loss_TN, hit_TN = [], []
        # The head is called as a module, not read as a weight (as looplm.losses does): under
        # ZeRO-3 the call is what gathers its partitioned weight.
        for h in body.step_hidden:
            logits_NV = model.lm_head(h.reshape(-1, h.shape[-1])[rows_N.to(device)]).float().cpu()
            loss_TN.append(F.cross_entropy(logits_NV, targets_N, reduction="none").double())
            hit_TN.append(logits_NV.argmax(-1) == targets_N)
        loss_TN, hit_TN = torch.stack(loss_TN), torch.stack(hit_TN)
        gates_NT = body.gate_logits.reshape(-1, total)[rows_N.to(device), :t].double().cpu()
        width = labels.shape[1]
        sequence_N = torch.tensor(chosen, dtype=torch.long)[rows_N // width] if chosen else None
        counted_N = batch["counted"].reshape(-1)[rows_N]
        answer_N = batch["answer"].reshape(-1)[rows_N]
        self._add_loss(sums, loss_TN[:, counted_N], gates_NT[counted_N], sequence_N[counted_N])
        self._add_answers(sums, hit_TN[:, answer_N], gates_NT[answer_N], sequence_N[answer_N])

    def _add_loss(self, sums: _Sums, loss_TN, gates_NT, sequence_N) -> None:
        sums.loss_T += loss_TN.sum(1)
        sums.tokens += loss_TN.shape[1]
        sums.pdf_T += exit_pdf(gates_NT).sum(0)
        for j, q in enumerate(self.thresholds):
            sums.depth_Q[j] += (q_exit_steps(gates_NT, q) + 1).sum()
        task_K = torch.tensor(
            [self.tasks.index(self.sequences[i].task) for i in sequence_N.tolist()],
            dtype=torch.long,
        )
        sums.task_loss_KT.index_add_(0, task_K, loss_TN.T)
        sums.task_tokens_K.index_add_(0, task_K, torch.ones(len(task_K), dtype=torch.float64))

    def _add_answers(self, sums: _Sums, hit_TN, gates_NT, sequence_N) -> None:
        sums.misses_LT.index_add_(0, sequence_N, (~hit_TN).T.double())
        for j, q in enumerate(self.thresholds):
            exit_N = q_exit_steps(gates_NT, q)
            hit_N = hit_TN.gather(0, exit_N[None])[0]
            sums.misses_LQ[:, j].index_add_(0, sequence_N, (~hit_N).double())
            sums.answer_depth_L[:, j].index_add_(0, sequence_N, (exit_N + 1).double())

    def _record(self, sums: _Sums, t: int) -> dict:
        tokens = max(sums.tokens.item(), 1.0)
        loss = (sums.loss_T / tokens).tolist()
        record = {
            "loss_per_step": loss[:t],
            "loss_extra_steps": loss[t:],
            "exit_pdf_mean": (sums.pdf_T / tokens).tolist(),
            "mean_depth_q_exit": {
                str(q): sums.depth_Q[j].item() / tokens for j, q in enumerate(self.thresholds)
            },
            "tasks": {},
        }
        for k, name in enumerate(self.tasks):
            record["tasks"][name] = self._task_record(sums, k, name)
        return record

    def _task_record(self, sums: _Sums, k: int, name: str) -> dict:
        index = [i for i, s in enumerate(self.sequences) if s.task == name]
        item_L = torch.tensor([self.sequences[i].item for i in index])
        answer_tokens = torch.tensor([float(self.sequences[i].answer_mask.sum()) for i in index])
        n = self.items[name]

        def accuracy(misses_L: torch.Tensor) -> float:
            right = torch.zeros(n, dtype=torch.bool).index_put_(
                (item_L,), misses_L == 0, accumulate=True
            )
            return right.double().mean().item()

        misses = sums.misses_LT[index]
        tokens = max(sums.task_tokens_K[k].item(), 1.0)
        first = torch.tensor([bool(self.sequences[i].loss_mask.any()) for i in index])
        return {
            "n": n,
            "accuracy_per_step": [accuracy(misses[:, s]) for s in range(misses.shape[1])],
            "accuracy_q_exit": {
                str(q): accuracy(sums.misses_LQ[index, j]) for j, q in enumerate(self.thresholds)
            },
            "mean_depth_q_exit": {
                str(q): (
                    sums.answer_depth_L[index, j][first].sum() / answer_tokens[first].sum()
                ).item()
                for j, q in enumerate(self.thresholds)
            },
            "loss_per_step": (sums.task_loss_KT[k] / tokens).tolist(),
        }


def console_line(record: dict) -> str:
    """One line: held-out loss by step, then each task's accuracy by step and under Q-exit."""
    losses = " ".join(f"{x:.3f}" for x in record["loss_per_step"])
    parts = [f"eval step {record['step']}: loss/step {losses}"]
    for name, task in record["tasks"].items():
        by_step = " ".join(f"{a:.2f}" for a in task["accuracy_per_step"])
        q, acc = next(reversed(task["accuracy_q_exit"].items()), (None, None))
        q_part = f", q={q} {acc:.2f} @ depth {task['mean_depth_q_exit'][q]:.2f}" if q else ""
        parts.append(f"{name} acc/step {by_step}{q_part}")
    return " | ".join(parts) + f" ({record['seconds']:.1f} s)"


def wandb_values(record: dict) -> dict:
    """Flat eval/... keys for wandb."""
    values = {f"eval/loss_step_{i + 1}": x for i, x in enumerate(record["loss_per_step"])}
    t = len(record["loss_per_step"])
    values.update(
        {f"eval/loss_step_{t + i + 1}": x for i, x in enumerate(record["loss_extra_steps"])}
    )
    for name, task in record["tasks"].items():
        for i, a in enumerate(task["accuracy_per_step"]):
            values[f"eval/{name}/accuracy_step_{i + 1}"] = a
        for q, a in task["accuracy_q_exit"].items():
            values[f"eval/{name}/accuracy_q{q}"] = a
            values[f"eval/{name}/depth_q{q}"] = task["mean_depth_q_exit"][q]
    return values


def append_record(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def read_records(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / EVAL_FILE
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError as error:
                raise ValueError(f"{path}:{number} is not a JSON record: {error}") from error
    return records
