"""Train the BPE tokenizer on the training shards and save it to <base>/tokenizer.

    python -m scripts.tok_train [--vocab_size=65536] [--max_chars=2000000000] [--doc_cap=10000]

The validation shard is never seen in training; a sample of it measures compression (bytes per token).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from nanochat.cli import ArgParser, run_main
from nanochat.dataset import data_dir, iter_texts, train_val_shards
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer, tokenizer_dir

EVAL_CHARS = 2_000_000  # how much of the validation shard the compression figure is measured on


def capped_texts(shards: list[Path], max_chars: int, doc_cap: int) -> Iterator[str]:
    """Documents cut to doc_cap characters (so a few huge ones cannot dominate), max_chars in total."""
    left = max_chars
    for text in iter_texts(shards):
        text = text[: min(doc_cap, left)]
        left -= len(text)
        yield text
        if left <= 0:
            return


def main(argv: Sequence[str] | None = None) -> None:
    parser = ArgParser(prog="python -m scripts.tok_train", description=__doc__.splitlines()[0])
    parser.add_argument("--vocab_size", type=int, default=65536, help="vocabulary size, including the special tokens")
    parser.add_argument("--max_chars", type=int, default=2_000_000_000, help="train on at most this many chars")
    parser.add_argument("--doc_cap", type=int, default=10_000, help="use at most this many chars of each doc")
    args = parser.parse_args(argv)
    if args.vocab_size < 256 + len(SPECIAL_TOKENS):
        parser.error(f"--vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (256 bytes + the special tokens),"
                     f" got {args.vocab_size}")  # fmt: skip
    if args.max_chars < 1 or args.doc_cap < 1:
        parser.error("--max_chars and --doc_cap must be positive")

    train, val = train_val_shards(data_dir())
    print(f"training a {args.vocab_size:,}-token tokenizer on {len(train)} shard(s) in {data_dir()}", flush=True)
    seen = 0

    def counted() -> Iterator[str]:
        nonlocal seen
        for text in capped_texts(train, args.max_chars, args.doc_cap):
            seen += len(text)
            yield text

    t0 = time.time()
    tok = Tokenizer.train(counted(), args.vocab_size)
    elapsed = time.time() - t0
    out = tokenizer_dir()
    tok.save(out)
    print(f"vocab size {tok.vocab_size:,} from {seen:,} chars in {elapsed:.1f}s; saved to {out}")
    if tok.vocab_size < args.vocab_size:
        print(f"note: the data supported only {tok.vocab_size:,} tokens; use more data for a larger vocabulary")

    sample = list(iter_texts([val], max_chars=EVAL_CHARS))
    nbytes = sum(len(t.encode("utf-8")) for t in sample)
    ntokens = sum(len(ids) for ids in tok.encode_batch(sample))
    ratio = nbytes / max(ntokens, 1)
    print(f"compression on {val.name} (validation): {ratio:.2f} bytes/token ({nbytes:,} bytes, {ntokens:,} tokens)")


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
