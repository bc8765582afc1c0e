"""Energy co-simulation: per-site MCI + power in Vessim, published into Redis.

    CURTAIL_REDIS_URL=redis://:PW@127.0.0.1:6379/0 \\
        python energy_simulation.py --sites configs/sites.toml --run demo --speedup 60

--speedup 1 runs in real time, S > 1 runs S times faster, 0 as fast as possible. SIGINT or
SIGTERM stop it cleanly (meta.status = stopped); the end of the span sets status = finished.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from pilot import energy
from pilot.signals import Signals, connect, redact
from pilot.sites import FORECASTER_NAMES, load_sites
from pilot.traces import load_trace, parse_time

DEFAULT_SITES = Path(__file__).resolve().parent / "configs" / "sites.toml"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sites", default=str(DEFAULT_SITES), help="sites TOML")
    ap.add_argument(
        "--trace", default=None, help="trace CSV(s), comma-separated (default: the sites file's)"
    )
    ap.add_argument(
        "--redis-url", default=None, help="default: $CURTAIL_REDIS_URL (prefer the env var)"
    )
    ap.add_argument("--run", default="demo", help="run name: keys live under curtail:<run>:")
    ap.add_argument("--threshold", type=float, default=None, help="gCO2/kWh (default: sites file)")
    ap.add_argument("--start", default=None, help="ISO time with offset (default: trace start)")
    ap.add_argument("--hours", type=float, default=None, help="default: until the trace ends")
    ap.add_argument("--step", type=int, default=60, help="tick in simulated seconds")
    ap.add_argument("--speedup", type=float, default=1.0, help="sim s per wall s; 0 = unpaced")
    ap.add_argument("--forecaster", default=None, choices=FORECASTER_NAMES)
    ap.add_argument("--horizon", type=float, default=None, help="forecast horizon (s)")
    ap.add_argument("--record", default=None, help="directory for Vessim's experiment record")
    ap.add_argument("--fresh", action="store_true", help="delete the run's existing keys first")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    try:
        sites = load_sites(a.sites)
        trace_arg = a.trace.split(",") if a.trace else sites.trace
        if trace_arg is None:
            raise ValueError(f"{a.sites}: no trace; pass --trace")
        trace = load_trace(trace_arg, regions=sorted({s.region for s in sites.sites}))
        start = trace.start if a.start is None else parse_time(a.start)
        hours = (trace.end - start) / 3600.0 if a.hours is None else a.hours
        if a.step <= 0 or a.speedup < 0 or hours <= 0:
            raise ValueError("--step and --hours must be > 0 and --speedup >= 0")
        cfg = energy.SimConfig(
            run=a.run,
            start=start,
            hours=hours,
            step_s=a.step,
            speedup=a.speedup,
            threshold=sites.threshold if a.threshold is None else a.threshold,
            forecaster=a.forecaster or sites.forecaster,
            horizon_s=sites.horizon_s if a.horizon is None else a.horizon,
            trace_source=",".join(str(t) for t in trace_arg)
            if isinstance(trace_arg, list)
            else str(trace_arg),
        )
        trace.require(cfg.start, cfg.end)
        r = connect(a.redis_url)
        sig = Signals(r, a.run)
    except (ValueError, ConnectionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if a.fresh:
        sig.clear()
    stop = threading.Event()
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda *_: stop.set())
    url = a.redis_url or "$CURTAIL_REDIS_URL"
    print(
        f"energy simulation run={a.run} sites={','.join(sites.names)} redis={redact(url)} "
        f"{cfg.hours:g} h from {energy.iso(cfg.start)} step={cfg.step_s}s speedup={cfg.speedup:g}",
        flush=True,
    )
    summary = energy.run(
        sig, sites, trace, cfg, stop, Path(a.record) if a.record else None, not a.quiet
    )
    kwh = ", ".join(f"{s} {wh / 1000:.3f} kWh" for s, wh in summary["energy_wh"].items())
    print(
        f"{summary['status']}: {summary['ticks']} ticks in {summary['wall_s']:.1f} s wall; {kwh}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
