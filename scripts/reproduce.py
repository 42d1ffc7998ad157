"""Does looping help? Looped models against equal-parameter and equal-FLOP ones on the paper's
synthetic reasoning tasks, each trained by the normal pre-training job.

    python scripts/reproduce.py --task mano --quick --out runs/repro
    python scripts/reproduce.py --task all --out runs/repro-full      # the full grid

For an effective depth D and block sizes k, every task and seed trains:

- ``looped``: k layers applied D/k times, the Stage I loss with the entropy regularizer;
- ``iso_param``: the same k layers applied once (equal parameters);
- ``iso_flop``: D layers applied once (equal FLOPs, D/k times the parameters);
- ``looped_last``: k layers applied D/k times, trained on the last step's loss alone.

Each model is ``torchrun --nproc_per_node N -m train.pretrain`` (``N``: ``Scale.ranks``, 2 CPU
ranks, or one rank per visible GPU) on the task's ``synthetic://`` source alone, with a
word-level tokenizer of the task's symbols, evaluated by the job itself at its end on held-out
questions of the hardest length (exact match by recurrent step; proven absent from the training
data), and exported in Ouro's format with its tokenizer. Tasks (see
``data_pipelines/synthetic.py``): ``mano`` (prefix arithmetic modulo M, 23 in the full grid, l
operators with l uniform in [1, L], scored at l = L) and ``phop`` (p-hop induction, p uniform in
[1, P], scored at p = P).

Written into ``--out``: ``results.json`` (one object per model), ``results.md`` (the table
and the means over seeds), ``results.png`` (accuracy against effective depth, a line per
family), ``models/NAME/`` (each model, Ouro format, with ``tokenizer.json``), ``runs/NAME/``
(each run directory and ``job.log``), ``tokenizers/`` and, with ``--set gate_bias``,
``init/`` (the models such runs start from). A model whose run finished is not
trained again, so an interrupted reproduction continues where it stopped, and ``--out`` can be
moved or copied.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from data_pipelines import synthetic  # noqa: E402
from data_pipelines.tokenizer import word_level_tokenizer  # noqa: E402

FAMILIES = ("looped", "iso_param", "iso_flop", "looped_last")


@dataclass(frozen=True)
class Scale:
    """One size of the grid: the models, the data and the training of every run."""

    depth: int
    """Effective depth D: layers x loops of the looped models, layers of iso_flop."""
    blocks: tuple[int, ...]
    """Block sizes k (each divides D)."""
    seeds: tuple[int, ...]
    hidden_size: int
    heads: int
    steps: int
    """Optimizer steps of every run, except a task's in ``task_steps``."""
    batch_tokens: int
    seq_len: int
    lr: float
    warmup: int
    beta: float
    """Entropy regularizer of the looped family (Stage I)."""
    eval_items: int
    stability: str = "default"
    """The spike guard (``configs/stability``): ``off`` lets a loss spike run its course, as
    the slingshot spikes of small models on algorithmic tasks do (a rollback on them
    stopped a 3-layer p-hop model four times in 900 steps at LR 1e-3)."""
    tasks: dict[str, str] = field(default_factory=dict)
    """The ``synthetic://`` source of each task."""
    task_steps: dict[str, int] = field(default_factory=dict)
    """Optimizer steps of a task's runs where they differ from ``steps`` (``--steps`` sets
    every task's)."""
    precision: str = "auto"
    """The job's ``deepspeed.precision``: ``auto`` is bf16 where the CPU computes it."""
    template: str = "chatml"
    """How the job renders a source's conversations (``data.template``): ``plain`` asks each
    question bare, with the answer and EOS as its targets."""
    ranks: int = 2
    """Ranks of each job: 2 CPU ranks (gloo), or, where the driver sees GPUs and ``--set
    ranks`` is not given, one rank per GPU (NCCL). ``batch_tokens`` is the global batch either
    way."""
    compile: bool = False
    """``model.compile``: each decoder layer compiled by torch.compile (the same arithmetic in
    fused kernels; its first job compiles for about 20 s, later ones read Inductor's cache).
    The quick grid's steps take about 11% less time (the loop, 72 against 64 ms)."""
    workers: int = 1
    """``data.num_workers``: 0 reads the data in each rank's own process, where a small source
    is tokenized once; a worker process would take a share of the 2 cores from the ranks."""
    gate_bias: float | None = None
    """An investigation, not part of the grid: the looped models start from a fresh
    initialization (seeded by their seed, given to the job as ``init_from``) whose exit gate
    has this bias. Ouro initializes it to 0, exits 1/2, 1/4, ... at the start; -3 puts 0.91
    of the weight on the last of 3 steps."""

    def steps_of(self, task: str) -> int:
        return self.task_steps.get(task, self.steps)


