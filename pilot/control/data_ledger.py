"""Exactly-once data ledger over dataset chunks (parquet row groups).

Pure bookkeeping, no I/O: the ServerApp leases chunks to sites, and commits what a site
consumed only when that site's reply was aggregated into the global model. A lost or rejected
reply releases its lease, so its rows go back to the pool and are trained on by someone else.

Offsets are absolute row positions inside a chunk: a site that gets ``start_rows[key] = 40``
and replies ``consumed[key] = 70`` trained on rows 40..69. Committing an offset is monotone,
so a reply can never move a chunk backwards or count rows twice.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field


class LedgerError(ValueError):
    """A reply's consumed-rows report contradicts the ledger (wrong site, range, or chunk)."""


def chunk_key(shard: int, row_group: int) -> str:
    """Wire/ledger name of a chunk: ``"<shard>:<row_group>"``."""
    return f"{shard}:{row_group}"


@dataclass
class Assignment:
    """Chunks leased to one site for one TRAIN message, in the order they should be read."""

    site: str
    chunks: list[tuple[int, int, int]] = field(default_factory=list)
    start_rows: dict[str, int] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        """Rows left to read in this assignment."""
        return sum(rows - self.start_rows.get(chunk_key(s, g), 0) for s, g, rows in self.chunks)

    def to_dict(self) -> dict:
        return {
            "site": self.site,
            "chunks": [list(c) for c in self.chunks],
            "start_rows": dict(self.start_rows),
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> Assignment:
        return cls(
            site=str(d["site"]),
            chunks=[(int(s), int(g), int(r)) for s, g, r in d["chunks"]],
            start_rows={str(k): int(v) for k, v in d["start_rows"].items()},
        )


class DataLedger:
    """Which rows of which chunk are consumed (committed) and which chunk is leased to whom."""

    def __init__(self, chunks: Iterable[Sequence[int]]):
        self._rows: dict[str, int] = {}
        self._order: list[tuple[int, int, int]] = []
        for shard, row_group, rows in chunks:
            key = chunk_key(int(shard), int(row_group))
            if key in self._rows:
                raise LedgerError(f"duplicate chunk {key} in the chunk table")
            if int(rows) <= 0:
                raise LedgerError(f"chunk {key} has {rows} rows; expected > 0")
            self._rows[key] = int(rows)
            self._order.append((int(shard), int(row_group), int(rows)))
        self._done: dict[str, int] = dict.fromkeys(self._rows, 0)
        self._lease: dict[str, str] = {}

    # -- queries ------------------------------------------------------------------------------
    @property
    def exhausted(self) -> bool:
        """True when every row of every chunk is committed."""
        return all(self._done[k] >= n for k, n in self._rows.items())

    @property
    def num_chunks(self) -> int:
        return len(self._order)

    @property
    def total_rows(self) -> int:
        return sum(self._rows.values())

    @property
    def committed_rows(self) -> int:
        return sum(self._done.values())

    def committed(self) -> dict[str, int]:
        """Committed absolute row offset per chunk key."""
        return dict(self._done)

    def leased_to(self, site: str) -> list[str]:
        return [k for k, s in self._lease.items() if s == site]

    def free_rows(self) -> int:
        """Rows neither committed nor leased: what a new assignment could still get."""
        return sum(n - self._done[k] for k, n in self._rows.items() if k not in self._lease)

    # -- transitions --------------------------------------------------------------------------
    def assign(
        self, site: str, max_chunks: int, max_rows: int | None = None, min_chunks: int = 1
    ) -> Assignment:
        """Lease up to ``max_chunks`` free chunks (and about ``max_rows`` rows) to ``site``.

        Partly consumed chunks come first so that a chunk is finished before new ones are
        opened; then chunks in table order. At least ``min_chunks`` chunks are leased while
        any are free (a multi-GPU site needs one per rank), whatever ``max_rows`` says.
        """
        if max_chunks < 1:
            raise LedgerError(f"max_chunks must be >= 1, got {max_chunks}")
        free = [
            c
            for c in self._order
            if (k := chunk_key(c[0], c[1])) not in self._lease and self._done[k] < c[2]
        ]
        free.sort(key=lambda c: self._done[chunk_key(c[0], c[1])] == 0)  # stable: partial first
        out = Assignment(site=site)
        for shard, row_group, rows in free:
            if len(out.chunks) >= max_chunks:
                break
            if max_rows is not None and len(out.chunks) >= min_chunks and out.rows >= max_rows:
                break
            key = chunk_key(shard, row_group)
            self._lease[key] = site
            out.chunks.append((shard, row_group, rows))
            out.start_rows[key] = self._done[key]
        return out

    def check(self, site: str, consumed: Mapping[str, int]) -> int:
        """Validate a consumed-rows report from ``site`` without changing anything.

        Returns the number of rows it would newly commit; raises LedgerError when a chunk is
        unknown, not leased to this site, or the offset is outside [committed, chunk rows].
        """
        new = 0
        for key, offset in consumed.items():
            if key not in self._rows:
                raise LedgerError(f"site {site!r} reports unknown chunk {key!r}")
            if self._lease.get(key) != site:
                raise LedgerError(f"site {site!r} reports chunk {key} that is not leased to it")
            offset = int(offset)
            if not self._done[key] <= offset <= self._rows[key]:
                raise LedgerError(
                    f"site {site!r} reports offset {offset} for chunk {key}; expected "
                    f"{self._done[key]}..{self._rows[key]}"
                )
            new += offset - self._done[key]
        return new

    def commit(self, site: str, consumed: Mapping[str, int]) -> int:
        """Commit the rows ``site`` consumed (its reply was aggregated) and end its lease.

        Chunks of the lease that were not (fully) read return to the pool at their new offset.
        Returns the number of newly committed rows.
        """
        new = self.check(site, consumed)
        for key, offset in consumed.items():
            self._done[key] = int(offset)
        self.release(site)
        return new

    def release(self, site: str) -> list[str]:
        """End ``site``'s lease without committing (lost, rejected or discarded reply)."""
        keys = self.leased_to(site)
        for key in keys:
            del self._lease[key]
        return keys

    # -- persistence --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Checkpoint state. Leases are not saved: in-flight work dies with the server."""
        return {"chunks": [list(c) for c in self._order], "done": dict(self._done)}

    @classmethod
    def from_dict(cls, d: Mapping) -> DataLedger:
        ledger = cls(d["chunks"])
        for key, offset in d["done"].items():
            if key not in ledger._rows or not 0 <= int(offset) <= ledger._rows[key]:
                raise LedgerError(f"checkpointed ledger has invalid offset {key}={offset}")
            ledger._done[key] = int(offset)
        return ledger
