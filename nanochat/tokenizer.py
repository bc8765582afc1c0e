"""BPE tokenizer: trained by our Rust `rustbpe`, encoded by tiktoken.

rustbpe learns the merges (fast, parallel); the resulting mergeable ranks are handed to a
tiktoken Encoding, which encodes much faster than any Python code. Special tokens follow
nanochat and sit right after the learned ranks.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import tiktoken
import torch

SPECIAL_TOKENS = [
    "<|bos|>",  # every document starts with it; the loader's packing aligns rows to it
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|output_start|>",
    "<|output_end|>",
]

# GPT-4's split pattern except numbers split into groups of at most 2 digits (nanochat: with
# small vocabularies, fewer 3-digit number tokens is a better use of the budget).
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""

RANKS_FILE = "tokenizer.json"
TOKEN_BYTES_FILE = "token_bytes.pt"


class TokenizerError(ValueError):
    pass


class Tokenizer:
    def __init__(self, mergeable_ranks: dict[bytes, int], pattern: str = SPLIT_PATTERN):
        self.mergeable_ranks = mergeable_ranks
        self.pattern = pattern
        offset = len(mergeable_ranks)
        self.special_tokens = {name: offset + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.enc = tiktoken.Encoding(
            name="curtail-bpe",
            pat_str=pattern,
            mergeable_ranks=mergeable_ranks,
            special_tokens=self.special_tokens,
        )
        self.bos_token_id = self.special_tokens["<|bos|>"]

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, trainer: Any = None) -> Tokenizer:
        """Learn vocab_size - len(SPECIAL_TOKENS) byte-level merges from texts.

        trainer: an object with rustbpe.Tokenizer's interface (train_from_iterator, get_pattern,
        get_mergeable_ranks); defaults to a fresh rustbpe.Tokenizer().
        """
        n_learned = vocab_size - len(SPECIAL_TOKENS)
        if n_learned < 256:
            raise TokenizerError(
                f"vocab_size={vocab_size} is too small: need >= {256 + len(SPECIAL_TOKENS)} "
                "(256 byte tokens + specials)"
            )
        if trainer is None:
            import rustbpe  # the compiled extension; imported here so encoding never needs it

            trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(iter(texts), n_learned, pattern=SPLIT_PATTERN)
        ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
        return cls(ranks, trainer.get_pattern())

    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab

    def encode(
        self, text: str | list[str], prepend: int | str | None = None, num_threads: int = 4
    ) -> list[int] | list[list[int]]:
        """Encode one text or a batch (ordinary text: special-token strings are not parsed).
        prepend: a token id or special-token name put at the start of each result."""
        if isinstance(prepend, str):
            prepend = self.special_tokens[prepend]
        if isinstance(text, str):
            ids = self.enc.encode_ordinary(text)
            return [prepend, *ids] if prepend is not None else ids
        batch = self.enc.encode_ordinary_batch(text, num_threads=num_threads)
        if prepend is not None:
            for ids in batch:
                ids.insert(0, prepend)
        return batch

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(ids)

    def token_bytes(self) -> torch.Tensor:
        """int64 (vocab_size,) byte length of each token, 0 for special tokens: the
        denominator of bits-per-byte, which unlike loss compares across vocabularies."""
        out = torch.zeros(self.vocab_size, dtype=torch.int64)
        for token, rank in self.mergeable_ranks.items():
            out[rank] = len(token)
        return out

    def save(self, directory: str | Path) -> Path:
        """Write tokenizer.json (base64 ranks + pattern) and token_bytes.pt into directory."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        ranks = sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1])
        payload = {
            "pattern": self.pattern,
            "special_tokens": SPECIAL_TOKENS,
            "ranks": [base64.b64encode(token).decode("ascii") for token, _ in ranks],
        }
        if [r for _, r in ranks] != list(range(len(ranks))):
            raise TokenizerError("mergeable ranks are not a contiguous 0..n-1 range")
        tmp = d / (RANKS_FILE + ".tmp")
        tmp.write_text(json.dumps(payload))
        tmp.replace(d / RANKS_FILE)
        torch.save(self.token_bytes(), d / TOKEN_BYTES_FILE)
        return d

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        path = Path(directory) / RANKS_FILE
        if not path.is_file():
            raise TokenizerError(
                f"no tokenizer at {path}: train one with `python -m scripts.tok_train`"
            )
        payload = json.loads(path.read_text())
        if payload.get("special_tokens") != SPECIAL_TOKENS:
            raise TokenizerError(f"{path}: special tokens differ from this code's SPECIAL_TOKENS")
        ranks = {base64.b64decode(t): i for i, t in enumerate(payload["ranks"])}
        return cls(ranks, payload["pattern"])


def iter_texts(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    """Yield texts until max_chars characters have been yielded (the last one cropped)."""
    left = max_chars
    for text in texts:
        if left <= 0:
            return
        yield text[:left]
        left -= len(text)
