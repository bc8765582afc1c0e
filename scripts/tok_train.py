"""Train the BPE tokenizer on the training shards and report its compression.

python -m scripts.tok_train --data-dir DIR --out DIR --vocab-size 8192
"""

from __future__ import annotations

import argparse
import sys
import time

from nanochat.dataset import DatasetError, chunk_table, read_row_group, val_chunks
from nanochat.paths import resolve
from nanochat.tokenizer import Tokenizer, TokenizerError, iter_texts


def training_texts(data_dir, doc_cap: int):
    """Documents of the training shards in order, each cropped to doc_cap characters (as
    nanochat: a few very long documents must not dominate the pair statistics)."""
    for c in chunk_table(data_dir):
        for text in read_row_group(data_dir, c.shard, c.row_group):
            yield text[:doc_cap]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data-dir", default="data", help="shards (relative paths live under $CURTAIL_HOME)"
    )
    parser.add_argument(
        "--out", default="tokenizer", help="where tokenizer.json + token_bytes.pt go"
    )
    parser.add_argument("--vocab-size", type=int, default=8192, help="including special tokens")
    parser.add_argument("--max-chars", type=int, default=2_000_000_000, help="training text budget")
    parser.add_argument("--doc-cap", type=int, default=10_000, help="max characters per document")
    args = parser.parse_args(argv)
    data_dir, out = resolve(args.data_dir), resolve(args.out)
    try:
        t0 = time.time()
        texts = iter_texts(training_texts(data_dir, args.doc_cap), args.max_chars)
        tok = Tokenizer.train(texts, args.vocab_size)
        train_s = time.time() - t0
        tok.save(out)
        val = [
            t for c in val_chunks(data_dir) for t in read_row_group(data_dir, c.shard, c.row_group)
        ]
    except (DatasetError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n_bytes = sum(len(t.encode("utf-8")) for t in val)
    n_tokens = sum(len(ids) for ids in tok.encode(val))
    print(f"trained vocab {tok.vocab_size} in {train_s:.1f}s -> {out}")
    print(
        f"validation shard: {n_bytes:,} bytes -> {n_tokens:,} tokens = {n_bytes / n_tokens:.2f} bytes/token"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
