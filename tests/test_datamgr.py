"""Exactly-once data ledger: leases, commits, lost replies, persistence."""

import random

import pytest

from pilot.control.data_ledger import Assignment, DataLedger, LedgerError, chunk_key

CHUNKS = [(0, 0, 100), (0, 1, 100), (1, 0, 50), (1, 1, 80)]


def test_assign_is_exclusive_and_prefers_partial_chunks():
    led = DataLedger(CHUNKS)
    a = led.assign("A", max_chunks=2)
    b = led.assign("B", max_chunks=2)
    assert {chunk_key(s, g) for s, g, _ in a.chunks}.isdisjoint(
        {chunk_key(s, g) for s, g, _ in b.chunks}
    )
    assert led.assign("C", max_chunks=1).chunks == []  # all leased
    led.commit("A", {"0:0": 60})  # partial: 0:0 back at row 60, 0:1 untouched
    c = led.assign("C", max_chunks=1)
    assert c.chunks == [(0, 0, 100)] and c.start_rows == {"0:0": 60}
    assert c.rows == 40


def test_assign_max_rows_limits_but_gives_at_least_one_chunk():
    led = DataLedger(CHUNKS)
    a = led.assign("A", max_chunks=10, max_rows=1)
    assert len(a.chunks) == 1
    b = led.assign("B", max_chunks=10, max_rows=120)
    assert [c[:2] for c in b.chunks] == [(0, 1), (1, 0)]
    c = led.assign("C", max_chunks=10, max_rows=1, min_chunks=2)
    assert [c[:2] for c in c.chunks] == [(1, 1)]  # only one chunk left


def test_commit_rejects_inconsistent_reports():
    led = DataLedger(CHUNKS)
    led.assign("A", max_chunks=1)
    led.assign("B", max_chunks=1)
    with pytest.raises(LedgerError, match="not leased"):
        led.commit("A", {"0:1": 10})
    with pytest.raises(LedgerError, match="unknown"):
        led.commit("A", {"9:9": 10})
    with pytest.raises(LedgerError, match="offset"):
        led.commit("A", {"0:0": 101})
    assert led.committed_rows == 0  # failed commits change nothing
    led.commit("A", {"0:0": 30})
    led.assign("A", max_chunks=1)
    with pytest.raises(LedgerError, match="offset"):
        led.commit("A", {"0:0": 20})  # backwards


def test_lost_reply_returns_rows_to_pool():
    led = DataLedger(CHUNKS)
    a = led.assign("A", max_chunks=4)
    assert led.free_rows() == 0
    assert sorted(led.release("A")) == sorted(chunk_key(s, g) for s, g, _ in a.chunks)
    assert led.free_rows() == led.total_rows and led.committed_rows == 0


def test_exactly_once_under_random_schedule_with_losses():
    """Simulate sites that read rows, some replies lost; every row is trained exactly once
    among the *committed* replies, and the ledger ends exhausted."""
    rng = random.Random(0)
    led = DataLedger(CHUNKS)
    seen: dict[str, list[int]] = {}
    for _ in range(200):
        if led.exhausted:
            break
        site = rng.choice("ABC")
        a = led.assign(site, max_chunks=rng.randint(1, 3))
        consumed, rows_read = {}, {}
        budget = rng.randint(1, 120)
        for s, g, n in a.chunks:
            key = chunk_key(s, g)
            start = a.start_rows[key]
            take = min(n - start, budget)
            budget -= take
            consumed[key] = start + take
            rows_read[key] = list(range(start, start + take))
            if budget == 0:
                break
        if rng.random() < 0.25:
            led.release(site)  # reply lost: nothing committed
            continue
        led.commit(site, consumed)
        for key, rows in rows_read.items():
            seen.setdefault(key, []).extend(rows)
    assert led.exhausted
    for s, g, n in CHUNKS:
        assert sorted(seen[chunk_key(s, g)]) == list(range(n))


def test_persistence_roundtrip_drops_leases():
    led = DataLedger(CHUNKS)
    led.assign("A", max_chunks=1)
    led.commit("A", {"0:0": 100})
    led.assign("B", max_chunks=1)
    back = DataLedger.from_dict(led.to_dict())
    assert back.committed() == led.committed()
    assert back.leased_to("B") == []
    assert back.free_rows() == led.total_rows - 100
    with pytest.raises(LedgerError):
        DataLedger.from_dict({"chunks": CHUNKS, "done": {"0:0": 500}})


def test_assignment_json_roundtrip_and_bad_tables():
    a = Assignment("A", [(0, 1, 10)], {"0:1": 3})
    assert Assignment.from_dict(a.to_dict()) == a
    with pytest.raises(LedgerError, match="duplicate"):
        DataLedger([(0, 0, 1), (0, 0, 2)])
    with pytest.raises(LedgerError, match="rows"):
        DataLedger([(0, 0, 0)])
