"""What-if simulator: replay a curtailment policy over a trace, no Flower, no GPU.

    python -m pilot.analysis.simulate --trace FILE --sites FILE [--policy prototype|forecast|oracle]
        [--forecaster NAME] [--forecasts FILE] [--threshold X] [--start T] [--hours H]
        [--tick S] [--json OUT] [--plot OUT.png] [--events OUT.jsonl] [--compare]

A live run replays from its record (pilot.energy.sources.record): ``--trace DIR/trace.csv
--forecaster recorded --forecasts DIR/forecasts.csv`` decides on what the run saw, its
provider's forecasts included.

The replay runs the policy's array path (pilot.control.policy.simulate_batch: the decisions of
Policy.step, numpy over sites x ticks) and turns the decision arrays into the events a live run
emits (schema: pilot/analysis/report.py), which the carbon ledger folds into energy and emissions, the
same code the ServerApp's ledger runs. Power model: a site asked to provision draws `idle_kw`
from that tick, is ready `provision_delay_s` later (zero for the oracle), draws `train_kw`
while the policy trains it, and nothing once released. With the default 60 s tick a 240 s
delay is exact; a delay that is not a multiple of the tick is rounded up to the next tick.

`replay(events, ...)` goes the other way: the events of a real run through the power model
and the ledger, to check a live ledger against the simulator (they must agree within 1%).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pilot.config.sites import FORECASTER_NAMES
from pilot.energy.carbon import Ledger, union, windows
from pilot.events.schema import make_event

POLICIES = ("prototype", "forecast", "oracle")
# --compare: (row label, policy, forecaster); the oracle first, every ratio is against it
COMPARE_RUNS = (
    ("oracle", "oracle", None),
    ("prototype", "prototype", None),
    ("ours: persistence", "forecast", "persistence"),
    ("ours: noisy", "forecast", "noisy"),
    ("ours: perfect", "forecast", "perfect"),
)
# At one instant: close before open, so a release and a re-provision keep their order.
_ORDER = {
    "run_start": 0,
    "mode": 1,
    "train_interval": 2,
    "deprovision": 3,
    "provision_decided": 4,
    "provision_started": 5,
    "provision_complete": 6,
    "run_end": 9,
}


def with_threshold(sites_config: Any, threshold: float | None) -> Any:
    if threshold is None or threshold == sites_config.threshold:
        return sites_config
    return dataclasses.replace(sites_config, threshold=float(threshold))


def _edges(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tick indices where a boolean row turns on, and where it turns off (len(x): still on)."""
    d = np.diff(np.concatenate([[False], x, [False]]).astype(np.int8))
    return np.flatnonzero(d == 1), np.flatnonzero(d == -1)


