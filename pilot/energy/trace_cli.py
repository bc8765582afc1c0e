"""Command line for MCI traces: write a seeded synthetic one, or validate trace files.

    python -m pilot.energy.trace_cli synth --regions CAISO_NORTH,SPP_TX,NEM_SA --hours 48 --seed 1 --out F
    python -m pilot.energy.trace_cli check F [--threshold 100]

Both print a per-region summary (range, curtailment windows below the threshold); exit code 2
with a one-line error for a trace that cannot be used.
"""

from __future__ import annotations

import argparse
import sys

from pilot.energy.synthetic import SYNTH_START, synthetic
from pilot.energy.traces import (
    DEFAULT_MAX_GAP_S,
    UNITS,
    Trace,
    TraceError,
    iso,
    load_trace,
    save_wide_csv,
    windows,
)


def _summary(trace: Trace, threshold: float) -> str:
    lines = [
        f"{len(trace.regions)} regions, {len(trace.times)} points, step {trace.step:.0f} s, "
        f"{iso(trace.start)} .. {iso(trace.end)} ({(trace.end - trace.start) / 3600:.1f} h)"
    ]
    for r in trace.regions:
        v = trace.row(r)
        w = windows(trace.times, v, threshold)
        below_h = sum(b - a for a, b in w) / 3600
        lines.append(
            f"  {r:<14} min {v.min():6.1f}  mean {v.mean():6.1f}  max {v.max():6.1f} g/kWh  "
            f"{len(w)} windows < {threshold:g} ({below_h:.1f} h)"
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m pilot.energy.trace_cli", description=__doc__.split("\n")[0]
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("synth", help="write a seeded synthetic wide CSV")
    s.add_argument("--regions", default="CAISO_NORTH,SPP_TX,NEM_SA")
    s.add_argument("--hours", type=float, default=48.0)
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--start", default=SYNTH_START, help="ISO timestamp with offset")
    s.add_argument("--step", type=float, default=300.0, help="seconds between points")
    s.add_argument("--threshold", type=float, default=100.0)
    s.add_argument("--utc-offset", action="append", default=[], metavar="REGION=HOURS")
    s.add_argument(
        "--gusts",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="short wind-driven dips below the threshold at any hour (default: on)",
    )
    s.add_argument(
        "--marginal",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="marginal-emission levels: jumps at window edges, excursions (default: on)",
    )
    s.add_argument("--out", required=True)
    c = sub.add_parser("check", help="validate trace file(s) and print a summary")
    c.add_argument("paths", nargs="+")
    c.add_argument("--regions", default=None)
    c.add_argument("--units", default=None, choices=list(UNITS))
    c.add_argument("--max-gap", type=float, default=DEFAULT_MAX_GAP_S)
    c.add_argument("--threshold", type=float, default=100.0)
    return ap


def _utc_offsets(pairs: list[str]) -> dict[str, float]:
    """``--utc-offset REGION=HOURS`` flags -> {region: hours}."""
    offsets = {}
    for kv in pairs:
        k, _, v = kv.partition("=")
        try:
            offsets[k] = float(v)
        except ValueError:
            raise TraceError(f"--utc-offset {kv!r}: expected REGION=HOURS, e.g. DE=+1") from None
    return offsets


def _synth(a: argparse.Namespace) -> Trace:
    trace = synthetic(
        a.regions.split(","),
        a.hours,
        a.seed,
        a.start,
        a.step,
        a.threshold,
        _utc_offsets(a.utc_offset),
        gusts=a.gusts,
        marginal=a.marginal,
    )
    save_wide_csv(trace, a.out)
    print(f"wrote {a.out}")
    return trace


def _check(a: argparse.Namespace) -> Trace:
    regions = a.regions.split(",") if a.regions else None
    return load_trace(a.paths, regions, a.max_gap, a.units)


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    try:
        trace = _synth(a) if a.cmd == "synth" else _check(a)
        print(_summary(trace, a.threshold))
    except TraceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
