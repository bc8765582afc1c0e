"""Span algebra on half-open [start, end) spans of epoch seconds: union, difference, clip, length."""

from __future__ import annotations

from collections.abc import Iterable

Span = tuple[float, float]


def union(spans: Iterable[Span]) -> list[Span]:
    """Sorted disjoint spans covering the input; touching spans merge (a re-reported span is a no-op)."""
    out: list[list[float]] = []
    for s, e in sorted((float(s), float(e)) for s, e in spans if e > s):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def subtract(spans: Iterable[Span], cut: Iterable[Span]) -> list[Span]:
    """`spans` minus `cut`, both taken as unions."""
    cut = union(cut)
    out: list[Span] = []
    for s, e in union(spans):
        cur = s
        for cs, ce in cut:
            if ce <= cur or cs >= e:
                continue
            if cs > cur:
                out.append((cur, cs))
            cur = max(cur, ce)
        if cur < e:
            out.append((cur, e))
    return out


def clip(spans: Iterable[Span], start: float, end: float) -> list[Span]:
    return [(max(s, start), min(e, end)) for s, e in spans if min(e, end) > max(s, start)]


def seconds(spans: Iterable[Span]) -> float:
    return float(sum(e - s for s, e in spans))
