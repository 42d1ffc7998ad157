"""Throughput of the data pipeline against raw tokenization and the common baseline.

Measured in one run, on one core and on all cores, over the same documents (Python standard
library sources as code, plus synthetic multi-hop QA, written as JSONL):

- raw: `Tokenizer.encode_batch` on the documents already in memory;
- tokenizer alone: `Tokenizer.encode_batch_fast` (no offsets), the call the streamed path
  makes, on the documents in memory: the ceiling of any pipeline built on this tokenizer;
- streamed: this package's loader (read, tokenize, pack, mix two sources), tokens/s after
  its first batch;
- baseline: `datasets.load_dataset("json")` + `.map(batched=True)` tokenization, then
  concatenate-and-chunk, the way HF's run_clm example does it (cache building included);
- pre-tokenized: the loader on `scripts/pretokenize.py`-style shards of the same sources,
  read in the training process (num_workers=0) in both columns.

    python scripts/bench_data.py                 # about three minutes on two cores
    python scripts/bench_data.py --code-mb 32    # a bigger corpus

Each measurement runs in its own process, pinned to one core or given all of them. The four
columns are measured in turn `--repeats` times and each keeps its best run, so that load
from other processes on a shared machine, which only ever slows a run down, falls on every
column alike.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from itertools import chain
from pathlib import Path

SEQ_LEN = 2048
MICRO_BATCH = 8
COLUMNS = ("raw", "tokenizer", "streamed", "baseline", "pretokenized")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--code-mb", type=float, default=6.0, help="megabytes of stdlib sources")
    parser.add_argument("--qa-docs", type=int, default=20000, help="synthetic multi-hop documents")
    parser.add_argument("--work-dir", help="where to write the corpus (default: a temporary dir)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each measurement")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--cores", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, default=0, help=argparse.SUPPRESS)
    return parser.parse_args()


def write_corpus(work_dir: Path, code_mb: float, qa_docs: int) -> None:
    """JSONL shards of stdlib files (one document each) and of synthetic multi-hop QA."""
    from data_pipelines.synthetic import materialize

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))
    code_dir, budget = work_dir / "code", int(code_mb * 2**20)
    code_dir.mkdir(parents=True)
    shards = [open(code_dir / f"part-{i}.jsonl", "w") for i in range(4)]
    for index, path in enumerate(file for file in files if "site-packages" not in str(file)):
        text = path.read_text(errors="replace")
        if not text.strip():
            continue
        shards[index % 4].write(json.dumps({"text": text}) + "\n")
        budget -= len(text)
        if budget <= 0:
            break
    for shard in shards:
        shard.close()
    qa_dir = work_dir / "qa"
    qa_dir.mkdir()
    for path in materialize(
        f"synthetic://multi_hop?num_docs={qa_docs}&shards=4", str(work_dir / "cache")
    ):
        os.link(path, qa_dir / Path(path).name)


def corpus_config(work_dir: Path, subdir: str, num_workers: int):
    from data_pipelines import DataConfig, SourceConfig

    sources = [
        SourceConfig(name="code", paths=[str(work_dir / subdir / "code")], weight=0.5),
        SourceConfig(name="qa", paths=[str(work_dir / subdir / "qa")], weight=0.5),
    ]
    return DataConfig(sources=sources, seq_len=SEQ_LEN, num_workers=num_workers, shuffle_window=256)


def documents(work_dir: Path) -> list[str]:
    paths = sorted((work_dir / "code").glob("*.jsonl")) + sorted((work_dir / "qa").glob("*.jsonl"))
    return [json.loads(line)["text"] for path in paths for line in path.open()]


def measure_raw(work_dir: Path, cores: int, tokens: int, fast: bool = False) -> dict:
    from data_pipelines.tokenizer import load_tokenizer

    texts, tokenizer = documents(work_dir), load_tokenizer("embedded")
    tokenizer.encode_special_tokens = fast  # as the pipeline's encoder sets it
    encode = tokenizer.encode_batch_fast if fast else tokenizer.encode_batch
    start = time.perf_counter()
    count = sum(
        len(encoding.ids) + 1
        for i in range(0, len(texts), 1024)
        for encoding in encode(texts[i : i + 1024], add_special_tokens=False)
    )
    return {"tokens": count, "seconds": time.perf_counter() - start}


def measure_loader(work_dir: Path, subdir: str, num_workers: int, tokens: int) -> dict:
    from data_pipelines import build_data_loader

    cfg = corpus_config(work_dir, subdir, num_workers)
    iterator = iter(build_data_loader(cfg, rank=0, world_size=1, micro_batch_size=MICRO_BATCH))
    next(iterator)
    batches = max(tokens // (SEQ_LEN * MICRO_BATCH), 1)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return {"tokens": batches * SEQ_LEN * MICRO_BATCH, "seconds": time.perf_counter() - start}


def measure_baseline(work_dir: Path, cores: int, tokens: int) -> dict:
    import datasets

    from data_pipelines.tokenizer import load_tokenizer

    datasets.disable_progress_bars()
    tokenizer = load_tokenizer("embedded")
    cache_dir = work_dir / f"hf-cache-{cores}"
    shutil.rmtree(cache_dir, ignore_errors=True)
    start = time.perf_counter()
    files = [str(path) for path in sorted(work_dir.glob("[cq]*/*.jsonl"))]
    dataset = datasets.load_dataset(
        "json", data_files=files, split="train", cache_dir=str(cache_dir)
    )

    def tokenize(batch):
        return {
            "input_ids": [encoding.ids + [0] for encoding in tokenizer.encode_batch(batch["text"])]
        }

    def group(batch):
        joined = list(chain.from_iterable(batch["input_ids"]))
        total = len(joined) // SEQ_LEN * SEQ_LEN
        chunks = [joined[i : i + SEQ_LEN] for i in range(0, total, SEQ_LEN)]
        return {"input_ids": chunks, "labels": [list(chunk) for chunk in chunks]}

    num_proc = cores if cores > 1 else None
    common = {"batched": True, "num_proc": num_proc, "load_from_cache_file": False}
    tokenized = dataset.map(tokenize, remove_columns=dataset.column_names, **common)
    grouped = tokenized.map(group, **common)
    return {"tokens": len(grouped) * SEQ_LEN, "seconds": time.perf_counter() - start}


def measure_pretokenized(work_dir: Path, cores: int, tokens: int) -> dict:
    """In the training process on any number of cores: reading memory-mapped shards is a
    copy, cheaper than moving the batch from a worker process."""
    return measure_loader(work_dir, "tokens", 0, tokens * 20)


def run_child(args: argparse.Namespace) -> None:
    if args.cores == 1:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    work_dir = Path(args.work_dir)
    measures = {
        "raw": measure_raw,
        "tokenizer": lambda work, cores, tokens: measure_raw(work, cores, tokens, fast=True),
        "baseline": measure_baseline,
        "pretokenized": measure_pretokenized,
        "streamed": lambda work, cores, tokens: measure_loader(
            work, "", 0 if cores == 1 else cores, tokens
        ),
    }
    print(json.dumps(measures[args.measure](work_dir, args.cores, args.tokens)))


def run_measure(work_dir: Path, measure: str, cores: int, tokens: int = 0) -> float:
    """Tokens/s of one measurement, run in a fresh process with the right parallelism."""
    env = dict(
        os.environ,
        TOKENIZERS_PARALLELISM="true" if measure in ("raw", "tokenizer") and cores > 1 else "false",
    )
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")])
    )
    command = [
        sys.executable,
        __file__,
        "--measure",
        measure,
        "--cores",
        str(cores),
        "--work-dir",
        str(work_dir),
        "--tokens",
        str(tokens),
    ]
    output = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    result = json.loads(output.strip().splitlines()[-1])
    return result["tokens"] / result["seconds"]


def pretokenize_corpus(work_dir: Path, cores: int) -> None:
    from data_pipelines.tokenized import pretokenize

    cfg = corpus_config(work_dir, "", 0)
    for source in cfg.sources:
        out = str(work_dir / "tokens" / source.name)
        pretokenize(source, cfg, out, num_procs=cores, overwrite=True)


def report(rows: dict[str, dict[int, float]], all_cores: int) -> None:
    print(f"\nbest of each\n{'pipeline':<16}{'1 core tok/s':>16}{f'{all_cores} cores tok/s':>18}")
    for name, speeds in rows.items():
        print(f"{name:<16}{speeds[1]:>16,.0f}{speeds[all_cores]:>18,.0f}")
    print(f"\n{'ratio':<34}{'1 core':>10}{f'{all_cores} cores':>12}{'target':>10}")
    for label, top, bottom, target in (
        ("streamed / raw encode_batch", "streamed", "raw", ">= 0.8"),
        ("streamed / datasets.map baseline", "streamed", "baseline", ">= 2"),
        ("streamed / tokenizer alone", "streamed", "tokenizer", "<= 1"),
        ("tokenizer alone / baseline", "tokenizer", "baseline", "ceiling"),
        ("pre-tokenized / streamed", "pretokenized", "streamed", ">= 50"),
    ):
        ratios = [rows[top][cores] / rows[bottom][cores] for cores in (1, all_cores)]
        print(f"{label:<34}{ratios[0]:>10.2f}{ratios[1]:>12.2f}{target:>10}")


def main() -> None:
    args = parse_args()
    if args.measure:
        run_child(args)
        return
    all_cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as scratch:
        work_dir = Path(args.work_dir or scratch)
        write_corpus(work_dir, args.code_mb, args.qa_docs)
        pretokenize_corpus(work_dir, all_cores)
        rows: dict[str, dict[int, float]] = {name: {} for name in COLUMNS}
        for cores in sorted({1, all_cores}):
            tokens = 0
            for _ in range(args.repeats):
                for name in COLUMNS:
                    speed = run_measure(work_dir, name, cores, tokens)
                    print(f"{name} on {cores} core(s): {speed:,.0f} tokens/s", flush=True)
                    rows[name][cores] = max(speed, rows[name].get(cores, 0.0))
                    # The same token budget in every run: four seconds of the first raw one.
                    tokens = tokens or int(speed * 4)
        report(rows, all_cores)


if __name__ == "__main__":
    main()