QUICK = Scale(
    depth=3,
    blocks=(1,),
    seeds=(0, 1),
    hidden_size=128,
    heads=4,
    steps=3000,
    batch_tokens=2048,
    seq_len=128,
    lr=3e-4,
    warmup=50,
    beta=0.05,
    eval_items=256,
    stability="off",
    tasks={
        "mano": "synthetic://mano?ops=2&mod=7&num_docs=20000&shards=2&chat=1&instruction=0",
        "phop": (
            "synthetic://phop?hops=2&length=12&symbols=4&num_docs=200000&shards=2&chat=1"
            "&instruction=0"
        ),
    },
    template="plain",
    compile=True,
    workers=0,
)
"""One layer looped three times (Saunshi et al.'s setting): the smallest grid where, on a CPU,
looping shows what it buys. Trained on the answers alone, every difficulty up to the hardest,
each question asked bare (no instruction line, no chat markup: a two-operator Mano question
and its answer take 8 tokens, where ChatML around the instruction took 24, so a step holds
three times the questions). Mano modulo 7 with 1 or 2 operators, from 20,000 questions (80% of
the two-operator ones; those scored are among the rest), for 3,000 steps: modulo 23 no model
learns the tables at this budget, and modulo 5 with 3 operators no model learnt the hardest
length (three layers 0.48, one 0.37: nothing for looping to show), while two operators need
depth (modulo 7 through the job: one layer 0.52, three 0.80). Modulo 11 shows twice the
margin over one layer but takes 6,000 steps, over the budget of 30 minutes on 2 cores.
LR 3e-4: at 1e-3 the looped layer stalls on Mano and p-hop's three layers spike."""
FULL = Scale(
    depth=12,
    blocks=(2, 3, 6),
    seeds=(0, 1),
    hidden_size=256,
    heads=8,
    steps=3000,
    batch_tokens=8192,
    seq_len=512,
    lr=3e-4,
    warmup=200,
    beta=0.05,
    eval_items=512,
    stability="off",
    tasks={
        "mano": "synthetic://mano?ops=10&num_docs=400000&shards=8&chat=1&instruction=0",
        "phop": (
            "synthetic://phop?hops=8&length=64&symbols=8&num_docs=400000&shards=8&chat=1"
            "&instruction=0"
        ),
    },
    template="plain",
)
"""The paper's setting: a 12-layer effective depth from blocks of 2, 3 and 6 layers, Mano
modulo 23 with up to 10 operators, p-hop with 8 hops. Trained as the quick grid found a
comparison must be (each question asked bare, the answers the only targets, LR 3e-4, no spike
guard): at LR 1e-3 the looped block stalled on Mano, and as documents or conversations the
loop trailed three layers by 20 and 13 points where asked bare it trailed by 6."""


@dataclass(frozen=True)
class Model:
    task: str
    family: str
    layers: int
    loops: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.task}-{self.family}-{self.layers}x{self.loops}-seed{self.seed}"


def grid(scale: Scale, tasks: list[str], families=FAMILIES) -> list[Model]:
    """Every model to train, iso_flop once per task and seed (it does not depend on k; a
    block of all D layers is that model, so it adds nothing)."""
    models = []
    for task in tasks:
        for seed in scale.seeds:
            models.append(Model(task, "iso_flop", scale.depth, 1, seed))
            for k in scale.blocks:
                loops = scale.depth // k
                if loops == 1:  # k = D: the iso_flop model itself
                    continue
                models.append(Model(task, "looped", k, loops, seed))
                models.append(Model(task, "iso_param", k, 1, seed))
                models.append(Model(task, "looped_last", k, loops, seed))
    return [model for model in models if model.family in families]


# ---- one model ---------------------------------------------------------------------------


def answers_only(uri: str) -> bool:
    """Whether the source holds conversations (``chat=1``): the job then trains on the
    answers alone (the SFT data kind), not on every token of the documents."""
    return bool(synthetic.parse_uri(uri)[1]["chat"])


def tokenizer_path(task: str, uri: str, out: Path) -> Path:
    """Where ``task_tokenizer`` writes the tokenizer of a task's source."""
    return out / "tokenizers" / f"{task}-{hashlib.sha256(uri.encode()).hexdigest()[:8]}.json"


def task_tokenizer(task: str, uri: str, out: Path, cache_dir: Path) -> Path:
    """A word-level tokenizer of every word of the task's documents (or conversations, with
    their roles) and held-out questions."""
    path = tokenizer_path(task, uri, out)
    if not path.is_file():
        texts = ["user assistant"] if answers_only(uri) else []
        for shard in synthetic.materialize(uri, str(cache_dir)):
            with open(shard) as lines:
                texts += [synthetic.document_text(json.loads(line)) for line in lines]
        items = synthetic.held_out_items(uri, 64, lambda key: False)
        texts += [item.prompt + answer for item in items for answer in item.answers]
        path.parent.mkdir(parents=True, exist_ok=True)
        word_level_tokenizer(texts).save(str(path))
    return path


