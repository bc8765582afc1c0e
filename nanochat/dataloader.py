"""Token batches from parquet shards: BOS-aligned packing, DDP striding, exact resume.

Documents are read in order, chunk (row group) by chunk, tokenised a row group at a time with
tiktoken's batch encoder, and packed into rows of T+1 tokens:

- every row starts with a document's <|bos|>, so no row starts mid-document;
- packing "greedy": documents are appended in order while they fit; the first one that does
  not fit is cropped to fill the row exactly (its tail is dropped and counted in
  stats["cropped_tokens"]);
- packing "bestfit": the loader holds the next BESTFIT_DOCS documents and fills each row with
  the longest held document that fits the room left, cropping the shortest one only when none
  fits, so far fewer tokens are cut off. The held documents (read, not yet trained on) are in
  stats["held_tokens"]; they are lost if the loader stops without its cursor being resumed;
- documents are read strictly in order, so what has been read is always a prefix of each
  chunk. That makes both the cursor (next document, plus the held ones) and consumed() (rows
  read per chunk, what the data ledger commits) exact, and a resumed loader yields the same
  batches as one that never stopped.

Rank r of a world of size W reads chunks[r::W] of its chunk list, then any chunks its refill
callback hands it (more data leased mid-round).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from nanochat.dataset import Chunk, DatasetError, chunk_table, read_row_group, val_chunks
from nanochat.tokenizer import Tokenizer

PACKINGS = ("greedy", "bestfit")
# Documents best-fit chooses among: more fill rows better but are held (read, untrained) longer.
BESTFIT_DOCS = 32


def chunk_key(shard: int, row_group: int) -> str:
    return f"{shard}:{row_group}"


class DataLoader:
    def __init__(
        self,
        tokenizer: Tokenizer,
        data_dir: str | Path,
        B: int,
        T: int,
        chunks: Sequence[Sequence[int]] | None = None,
        start_rows: dict[str, int] | None = None,
        rank: int = 0,
        world: int = 1,
        cursor: dict | list[dict] | None = None,
        split: str = "train",
        loop: bool = False,
        device: str | torch.device = "cpu",
        refill: Callable[[], tuple[Sequence[Sequence[int]], dict[str, int]]] | None = None,
        packing: str = "greedy",
    ):
        """chunks: (shard, row_group, rows) triples to read (default: all training chunks, or
        the validation shard for split="val"); start_rows: rows already consumed per chunk key
        "shard:row_group" (from the data ledger); cursor: a cursor() of this rank, or a list of
        them indexed by rank, to resume exactly; loop: restart at the first chunk when the data
        ends (epochs) instead of stopping; refill: called when this rank's chunks are read,
        returns more (chunks, start_rows) for this rank to read next, or no chunks to stop;
        packing: "greedy" or "bestfit" (see the module docstring)."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', not {split!r}")
        if packing not in PACKINGS:
            raise ValueError(f"packing must be one of {PACKINGS}, not {packing!r}")
        self.tokenizer, self.data_dir, self.B, self.T = tokenizer, Path(data_dir), B, T
        self.loop, self.device, self.refill = loop, torch.device(device), refill
        if chunks is None:
            chunks = chunk_table(data_dir) if split == "train" else val_chunks(data_dir)
        self.chunks = [Chunk(*c) for i, c in enumerate(chunks) if i % world == rank]
        if not self.chunks:
            raise DatasetError(
                f"rank {rank} of {world} has no chunks to read in {data_dir} ({len(chunks)} chunks)"
            )
        self.start_rows = dict(start_rows or {})
        self.packing = packing
        self.stats = {"docs": 0, "tokens": 0, "cropped_tokens": 0, "held_tokens": 0, "batches": 0}
        self._docs: list[list[int]] = []  # tokenised documents of the cached chunk
        self._docs_chunk: tuple[int, int] | None = None  # (epoch, pos) of the cached chunk
        self._held: list[tuple[dict, list[int]]] = []  # bestfit: (where it was read, tokens)
        self._read_all = False
        self.epoch, self.pos = 0, 0
        self.row = self._start_row(0)
        if cursor is not None:
            self._seek(cursor[rank] if isinstance(cursor, list) else cursor)

    def _start_row(self, pos: int) -> int:
        c = self.chunks[pos]
        return min(self.start_rows.get(chunk_key(c.shard, c.row_group), 0), c.rows)

    def _seek(self, cursor: dict) -> None:
        keys = [(c.shard, c.row_group) for c in self.chunks]
        try:
            self.pos = keys.index((cursor["shard"], cursor["row_group"]))
        except ValueError:
            raise DatasetError(
                f"cursor {cursor} points at a chunk this loader does not read (rank/world or data dir changed?)"
            ) from None
        self.epoch, self.row = cursor["epoch"], cursor["row"]
        for ref in cursor.get("held", []):
            if (ref["shard"], ref["row_group"]) not in keys:
                raise DatasetError(
                    f"cursor holds a document of a chunk this loader does not read: {ref}"
                )
            pos = keys.index((ref["shard"], ref["row_group"]))
            self._held.append((ref, self._chunk_docs(ref["epoch"], pos)[ref["row"]]))
        self.stats["held_tokens"] = sum(len(doc) for _, doc in self._held)

    def cursor(self) -> dict:
        """Where the next document comes from; JSON-serialisable."""
        c = self.chunks[self.pos]
        here = {"epoch": self.epoch, "shard": c.shard, "row_group": c.row_group, "row": self.row}
        return {**here, "held": [ref for ref, _ in self._held]} if self._held else here

    def consumed(self) -> dict[str, int]:
        """Rows read so far per chunk key "shard:row_group" (== chunk rows when complete),
        including the rows consumed before this loader started. First epoch only."""
        out = {}
        for i, c in enumerate(self.chunks):
            if self.epoch > 0 or i < self.pos:
                rows = c.rows
            elif i == self.pos:
                rows = self.row
            else:
                rows = self._start_row(i)
            out[chunk_key(c.shard, c.row_group)] = rows
        return out

    def _next_doc(self) -> list[int]:
        while self.row >= self.chunks[self.pos].rows:
            if self.pos + 1 < len(self.chunks) or self._refilled():
                self.pos += 1
            elif self.loop:
                self.pos, self.epoch = 0, self.epoch + 1
                self.row = 0  # start_rows only apply to the first pass
                continue
            else:
                raise StopIteration
            self.row = self._start_row(self.pos) if self.epoch == 0 else 0
        doc = self._chunk_docs(self.epoch, self.pos)[self.row]
        self.row += 1
        self.stats["docs"] += 1
        return doc

    def _chunk_docs(self, epoch: int, pos: int) -> list[list[int]]:
        """The tokenised documents of chunk ``pos`` (the last one read is cached)."""
        if self._docs_chunk != (epoch, pos):
            c = self.chunks[pos]
            texts = read_row_group(self.data_dir, c.shard, c.row_group)
            if len(texts) != c.rows:
                raise DatasetError(
                    f"chunk {chunk_key(c.shard, c.row_group)} has {len(texts)} rows, expected {c.rows}"
                )
            self._docs = self.tokenizer.encode(texts, prepend=self.tokenizer.bos_token_id)
            self._docs_chunk = (epoch, pos)
        return self._docs

    def _refilled(self) -> bool:
        """Append the chunks refill() hands out (first epoch only); True if there were any."""
        if self.refill is None or self.epoch > 0:
            return False
        chunks, start_rows = self.refill()
        self.start_rows.update(start_rows)
        self.chunks.extend(Chunk(*c) for c in chunks)
        return bool(chunks)

    def _greedy(self, room: int) -> list[int]:
        return self._next_doc()

    def _bestfit(self, room: int) -> list[int]:
        """The longest held document that fits ``room`` (the first of equals, so it is
        deterministic), else the shortest one, to be cropped; tops up the held ones first."""
        while len(self._held) < BESTFIT_DOCS and not self._read_all:
            try:
                doc = self._next_doc()
            except StopIteration:
                self._read_all = True  # ask refill() once, as greedy packing does
                break
            c = self.chunks[self.pos]
            ref = {"epoch": self.epoch, "shard": c.shard, "row_group": c.row_group}
            self._held.append(({**ref, "row": self.row - 1}, doc))
        if not self._held:
            raise StopIteration
        sizes = [len(doc) for _, doc in self._held]
        fits = [i for i, n in enumerate(sizes) if n <= room]
        i = max(fits, key=sizes.__getitem__) if fits else sizes.index(min(sizes))
        _, doc = self._held.pop(i)
        self.stats["held_tokens"] = sum(sizes) - sizes[i]
        return doc

    def __iter__(self) -> DataLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each int64 (B, T); targets are inputs shifted by one token."""
        width = self.T + 1
        rows = torch.empty((self.B, width), dtype=torch.int64)
        pick = self._greedy if self.packing == "greedy" else self._bestfit
        for b in range(self.B):
            filled = 0
            while filled < width:
                doc = pick(width - filled)
                take = min(len(doc), width - filled)
                rows[b, filled : filled + take] = torch.tensor(doc[:take], dtype=torch.int64)
                self.stats["cropped_tokens"] += len(doc) - take
                filled += take
        self.stats["tokens"] += self.B * self.T
        self.stats["batches"] += 1
        if self.device.type == "cuda":
            rows = rows.pin_memory().to(self.device, non_blocking=True)
        return rows[:, :-1], rows[:, 1:]
