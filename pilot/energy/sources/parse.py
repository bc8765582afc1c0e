"""Checked access to provider JSON: every problem becomes a DataError that says where."""

from __future__ import annotations

import math
from typing import Any

from pilot.energy.sources.base import DataError, Series
from pilot.energy.traces import parse_time


def field(obj: Any, key: str, kind: type, where: str) -> Any:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if key not in obj:
        raise DataError(f"{where}: field {key!r} missing")
    if not isinstance(obj[key], kind):
        raise DataError(f"{where}: field {key!r} is {type(obj[key]).__name__}, not {kind.__name__}")
    return obj[key]


def number(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
        raise DataError(f"{where}: {v!r} is not an intensity (a finite number >= 0)")
    return float(v)


def time_of(v: Any, where: str) -> float:
    if not isinstance(v, str):
        raise DataError(f"{where}: timestamp {v!r} is not a string")
    try:
        return parse_time(v)
    except ValueError as exc:
        raise DataError(f"{where}: {exc}") from None


def points(items: list[Any], time_key: str, value_key: str, where: str) -> Series:
    """[(t, value)] from a list of objects; refuses empty, unsorted or duplicate series."""
    if not items:
        raise DataError(f"{where}: no data points")
    out: Series = []
    for i, p in enumerate(items):
        at = f"{where} point {i}"
        t = time_of(field(p, time_key, str, at), at)
        if out and t <= out[-1][0]:
            order = "duplicate" if t == out[-1][0] else "out-of-order"
            raise DataError(f"{at}: {order} timestamp {p[time_key]}")
        out.append((t, number(field(p, value_key, object, at), at)))
    return out