def model_settings(model: Model, scale: Scale, vocab) -> dict:
    """The architecture of a model of the grid: the ``tiny`` preset with these fields."""
    return dict(
        vocab_size=vocab,
        hidden_size=scale.hidden_size,
        intermediate_size=3 * scale.hidden_size,
        num_attention_heads=scale.heads,
        num_key_value_heads=scale.heads,
        num_hidden_layers=model.layers,
        total_ut_steps=model.loops,
    )


def initial_model(model: Model, scale: Scale, tokenizer: Path, directory: Path) -> Path:
    """``scale.gate_bias``'s fresh model (see there), written in Ouro's format."""
    import torch

    from data_pipelines.tokenizer import load_tokenizer
    from looplm import LoopLMConfig, LoopLMForCausalLM

    vocab = load_tokenizer(str(tokenizer)).get_vocab_size()
    config = LoopLMConfig.from_preset("tiny", **model_settings(model, scale, vocab))
    torch.manual_seed(model.seed)
    network = LoopLMForCausalLM(config)
    with torch.no_grad():
        network.model.early_exit_gate.bias.fill_(scale.gate_bias)
    network.save_pretrained(directory)
    return directory


def initial_dir(model: Model, scale: Scale, out: Path) -> Path | None:
    """Where ``initial_model`` writes the model a run starts from (None: the job's own)."""
    return (
        out / "init" / f"{model.name}-gate{scale.gate_bias}" if starts_fresh(model, scale) else None
    )


def training_objective(model: Model, scale: Scale) -> tuple[str, float]:
    """The job's ``train.objective`` and ``train.beta`` for a model: the last step's loss for
    ``looped_last``, Stage I otherwise, with the entropy regularizer on ``looped`` alone."""
    kind = "last_step" if model.family == "looped_last" else "stage1"
    return kind, scale.beta if model.family == "looped" else 0.0


def starts_fresh(model: Model, scale: Scale) -> bool:
    """Whether the model starts from ``initial_model`` rather than the job's initialization
    (with its gate at 0, the same weights: both seed torch with the model's seed)."""
    return scale.gate_bias is not None and model.family == "looped"


