"""How much data a site is leased: sized by its measured read rate for the time it has, what
a site that paused mid-round still holds to resume with, and what a closing round commits.
Pure functions over the data ledger and a round."""

from __future__ import annotations

import math
from collections.abc import Iterable

from pilot.control.data_ledger import Assignment, DataLedger, chunk_key
from pilot.control.rounds import Reply, Round


def lease(
    ledger: DataLedger,
    site: str,
    readers: int,
    rate: float | None,
    train_s: float,
    first_chunks: int,
    slack: float,
    world: int | None = None,
) -> Assignment:
    """Lease ``site`` data for ``train_s`` wall seconds of training: for the whole site (one
    chunk per reader at least), or for one of its ``world`` ranks (a refill, one reader).
    Without a measured ``rate`` (rows per wall second) a first lease is ``first_chunks``."""
    if rate is None:
        max_chunks, max_rows = max(first_chunks, readers), None
    else:  # enough rows for the time left at the measured read rate, with slack
        max_chunks = ledger.num_chunks
        share = rate / max(1, world or 1)
        max_rows = math.ceil(share * max(0.0, train_s) * slack) + 1
    return ledger.assign(site, max_chunks=max_chunks, max_rows=max_rows, min_chunks=readers)


def unread_rest(r: Round, before: Reply) -> Assignment:
    """The unread rest of a paused site's lease (still leased to it until the round closes),
    to resume with: each chunk from where the site stopped reading it."""
    prev = r.participants[before.site].assignment
    out = Assignment(site=before.site)
    for chunk in prev.chunks:
        key = chunk_key(chunk[0], chunk[1])
        at = max(prev.start_rows.get(key, 0), before.consumed.get(key, 0))
        if at < chunk[2]:
            out.chunks.append(chunk)
            out.start_rows[key] = at
    return out


def commit(ledger: DataLedger, replies: Iterable[Reply]) -> dict[str, dict[str, list[int]]]:
    """Commit every reply's rows read; returns the ranges made permanent, site -> chunk ->
    ``[from, to)``, so exactly-once can be audited from the round's event alone."""
    out: dict[str, dict[str, list[int]]] = {}
    for rep in replies:
        done = ledger.committed()
        ledger.commit(rep.site, rep.consumed)
        out[rep.site] = {k: [done[k], v] for k, v in rep.consumed.items() if v > done[k]}
    return out
