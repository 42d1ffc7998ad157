"""Peak memory of the loader on one long document, with and without `max_document_chars`.

A JSONL file holds a few short documents and one document of `--mb` megabytes (a single
line). Each measurement runs in its own process, which builds the training loader on the
file and draws batches until it has read past the long document; its peak resident memory
(`ru_maxrss`) and time are printed:

- bounded: the default `data.max_document_chars` (the document is tokenized in pieces);
- unbounded (the baseline): `max_document_chars` above the document's length, so the
  tokenizer is given the whole document at once, as before the setting existed.

    python scripts/bench_long_document.py            # about two minutes on two cores
    python scripts/bench_long_document.py --mb 10
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

WORDS = "looped language model token data the of a recurrent step exit gate".split()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mb", type=float, default=50.0, help="megabytes of the long document")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--limit", type=int, help=argparse.SUPPRESS)
    return parser.parse_args()


def write_corpus(path: Path, mb: float) -> int:
    """Short documents around one long one; returns the long one's length in characters."""
    rng = np.random.default_rng(0)
    words = rng.choice(WORDS, size=int(mb * 2**20 / 5))
    text = " ".join(words)
    with open(path, "w") as file:
        for index in range(8):
            file.write(json.dumps({"text": f"short document {index} " * 20}) + "\n")
        file.write(json.dumps({"text": text}) + "\n")
        for index in range(64):
            file.write(json.dumps({"text": f"another short document {index} " * 20}) + "\n")
    return len(text)


def measure(path: str, limit: int | None) -> None:
    """In the child: the loader over `path` until past the long document; prints JSON."""
    from data_pipelines.config import DataConfig, SourceConfig
    from data_pipelines.loader import build_data_loader

    settings = {} if limit is None else {"max_document_chars": limit}
    cfg = DataConfig(
        sources=[SourceConfig(name="long", paths=[path])],
        seq_len=2048,
        num_workers=0,
        shuffle=False,
        **settings,
    )
    start = time.perf_counter()
    batches = iter(build_data_loader(cfg, rank=0, world_size=1, micro_batch_size=1))
    next(batches)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_bytes": peak, "seconds": seconds}))


def run(path: Path, limit: int | None) -> dict:
    command = [sys.executable, __file__, "--measure", str(path)]
    if limit is not None:
        command += ["--limit", str(limit)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    args = parse_args()
    if args.measure:
        measure(args.measure, args.limit)
        return
    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / "long.jsonl"
        chars = write_corpus(path, args.mb)
        print(f"one document of {chars:,} characters among 72 short ones")
        rows = {"bounded (default)": run(path, None), "unbounded (baseline)": run(path, chars + 1)}
    for name, row in rows.items():
        print(f"{name:22s} peak {row['peak_bytes'] / 2**30:6.2f} GiB   {row['seconds']:6.1f} s")
    bounded, unbounded = rows.values()
    print(
        f"peak memory: bounded / unbounded = {bounded['peak_bytes'] / unbounded['peak_bytes']:.2f}; "
        f"time: {bounded['seconds'] / unbounded['seconds']:.2f}"
    )


if __name__ == "__main__":
    main()