def job_overrides(
    model: Model, scale: Scale, tokenizer: Path | str, run_dir: Path, cache_dir: Path, init=None
):
    """The pre-training job of one model; ``init``: the Ouro-format directory it starts from.
    ``model.vocab_size`` is the tokenizer's, VOCAB where the tokenizer is not made yet."""
    from data_pipelines.tokenizer import is_local_tokenizer, load_tokenizer

    local = is_local_tokenizer(str(tokenizer))
    vocab = load_tokenizer(str(tokenizer)).get_vocab_size() if local else "VOCAB"
    micro_batch = max(1, scale.batch_tokens // (scale.ranks * scale.seq_len))
    steps = scale.steps_of(model.task)
    objective, beta = training_objective(model, scale)
    architecture = model_settings(model, scale, vocab)
    return [
        "model=tiny",
        *(f"model.{name}={value}" for name, value in architecture.items()),
        *([f"init_from={init}"] if init is not None else []),
        "data=embedded",
        f"data.kind={'sft' if answers_only(scale.tasks[model.task]) else 'pretrain'}",
        # the job's default left out, so that the runs of before the setting are the same
        *([f"data.template={scale.template}"] if scale.template != "chatml" else []),
        f"data.tokenizer={tokenizer}",
        f"data.sources=[{{name:{model.task},paths:['{scale.tasks[model.task]}'],format:jsonl}}]",
        f"data.seq_len={scale.seq_len}",
        f"data.seed={model.seed}",
        f"data.cache_dir={cache_dir}",
        f"data.num_workers={scale.workers}",
        # the job's default left out, so that the runs of before the setting are the same
        *(["model.compile=true"] if scale.compile else []),
        f"seed={model.seed}",
        f"train.max_steps={steps}",
        f"train.global_batch_tokens={scale.batch_tokens}",
        f"train.micro_batch_size={micro_batch}",
        f"train.objective={objective}",
        f"train.beta={beta}",
        f"train.log_every={max(1, steps // 10)}",
        f"optim.lr={scale.lr}",
        "optim.weight_decay=0.1",
        "schedule=wsd",
        f"schedule.warmup_steps={scale.warmup}",
        "eval=embedded",
        f"eval.tasks=[{{name:{model.task},source:{model.task}}}]",
        f"eval.num_items={scale.eval_items}",
        f"eval.every_steps={max(1, steps // 4)}",
        "eval.extra_steps=0",
        "eval.batch_size=64",
        f"checkpoint.every_steps={steps}",
        "checkpoint.keep_last=1",
        "logging.wandb=false",
        f"stability={scale.stability}",
        f"deepspeed.precision={scale.precision}",
        f"run_dir={run_dir}",
    ]


def train(
    model: Model, scale: Scale, tokenizer: Path, out: Path, cache_dir: Path, label: str = ""
) -> Path:
    """Runs the pre-training job of one model (unless it finished before with the same
    settings); its run directory. ``label`` heads the line saying which."""
    run_dir = out / "runs" / model.name
    init = initial_dir(model, scale, out)
    overrides = job_overrides(model, scale, tokenizer, run_dir, cache_dir, init)
    finished = run_dir / "finished.json"
    recorded = json.loads(finished.read_text())["overrides"] if finished.is_file() else None
    if recorded is not None and same_job(recorded, overrides):
        print(f"{label}{model.name}: trained before with these settings, not again", flush=True)
        return run_dir
    why = " again: its earlier run had other settings" if recorded is not None else ""
    print(f"{label}{model.name}: training{why}", flush=True)
    if run_dir.exists():  # interrupted, or trained with other settings: trained again
        shutil.rmtree(run_dir)
    shutil.rmtree(out / "models" / model.name, ignore_errors=True)
    run_dir.mkdir(parents=True)
    if init is not None:
        initial_model(model, scale, tokenizer, init)
    command = job_command(scale, overrides, [sys.executable, "-m", "torch.distributed.run",
                                             f"--master_port={_free_port()}"])  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=str(threads_per_rank(scale)), PYTHONPATH=str(REPO))
    start = time.time()
    with open(out / "runs" / f"{model.name}.log", "w") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            code = watch(process, run_dir, scale.steps_of(model.task), f"{label}{model.name}")
        except BaseException:  # the job does not outlive the driver
            process.terminate()
            process.wait()
            raise
    if code != 0:
        tail = (out / "runs" / f"{model.name}.log").read_text()[-3000:]
        raise RuntimeError(f"{model.name}: the training job failed (exit {code}):\n{tail}")
    record = {"seconds": time.time() - start, "overrides": portable(overrides)}
    finished.write_text(json.dumps(record))
    return run_dir


