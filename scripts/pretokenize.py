"""Turn a data source into pre-tokenized binary shards (the loader's fast path).

One output shard per input file, tokenized in parallel; read the result back with a source
whose path is the output directory (format `tokens`, or `auto`). `tokens.json` is written
last, so a directory without it is an unfinished run. The output directory must be empty:
`--overwrite` removes the pre-tokenized files of an earlier run there first (other files are
left alone).

    python scripts/pretokenize.py --data-config configs/data/embedded.yaml \\
        --source python_stdlib --out /data/tokens/python_stdlib --procs 8
    python scripts/pretokenize.py --paths "/data/web/*.jsonl.zst" --tokenizer embedded \\
        --out /data/tokens/web
"""

from __future__ import annotations

import argparse
import dataclasses
import os

from tqdm import tqdm

from data_pipelines.config import DataConfig, SourceConfig, load_data_config, validate_data_config
from data_pipelines.shards import resolve_shards
from data_pipelines.tokenized import OutputNotEmptyError, pretokenize


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-config", help="YAML of the data group holding the source")
    parser.add_argument("--source", help="name of the source in --data-config")
    parser.add_argument("--paths", nargs="*", default=[], help="files, globs, directories or URLs")
    parser.add_argument("--format", default="auto")
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--text-split", default="paragraph", choices=["file", "paragraph", "line"])
    parser.add_argument(
        "--tokenizer",
        help="tokenizer.json, or `embedded` (default: the data config's, else embedded)",
    )
    parser.add_argument("--on-bad-input", choices=["skip", "error"], help="default: skip")
    parser.add_argument(
        "--max-document-chars",
        type=int,
        help="longer documents are tokenized in pieces (default: 1,000,000)",
    )
    parser.add_argument("--procs", type=int, default=os.cpu_count(), help="parallel processes")
    parser.add_argument("--out", required=True, help="output directory (empty or absent)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="remove the pre-tokenized files (tokens.json, *.bin, *.idx.npy) already in --out",
    )
    return parser.parse_args(argv)


def source_and_config(args: argparse.Namespace) -> tuple[SourceConfig, DataConfig]:
    """The source to convert and the data settings (tokenizer, bad-input policy, document
    limit) to use: the data config's, or the defaults, each overridden by its option when
    given."""
    given = {
        "tokenizer": args.tokenizer,
        "on_bad_input": args.on_bad_input,
        "max_document_chars": args.max_document_chars,
    }
    given = {name: value for name, value in given.items() if value is not None}
    if args.data_config:
        cfg = load_data_config(args.data_config)
        matching = [source for source in cfg.sources if source.name == args.source]
        if not matching:
            raise SystemExit(f"--source must be one of {[source.name for source in cfg.sources]}")
        return matching[0], dataclasses.replace(cfg, **given)
    if not args.paths:
        raise SystemExit("give --data-config with --source, or --paths")
    source = SourceConfig(
        name=os.path.basename(os.path.normpath(args.out)),
        paths=args.paths,
        format=args.format,
        text_field=args.text_field,
        text_split=args.text_split,
    )
    return source, DataConfig(sources=[source], **given)


def main() -> None:
    args = parse_args()
    source, cfg = source_and_config(args)
    problems = validate_data_config(DataConfig(**{**vars(cfg), "sources": [source]}))
    if problems:
        raise SystemExit("invalid source:\n  " + "\n  ".join(problems))
    num_shards = len(resolve_shards(source, cfg.cache_dir))
    totals = {"tokens": 0, "documents": 0}
    with tqdm(total=num_shards, unit="shard", desc=f"pretokenizing {source.name}") as bar:

        def progress(tokens: int, documents: int, shards: int) -> None:
            totals.update(tokens=tokens, documents=documents)
            bar.update(shards - bar.n)
            bar.set_postfix(tokens=f"{tokens:,}", documents=f"{documents:,}")

        try:
            bad = pretokenize(source, cfg, args.out, max(args.procs, 1), progress, args.overwrite)
        except OutputNotEmptyError as error:
            raise SystemExit(str(error)) from None
    print(
        f"wrote {num_shards} shards, {totals['documents']:,} documents, {totals['tokens']:,} tokens to {args.out}"
    )
    long = bad.pop("long_document", 0)
    if long:
        print(f"{long:,} documents over {cfg.max_document_chars:,} characters tokenized in pieces")
    if bad:
        print(f"skipped bad records: {dict(bad)}")


if __name__ == "__main__":
    main()