def run(
    trace: Any,
    sites_config: Any,
    policy_name: str = "forecast",
    *,
    start: float | None = None,
    end: float | None = None,
    threshold: float | None = None,
    tick_s: float = 60.0,
    forecaster: str | None = None,
    forecasts: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Replay `policy_name` over [start, end) and return the events a live run would emit.
    `forecasts`: the recorded forecasts.csv of forecaster "recorded" (default: the sites
    config's)."""
    from pilot.control import policy as pol
    from pilot.energy.sources.record import forecaster as make_forecaster

    cfg = with_threshold(sites_config, threshold)
    sites = list(cfg.sites)
    start = float(trace.start) if start is None else float(start)
    end = float(trace.end) if end is None else float(end)
    if not float(trace.start) <= start < end <= float(trace.end):
        raise ValueError(
            f"simulated span [{start:.0f}, {end:.0f}) is not inside the trace "
            f"[{trace.start:.0f}, {trace.end:.0f}]: pick another --start/--hours"
        )
    if not tick_s > 0:
        raise ValueError(f"--tick {tick_s} must be > 0 seconds")
    pcfg = pol.policy_config(cfg, policy_name)
    forecaster = forecaster or cfg.forecaster
    regions = [s.region for s in sites]
    ticks = np.arange(start, end, tick_s)
    mci = np.stack([np.asarray(trace.series(r, ticks), dtype=np.float64) for r in regions])
    fca = None
    if pcfg.use_forecast:
        fc = make_forecaster(cfg, forecaster, trace, forecasts)
        fca = pol.forecast_arrays(
            fc,
            trace,
            regions,
            ticks,
            pcfg.horizon_s,
            pcfg.threshold,
            release_s=pcfg.release_delay_s,
            mci=mci,
        )
    delays = np.array([float(s.provision_delay_s) for s in sites])
    res = pol.simulate_batch(
        pcfg,
        delays,
        ticks,
        mci,
        fca,
        idle_kw=np.array([s.idle_kw for s in sites]),
        train_kw=np.array([s.train_kw for s in sites]),
    )
    bounds = np.append(ticks, end)  # edge index K = still on when the simulation ends
    delay = np.zeros(len(sites)) if pcfg.zero_delay else delays

    events: list[dict[str, Any]] = [
        make_event(
            "run_start",
            start,
            policy=policy_name,
            threshold=pcfg.threshold,
            forecaster=forecaster,
            simulated=True,
            tick_s=tick_s,
        )
    ]
    for i, s in enumerate(sites):
        on, off = _edges(res.provision[i])
        for a, b in zip(on, off, strict=True):
            t0, t1 = float(bounds[a]), float(bounds[b])
            events.append(make_event("provision_decided", t0, site=s.name, reason=pcfg.name))
            events.append(make_event("provision_started", t0, site=s.name))
            if t0 + delay[i] < t1:
                events.append(make_event("provision_complete", t0 + float(delay[i]), site=s.name))
            why = "released" if b < len(ticks) else "end of simulation"
            events.append(make_event("deprovision", t1, site=s.name, reason=why))
        on, off = _edges(res.train[i])
        for a, b in zip(on, off, strict=True):
            t0, t1 = float(bounds[a]), float(bounds[b])
            events.append(
                make_event("train_interval", t1, site=s.name, start=t0, end=t1, energy_j=None)
            )
    n_train = res.train.sum(axis=0)
    names = np.array([s.name for s in sites])
    for k in np.flatnonzero(np.diff(np.concatenate([[-1], n_train])) != 0):
        events.append(
            make_event(
                "mode",
                float(ticks[k]),
                mode=str(pol.Mode.of(int(n_train[k]))),
                train=names[res.train[:, k]].tolist(),
                provision=names[res.provision[:, k]].tolist(),
            )
        )
    events.append(make_event("run_end", end, reason="end of simulation"))
    return sorted(events, key=lambda e: (e["t"], _ORDER.get(e["kind"], 7)))


def windows_used(
    ledger: Ledger, trace: Any, sites: Sequence[Any], threshold: float, start: float, end: float
) -> tuple[int, int]:
    """(site-windows in which the site trained at all, all site-windows): raw MCI < threshold."""
    used = total = 0
    for s in sites:
        ws = windows(trace, s.region, start, end, threshold)
        train = union(ledger.train.get(s.name, []))
        total += len(ws)
        used += sum(1 for a, b in ws if any(ts < b and a < te for ts, te in train))
    return used, total


def summarize(
    events: Sequence[dict[str, Any]],
    trace: Any,
    sites_config: Any,
    *,
    start: float,
    end: float,
    threshold: float | None = None,
    grid_s: float = 60.0,
) -> dict[str, Any]:
    """The --json document (less "policy") for a list of simulated or recorded events."""
    threshold = float(sites_config.threshold if threshold is None else threshold)
    ledger = Ledger.from_events(events)
    doc = ledger.summary(
        trace, sites_config, start=start, end=end, threshold=threshold, grid_s=grid_s
    )
    used, total = windows_used(ledger, trace, list(sites_config.sites), threshold, start, end)
    doc["total"]["windows_used"] = used
    doc["total"]["windows_total"] = total
    # Wasted provisioning energy: what sites draw while provisioned but not training (idle_kw),
    # i.e. booting (provision_delay_s per provisioning cycle), waiting ready for a window that
    # has not opened (or never comes), and windows skipped while provisioned. Training is never
    # counted here, in or out of a window: training through a release hold above the
    # threshold shows in the emissions and in train vs in-window hours instead. Zero for the
    # oracle (instant provisioning, trains exactly while curtailed).
    doc["total"]["provisioning_energy_wasted_kwh"] = doc["total"]["idle_energy_kwh"]
    return doc


def simulate(
    trace: Any,
    sites_config: Any,
    policy_name: str = "forecast",
    *,
    start: float | None = None,
    hours: float | None = None,
    threshold: float | None = None,
    tick_s: float = 60.0,
    forecaster: str | None = None,
    forecasts: str | Path | None = None,
    grid_s: float = 60.0,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(the --json document, the simulated events) for one policy."""
    from pilot.control.policy import policy_config

    start = float(trace.start) if start is None else float(start)
    end = float(trace.end) if hours is None else start + hours * 3600.0
    cfg = with_threshold(sites_config, threshold)
    forecaster = forecaster or cfg.forecaster
    t0 = time.perf_counter()
    events = run(
        trace,
        cfg,
        policy_name,
        start=start,
        end=end,
        tick_s=tick_s,
        forecaster=forecaster,
        forecasts=forecasts,
    )
    doc = summarize(events, trace, cfg, start=start, end=end, grid_s=grid_s)
    elapsed = time.perf_counter() - t0
    pcfg = policy_config(cfg, policy_name)
    policy = {
        "name": policy_name,
        "threshold": pcfg.threshold,
        "forecaster": forecaster if pcfg.use_forecast else None,
        "tick_s": tick_s,
        "start": start,
        "hours": (end - start) / 3600.0,
        "seconds": elapsed,
        "config": dataclasses.asdict(pcfg),
    }
    return {"policy": policy, **doc}, events


def accounted_span(events: Sequence[dict[str, Any]], trace: Any) -> tuple[float, float]:
    """The events' span cut to the trace: a run that went on past the trace end is accounted
    up to it (its intervals are cut there), rather than failing the whole report."""
    ts = [float(e["t"]) for e in events]
    start, end = max(min(ts), float(trace.start)), min(max(ts), float(trace.end))
    if end <= start:
        raise ValueError(
            f"the events ({min(ts):.0f} .. {max(ts):.0f}) lie outside the trace "
            f"({trace.start:.0f} .. {trace.end:.0f}): is it the run's trace?"
        )
    return start, end


def replay(
    events: Sequence[dict[str, Any]],
    trace: Any,
    sites_config: Any,
    *,
    threshold: float | None = None,
    grid_s: float = 60.0,
    measured: bool = False,
) -> dict[str, Any]:
    """A recorded run's events through the power model and the ledger, over the run's own span:
    the simulator's view of a real run. Measured joules are ignored unless `measured`."""
    evs = [dict(e) for e in events]
    if not evs:
        raise ValueError("no events to replay")
    if not measured:
        for e in evs:
            e.pop("energy_j", None)
    start, end = accounted_span(evs, trace)
    return summarize(
        evs, trace, sites_config, start=start, end=end, threshold=threshold, grid_s=grid_s
    )


# --- CLI --------------------------------------------------------------------------------------

COMPARE_HEAD = [
    "policy",
    "kg CO2",
    "kWh",
    "train site-h",
    "in-window site-h",
    "energy in window",
    "windows used",
    "prov. wasted kWh",
    "vs best single site",
    "vs oracle",
]


def compare_row(name: str, doc: dict[str, Any], oracle_kg: float) -> list[str]:
    t = doc["total"]
    best = min(
        (b["emissions_kg"] for k, b in doc["baselines"].items() if k.startswith("single_site:")),
        default=0.0,
    )
    return [
        name,
        f"{t['emissions_kg']:.3f}",
        f"{t['energy_kwh']:.2f}",
        f"{t['train_hours']:.2f}",
        f"{t['in_window_train_hours']:.2f}",
        f"{t['curtailed_energy_share']:.1%}",
        f"{t['windows_used']}/{t['windows_total']}",
        f"{t['provisioning_energy_wasted_kwh']:.3f}",
        f"{t['emissions_kg'] / best:.1%}" if best > 0 else "n/a",
        f"{t['emissions_kg'] / oracle_kg:.3f}x" if oracle_kg > 0 else "n/a",
    ]


def compare_rows(docs: dict[str, dict[str, Any]]) -> list[list[str]]:
    """One row per run (the oracle first: the ratios' reference), then the continuous
    baseline (same trace, same span)."""
    oracle_kg = next(iter(docs.values()))["total"]["emissions_kg"]
    rows = [compare_row(n, d, oracle_kg) for n, d in docs.items()]
    cont = next(iter(docs.values()))["baselines"]["continuous_federated"]
    rows.append(
        [
            "continuous",
            f"{cont['emissions_kg']:.3f}",
            f"{cont['energy_kwh']:.2f}",
            "",
            "",
            "",
            "",
            "",
            "",
            f"{cont['emissions_kg'] / oracle_kg:.1f}x" if oracle_kg > 0 else "n/a",
        ]
    )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m pilot.analysis.simulate", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument(
        "--trace",
        nargs="+",
        help="wide CSV or WattTime-style long CSVs; default: the sites config's trace",
    )
    ap.add_argument("--sites", required=True, help="sites TOML, e.g. configs/paper-3site.toml")
    ap.add_argument("--policy", default=None, choices=POLICIES, help="default: the sites config's")
    ap.add_argument(
        "--forecaster",
        default=None,
        choices=FORECASTER_NAMES,
        help="forecast fed to the forecast policy; default: the sites config's",
    )
    ap.add_argument(
        "--forecasts",
        help="forecaster \"recorded\": a live run's forecasts.csv; default: the sites config's",
    )
    ap.add_argument(
        "--threshold", type=float, help="MCI threshold (gCO2/kWh); default: the sites config's"
    )
    ap.add_argument(
        "--start", help="epoch seconds or ISO-8601 with offset; default: the trace start"
    )
    ap.add_argument("--hours", type=float, help="default: to the trace end")
    ap.add_argument(
        "--tick", type=float, default=60.0, help="policy tick in sim seconds (default 60)"
    )
    ap.add_argument("--json", help="write the result here (--compare: {policy: result})")
    ap.add_argument("--plot", help="write the timeline figure of --policy here (PNG)")
    ap.add_argument("--events", help="write the simulated events of --policy here (JSONL)")
    ap.add_argument(
        "--compare",
        action="store_true",
        help="the oracle, the prototype rule and ours with no, a noisy and a perfect forecast: "
        "one table",
    )
    args = ap.parse_args(argv)
    try:
        from pilot.config.sites import load_sites
        from pilot.energy.traces import load_trace, parse_time

        sites = load_sites(args.sites)
        if not args.trace and sites.trace is None:
            raise ValueError(f"no trace: pass --trace FILE ({args.sites} names none)")
        trace = load_trace(args.trace or [sites.trace])
        policy = args.policy or sites.policy
        start = parse_time(args.start) if args.start else float(trace.start)
        if args.hours is not None and start + args.hours * 3600 > trace.end:
            trace.require(start, start + args.hours * 3600)  # the trace's own "too short" error
        runs = COMPARE_RUNS if args.compare else ((policy, policy, args.forecaster),)
        results = {
            label: simulate(
                trace,
                sites,
                name,
                start=start,
                hours=args.hours,
                threshold=args.threshold,
                tick_s=args.tick,
                forecaster=fc,
                forecasts=args.forecasts,
            )
            for label, name, fc in runs
        }
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from pilot.analysis.tables import print_table, table_rows

    docs = {n: r[0] for n, r in results.items()}
    # --plot/--events describe --policy (with --forecaster or the sites' one), under --compare too
    fc_wanted = args.forecaster or sites.forecaster
    label = next(
        (lb for lb, n, fc in runs if n == policy and fc in (None, fc_wanted)),
        next(lb for lb, n, _ in runs if n == policy),
    )
    doc, events = results[label]
    if args.compare:
        ms = sum(d["policy"]["seconds"] for d in docs.values()) * 1000
        print_table(
            COMPARE_HEAD,
            compare_rows(docs),
            title=f"{Path(args.sites).name}: {doc['policy']['hours']:.1f} h, threshold "
            f"{doc['threshold']:g} gCO2/kWh ({ms:.0f} ms for {len(docs)} policies)",
        )
    else:
        head, rows = table_rows(doc)
        print_table(head, rows, title=f"policy {policy} ({doc['policy']['seconds'] * 1000:.0f} ms)")
    if args.json:
        Path(args.json).write_text(json.dumps(docs if args.compare else doc, indent=2) + "\n")
    if args.events:
        # Name the inputs so `python -m pilot.analysis.report DIR` can render a simulated run as well.
        trace_paths = args.trace or [str(sites.trace)]
        events[0].update(
            trace=[str(Path(p).resolve()) for p in trace_paths],
            sites=str(Path(args.sites).resolve()),
        )
        Path(args.events).write_text("".join(json.dumps(e) + "\n" for e in events))
    if args.plot:
        from pilot.analysis.figure import mode_spans, timeline

        ivs = Ledger.from_events(events).intervals(doc["end"])
        timeline(
            args.plot,
            trace,
            list(sites.sites),
            ivs,
            threshold=doc["threshold"],
            start=doc["start"],
            end=doc["end"],
            modes=mode_spans(events, ivs, doc["start"], doc["end"]),
            title=f"what-if: policy {policy}, {Path(args.sites).name}",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