def threads_per_rank(scale: Scale) -> int:
    """The cores this process may use, shared by the ranks of a job (1 on 2 cores, 2 ranks)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // scale.ranks)


def default_ranks(scale: Scale, gpus: int) -> int:
    """One rank per GPU, at most as many as divide the global batch into whole sequences a rank
    (on 7 GPUs the quick grid's 16 sequences a step take 4 ranks); without GPUs the scale's."""
    fitting = [r for r in range(1, gpus + 1) if scale.batch_tokens % (r * scale.seq_len) == 0]
    return max(fitting, default=scale.ranks) if gpus else scale.ranks


def job_command(scale: Scale, overrides: list[str], launcher=("torchrun",)) -> list[str]:
    """The command that trains one model: ``launcher`` (and its options) on ``scale.ranks``."""
    return [*launcher, f"--nproc_per_node={scale.ranks}", "-m", "train.pretrain", *overrides]


def check_jobs(models: list[Model], scale: Scale, out: Path, cache_dir: Path) -> None:
    """Every model's job checked as ``python -m launch`` checks one (its config composed, the
    job's own checks run for its ranks) before anything is made or trained: SystemExit naming
    each problem and its models. A task whose tokenizer is not made yet is checked with the
    shipped tokenizer in its place (the tokenizer changes the vocabulary alone)."""
    from launch.commands import visible_gpus
    from launch.job_check import job_problems

    with contextlib.redirect_stdout(sys.stderr):  # what imports print is not a command
        from train.trainer import device_problem

    found: dict[str, list[str]] = {}
    too_many = device_problem(scale.ranks - 1, visible_gpus())
    if too_many is not None:
        found[f"{too_many}; --set ranks=N chooses, CUDA_VISIBLE_DEVICES= runs on CPU ranks"] = [
            m.name for m in models
        ]
    for model in models:
        tokenizer = tokenizer_path(model.task, scale.tasks[model.task], out)
        overrides = job_overrides(
            model, scale, tokenizer if tokenizer.is_file() else "embedded",
            out / "runs" / model.name, cache_dir,
        )  # fmt: skip
        for problem in job_problems("train.pretrain", overrides, scale.ranks):
            found.setdefault(problem, []).append(model.name)

    def which(names: list[str]) -> str:
        return "every model" if len(names) == len(models) else ", ".join(names)

    if found:
        raise SystemExit(
            f"the grid's jobs ({scale.ranks} ranks each) have problems:\n"
            + "\n".join(f"  - {problem} ({which(names)})" for problem, names in found.items())
        )


class Tail:
    """The complete lines appended to a file since the last call."""

    def __init__(self, path: Path):
        self.path, self.offset = path, 0

    def lines(self) -> list[str]:
        if not self.path.is_file():
            return []
        if self.path.stat().st_size < self.offset:  # rewritten (a rollback): read it anew
            self.offset = 0
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        return complete.decode().splitlines()


def watch(process: subprocess.Popen, run_dir: Path, steps: int, name: str) -> int:
    """Waits for a training job, printing its progress from the run directory: every tenth
    of its steps (loss, time so far, time left at the job's own speed) and every evaluation,
    in the order of their steps. Returns the job's exit code."""
    metrics, evaluations = Tail(run_dir / "metrics.jsonl"), Tail(run_dir / "eval.jsonl")
    start, tenth, shown = time.time(), max(1, steps // 10), 0
    while True:
        try:
            code = process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        events = []
        for record in map(json.loads, metrics.lines()):
            if record["step"] >= shown + tenth or record["step"] == steps:
                shown = record["step"]
                speed = record.get("tokens_per_s") or 0
                left = (steps - shown) * record["tokens"] / shown / speed / 60 if speed else 0
                events.append((shown, 0, f"loss {record['loss']:.3f} ({(time.time() - start) / 60:.1f} "
                                         f"min, about {left:.1f} min left)"))  # fmt: skip
        for record in map(json.loads, evaluations.lines()):
            for task in record["tasks"].values():
                accuracy = " ".join(f"{a:.2f}" for a in task["accuracy_per_step"])
                events.append((record["step"], 1, f"held-out accuracy by step {accuracy}"))
        for step, _, text in sorted(events):
            print(f"{name}: step {step:,}/{steps:,}, {text}", flush=True)
        if code is not None:
            return code


def portable(overrides: list[str]) -> list[str]:
    """The overrides with their reproduction directory (``OUT`` of ``run_dir=OUT/runs/NAME``)
    written as ``$OUT``, so that a directory that was moved or copied still knows its runs
    (those recorded with their paths, as before, too)."""
    (run_dir,) = [o.split("=", 1)[1] for o in overrides if o.startswith("run_dir=")]
    out = Path(run_dir).parent.parent
    return [override.replace(f"{out}/", "$OUT/") for override in overrides]


def same_job(recorded: list[str], overrides: list[str]) -> bool:
    """Whether a finished run's recorded overrides train the model ``overrides`` would: the
    same settings, wherever the directory is now, on any number of ranks (the micro-batch
    follows the ranks; the global batch, which the comparison keeps, does not)."""

    def settings(values: list[str]) -> list[str]:
        return [o for o in portable(values) if not o.startswith("train.micro_batch_size=")]

    return settings(recorded) == settings(overrides)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def result(model: Model, scale: Scale, run_dir: Path, tokenizer: Path, out: Path) -> dict:
    """The model's final evaluation, size and training FLOPs; exports it with its tokenizer."""
    from looplm import LoopLMConfig
    from train.export import export_checkpoint
    from train.metrics import training_flops_per_token

    export = out / "models" / model.name
    if not (export / "config.json").is_file():
        # trained on conversations: a chat model, whose EOS ends its answers
        export_checkpoint(run_dir, export, chat=answers_only(scale.tasks[model.task]))
        shutil.copy(tokenizer, export / "tokenizer.json")
    config = LoopLMConfig.load(export / "config.json")
    exits = answer_exits(model, run_dir, export, out / "cache") if model.loops > 1 else None
    evaluation = [json.loads(line) for line in open(run_dir / "eval.jsonl")][-1]
    scores = evaluation["tasks"][model.task]
    tokens = train_tokens(model, scale)
    return {
        **asdict(model),
        "name": model.name,
        "params": config.num_parameters(),
        "train_tokens": tokens,
        "train_flops": training_flops_per_token(config, scale.seq_len, model.loops) * tokens,
        "accuracy_per_step": scores["accuracy_per_step"][: model.loops],
        "accuracy": scores["accuracy_per_step"][model.loops - 1],
        "loss_per_step": scores.get("loss_per_step", evaluation["loss_per_step"])[: model.loops],
        "n": scores["n"],
        "answer_exit_pdf": exits,
        "seconds": json.loads((run_dir / "finished.json").read_text())["seconds"],
    }


def train_tokens(model: Model, scale: Scale) -> int:
    return scale.steps_of(model.task) * scale.batch_tokens


def answer_exits(model: Model, run_dir: Path, export: Path, cache_dir: Path) -> list[float]:
    """Where the looped model's gate sends each held-out answer: its mean exit distribution
    at the position that predicts the answer's first token (on Mano and p-hop, the whole
    answer; a source whose answer opens with worked reasoning would need another). (The
    job's ``exit_pdf_mean`` also averages tokens every step predicts equally well, such as a
    conversation's closing ``<|im_end|>``, whose exits the entropy term keeps uniform.)"""
    import numpy as np
    import torch
    from omegaconf import OmegaConf

    from data_pipelines.encoding import DocumentEncoder
    from data_pipelines.eval_tasks import build_sequences
    from looplm import LoopLMForCausalLM
    from train.validation import synthetic_paths, task_specs

    cfg = OmegaConf.load(run_dir / "config.yaml")  # the job's held-out set, as its Validator
    # where the files are now (the run's config names them where it ran)
    cfg.data.tokenizer, cfg.data.cache_dir = str(export / "tokenizer.json"), str(cache_dir)
    cfg.data.template = cfg.data.get("template", "chatml")  # runs of before the setting
    encoder = DocumentEncoder.of(cfg.data)
    sequences = build_sequences(
        task_specs(cfg.eval, cfg.data), synthetic_paths(cfg.data), encoder, cfg.data.kind,
        cfg.data.cache_dir,
    )  # fmt: skip
    # each item's first answer
    scored = [s for s in sequences if s.task == model.task and s.loss_mask.any()]
    network = LoopLMForCausalLM.from_pretrained(export).eval()
    total = torch.zeros(model.loops, dtype=torch.float64)
    with torch.no_grad():
        for sequence in scored:
            first = int(np.flatnonzero(sequence.answer_mask)[0])
            prompt = torch.from_numpy(sequence.tokens[:first])[None]
            total += network(prompt, return_all_steps=True).exit_pdf[0, -1].double()
    return (total / len(scored)).tolist()


# ---- the report --------------------------------------------------------------------------


def summary(results: list[dict]) -> list[dict]:
    """Means over seeds of each (task, family, layers, loops)."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["task"], r["family"], r["layers"], r["loops"]), []).append(r)
    rows = []
    for (task, family, layers, loops), runs in groups.items():
        accuracies = [r["accuracy"] for r in runs]
        per_step = _mean_per_step([r["accuracy_per_step"] for r in runs])
        exits = [r.get("answer_exit_pdf") for r in runs]
        rows.append(
            dict(
                task=task,
                family=family,
                layers=layers,
                loops=loops,
                seeds=len(runs),
                params=runs[0]["params"],
                train_flops=runs[0]["train_flops"],
                accuracy=sum(accuracies) / len(accuracies),
                accuracy_min=min(accuracies),
                accuracy_max=max(accuracies),
                accuracy_per_step=per_step,
                answer_exit_pdf=_mean_per_step(exits) if None not in exits else None,
            )
        )
    return rows


def _mean_per_step(lists: list[list[float]]) -> list[float]:
    return [sum(s) / len(s) for s in zip(*lists, strict=True)]


def verdicts(rows: list[dict]) -> list[str]:
    """The targets, checked on the means: looped >= iso_param + 20 points, looped >= iso_flop
    - 10 points, and the looped model's last step above its first (a comparison whose
    baseline was not trained is left out)."""
    lines = []
    for looped in sorted(
        (r for r in rows if r["family"] == "looped"), key=lambda r: (r["task"], r["layers"])
    ):
        task, k = looped["task"], looped["layers"]
        gaps = []
        for family, target in (("iso_param", 0.20), ("iso_flop", -0.10)):
            baseline = [
                r
                for r in rows
                if r["task"] == task
                and r["family"] == family
                and (family == "iso_flop" or r["layers"] == k)
            ]
            if baseline:
                gaps.append(
                    (f"looped - {family}", looped["accuracy"] - baseline[0]["accuracy"], target)
                )
        first_to_last = looped["accuracy_per_step"][-1] - looped["accuracy_per_step"][0]
        gaps.append(("last step - first step", first_to_last, 0.0))
        for what, gap, target in gaps:
            # at or above target (above, for the steps), up to the means' rounding
            met = gap > 1e-9 if target == 0.0 else gap >= target - 1e-9
            bound = "> 0" if target == 0.0 else f">= {100 * target:+.0f}"
            lines.append(
                f"{task}, k={k}: {what} = {100 * gap:+.1f} points (target {bound}): "
                f"{'met' if met else 'NOT met'}"
            )
    return lines


NO_TARGETS = (
    "none: the targets compare the looped family with its baselines, and this grid has no "
    "looped model"
)


def write_report(results: list[dict], scale: Scale, out: Path, command: str) -> list[str]:
    rows = summary(results)
    checks = verdicts(rows)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = [
        f"# Looped vs equal-parameter vs equal-FLOP models (effective depth {scale.depth})",
        "",
        f"`{command}`",
        "",
        "Exact-match accuracy on held-out questions of the hardest length, mean over seeds "
        "(min-max); accuracy by recurrent step for looped models, and where their gate exits "
        "on the answer (mean exit distribution at the answer's first token).",
        "",
        "| task | family | layers x loops | params | train FLOPs | accuracy | by step | "
        "answer exits |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["task"], FAMILIES.index(r["family"]), r["layers"])):
        steps = " / ".join(f"{a:.2f}" for a in r["accuracy_per_step"])
        exits = " / ".join(f"{p:.2f}" for p in r["answer_exit_pdf"] or [])
        lines.append(
            f"| {r['task']} | {r['family']} | {r['layers']} x {r['loops']} | {r['params']:,} | "
            f"{r['train_flops']:.2e} | {r['accuracy']:.3f} ({r['accuracy_min']:.2f}-"
            f"{r['accuracy_max']:.2f}) | {steps} | {exits} |"
        )
    lines += ["", "Targets:", ""] + [f"- {line}" for line in checks or [NO_TARGETS]]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plot(rows, out / "results.png")
    return checks


def legend_label(row: dict) -> str:
    """A family's line in the plot's legend: `looped (1 layer x 3)`, `iso_flop (3 layers)`."""
    layers = f"{row['layers']} layer{'s' if row['layers'] != 1 else ''}"
    loops = f" x {row['loops']}" if row["loops"] > 1 else ""
    return f"{row['family']} ({layers}{loops})"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    tasks = sorted({r["task"] for r in rows})
    figure, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    # one colour per family (lines and points draw theirs from separate cycles)
    colors = dict(zip(FAMILIES, ("C0", "C1", "C2", "C3"), strict=True))
    for axis, task in zip(axes[0], tasks, strict=True):
        for family in FAMILIES:
            for r in (r for r in rows if r["task"] == task and r["family"] == family):
                if r["loops"] > 1:  # accuracy when exiting at each step: depth k, 2k, ...
                    depths = [r["layers"] * (t + 1) for t in range(r["loops"])]
                    axis.plot(
                        depths, r["accuracy_per_step"], marker="o", color=colors[family],
                        label=legend_label(r),
                    )  # fmt: skip
                else:
                    axis.scatter(
                        [r["layers"]], [r["accuracy"]], s=60, marker="s", color=colors[family],
                        label=legend_label(r), zorder=3,
                    )  # fmt: skip
        axis.set_title(task)
        axis.set_xlabel("effective depth (layers applied)")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        deepest = max(r["layers"] * r["loops"] for r in rows if r["task"] == task)
        axis.set_xlim(0.5, deepest + 0.5)  # whole depths, also for a grid of one depth
        axis.set_ylabel("exact-match accuracy, hardest length")
        axis.set_ylim(0, 1)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--task", default="all", choices=["all", *QUICK.tasks])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the CPU-sized grid (on 2 cores: Mano 24 minutes, p-hop 28)",
    )
    parser.add_argument("--out", required=True, help="the output directory")
    parser.add_argument("--seeds", type=int, nargs="*", help="override the grid's seeds")
    parser.add_argument("--steps", type=int, help="override the optimizer steps of every run")
    parser.add_argument("--families", nargs="*", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument(
        "--source", action="append", default=[], metavar="TASK=URI",
        help="another synthetic:// source for a task (e.g. mano=synthetic://mano?ops=6&mod=7)",
    )  # fmt: skip
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="another value of a Scale field (e.g. lr=1e-3, hidden_size=64)")  # fmt: skip
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print each job's command (for a shell), train nothing",
    )
    return parser.parse_args(argv)


def setting_choices(key: str) -> tuple[str, ...] | None:
    """The values the job accepts for a Scale field that names a choice (None: any value)."""
    if key == "precision":
        from train.config import PRECISIONS

        return PRECISIONS
    if key == "template":
        from data_pipelines.tokenizer import TEMPLATES

        return tuple(TEMPLATES)
    if key == "stability":
        return tuple(sorted(path.stem for path in (REPO / "configs" / "stability").glob("*.yaml")))
    return None


def with_setting(scale: Scale, assignment: str) -> Scale:
    """``scale`` with one field set from ``FIELD=VALUE`` (a tuple field takes ``1,2,3``)."""
    key, value = assignment.split("=", 1)
    if key not in Scale.__dataclass_fields__ or key in ("tasks", "task_steps"):
        raise SystemExit(
            f"--set {assignment}: no such setting (--source sets a task's source, --steps the steps)"
        )
    current = getattr(scale, key)
    if isinstance(current, tuple):
        parsed = tuple(int(part) for part in value.split(","))
    elif isinstance(current, bool):
        if value.lower() not in ("true", "false"):
            raise SystemExit(f"--set {assignment}: {key} is true or false")
        parsed = value.lower() == "true"
    elif isinstance(current, int):
        parsed = int(float(value))
        least = 0 if key in ("warmup", "workers") else 1
        if parsed < least:
            raise SystemExit(f"--set {assignment}: {key} must be >= {least}")
    elif current is None:  # an optional number (gate_bias)
        parsed = float(value)
    else:
        parsed = type(current)(value)
    allowed = setting_choices(key)
    if allowed is not None and parsed not in allowed:
        raise SystemExit(f"--set {assignment}: {key} is one of {', '.join(allowed)}")
    cleared = {"task_steps": {}} if key == "steps" else {}  # every task's steps
    return replace(scale, **{key: parsed}, **cleared)


def check_blocks(scale: Scale) -> None:
    """Every block size must divide the depth (SystemExit naming them otherwise)."""
    if not scale.blocks or any(k < 1 or scale.depth % k for k in scale.blocks):
        raise SystemExit(f"block sizes {scale.blocks} must each divide the depth {scale.depth}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    scale = QUICK if args.quick else FULL
    if args.seeds:
        scale = replace(scale, seeds=tuple(args.seeds))
    if args.steps is not None:
        scale = with_setting(scale, f"steps={args.steps}")
    for assignment in args.set:
        scale = with_setting(scale, assignment)
    check_blocks(scale)
    for assignment in args.source:
        task, uri = assignment.split("=", 1)
        synthetic.parse_uri(uri)
        scale = replace(scale, tasks={**scale.tasks, task: uri})
    if not any(assignment.startswith("ranks=") for assignment in args.set):
        from launch.commands import visible_gpus

        scale = replace(scale, ranks=default_ranks(scale, visible_gpus()))
    tasks = list(scale.tasks) if args.task == "all" else [args.task]
    out = Path(args.out).resolve()  # the jobs run in the repository
    cache_dir = out / "cache"
    models = grid(scale, tasks, args.families)
    command = "python scripts/reproduce.py " + " ".join(sys.argv[1:] if argv is None else argv)
    steps = ", ".join(f"{task} {scale.steps_of(task)}" for task in tasks)
    print(f"{len(models)} models: tasks {tasks}, depth {scale.depth}, blocks {scale.blocks}, "
          f"seeds {scale.seeds}, steps of {scale.batch_tokens} tokens: {steps}; "
          f"{scale.ranks} ranks a job", flush=True)  # fmt: skip
    check_jobs(models, scale, out, cache_dir)
    if args.dry_run:  # each job's command, for a shell, as train() starts it
        if any(not tokenizer_path(t, scale.tasks[t], out).is_file() for t in tasks):
            print("# VOCAB: the size of the task's tokenizer, which a run without --dry-run makes")
        inits = [initial_dir(model, scale, out) for model in models]
        if any(init is not None and not init.is_dir() for init in inits):
            print(
                "# init_from: the model with the gate's bias, which a run without --dry-run makes"
            )
        threads = f"OMP_NUM_THREADS={threads_per_rank(scale)}"
        for model, init in zip(models, inits, strict=True):
            tokenizer = tokenizer_path(model.task, scale.tasks[model.task], out)
            overrides = job_overrides(
                model, scale, tokenizer, out / "runs" / model.name, cache_dir, init
            )
            print(f"# {model.name}\n{threads} {shlex.join(job_command(scale, overrides))}")
        return
    out.mkdir(parents=True, exist_ok=True)
    results, start = [], time.time()
    for index, model in enumerate(models, 1):
        uri = scale.tasks[model.task]
        tokenizer = task_tokenizer(model.task, uri, out, cache_dir)
        run_dir = train(model, scale, tokenizer, out, cache_dir, f"[{index}/{len(models)}] ")
        record = result(model, scale, run_dir, tokenizer, out)
        results.append(record)
        steps = " ".join(f"{a:.2f}" for a in record["accuracy_per_step"])
        print(
            f"[{index}/{len(models)}] {model.name}: accuracy by step {steps} "
            f"({record['params']:,} params, {record['seconds']:.0f} s; "
            f"{(time.time() - start) / 60:.1f} min so far)",
            flush=True,
        )
    checks = write_report(results, scale, out, command)
    print(f"done in {(time.time() - start) / 60:.1f} min: {out / 'results.md'}")
    for line in checks or [f"targets: {NO_TARGETS}"]:
        print("  " + line)


if __name__ == "__main__":
    main()
