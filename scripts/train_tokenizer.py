"""Train a byte-level BPE tokenizer with Ouro's special tokens on any data source.

`<|endoftext|>`, `<|im_start|>` and `<|im_end|>` get ids 0, 1 and 2.

    # the tokenizer shipped in data_pipelines/assets, from the embedded corpus
    python scripts/train_tokenizer.py --data-config configs/data/embedded.yaml \\
        --vocab-size 8192 --out data_pipelines/assets/tokenizer.json --skip-bad-input
    # from files
    python scripts/train_tokenizer.py --paths "corpus/*.jsonl" --format jsonl --out tok.json
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import replace

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data_pipelines.config import (
    DataConfig,
    SourceConfig,
    load_data_config,
    validate_data_config,
)
from data_pipelines.readers import BadInputError, BadInputLog, ReadOptions, parse_record, read_raw
from data_pipelines.shards import resolve_shards
from data_pipelines.tokenizer import SPECIAL_TOKENS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-config", help="YAML of the data group whose sources to train on")
    parser.add_argument("--paths", nargs="*", default=[], help="files, globs, directories or URLs")
    parser.add_argument("--format", default="auto")
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--text-split", default="paragraph", choices=["file", "paragraph", "line"])
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--max-documents", type=int, default=200_000, help="per source")
    parser.add_argument("--out", required=True, help="where to write tokenizer.json")
    parser.add_argument(
        "--skip-bad-input",
        action="store_true",
        help="skip (and count) unusable records and files instead of stopping at the first "
        "(empty documents are always skipped and counted)",
    )
    return parser.parse_args(argv)


def sources_of(args: argparse.Namespace) -> tuple[list[SourceConfig], DataConfig]:
    """The sources to train on, from a data config or from the command line."""
    if args.data_config:
        cfg = load_data_config(args.data_config)
        return cfg.sources, cfg
    if not args.paths:
        raise SystemExit("give --data-config or --paths")
    source = SourceConfig(
        name="corpus",
        paths=args.paths,
        format=args.format,
        text_field=args.text_field,
        text_split=args.text_split,
    )
    return [source], DataConfig(sources=[source])


def documents(source: SourceConfig, cfg: DataConfig, limit: int, log: BadInputLog) -> Iterator[str]:
    """Up to `limit` texts of `source`, read in shard order; a bad record (or a file without
    the field) stops the run, or with a skipping `log` is counted and skipped."""
    options = ReadOptions(
        source.text_field, source.text_split, cfg.max_retries, cfg.retry_backoff_s
    )
    count = 0
    for shard in resolve_shards(source, cfg.cache_dir):
        for record in read_raw(shard, 0, options, log):
            text = parse_record(record, shard, options, "pretrain", log)
            if text is not None:
                yield text
                count += 1
                if count == limit:
                    return


class _StopAtUnusable(BadInputLog):
    """Counts empty documents (an empty file, a blank line: nothing to learn from, nothing
    lost) and stops at any other bad record: a file without the field, a malformed or
    undecodable record, a truncated file."""

    def report(self, kind: str, where: str, detail: str) -> None:
        if kind != "empty_document":
            raise BadInputError(f"{where}: {kind.replace('_', ' ')}: {detail}")
        super().report(kind, where, detail)


def build_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE tokenizer (GPT-2 style pre-tokenization)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def main() -> None:
    args = parse_args()
    sources, cfg = sources_of(args)
    tokenizer = build_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )

    log = BadInputLog("skip") if args.skip_bad_input else _StopAtUnusable("skip")

    def corpus() -> Iterator[str]:
        for source in sources:
            yield from documents(source, cfg, args.max_documents, log)

    problems = validate_data_config(replace(cfg, sources=sources))
    if problems:
        raise SystemExit("invalid sources:\n  " + "\n  ".join(problems))
    try:
        tokenizer.train_from_iterator(corpus(), trainer)
    except BadInputError as error:
        raise SystemExit(
            f"error: {error} (--skip-bad-input skips and counts such records)"
        ) from None
    if log.counts:
        print(f"skipped: {dict(log.counts)}")
    for index, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == index, f"{token} is not id {index}"
    tokenizer.save(args.out)
    print(f"wrote {args.out}: vocabulary {tokenizer.get_vocab_size()}")


if __name__ == "__main__":
    main()
