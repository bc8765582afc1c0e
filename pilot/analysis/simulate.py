"""What-if simulator: replay a curtailment policy over a trace, no Flower, no GPU.

    python -m pilot.analysis.simulate --trace FILE --sites FILE [--policy prototype|forecast|oracle]
        [--forecaster NAME] [--forecasts FILE] [--threshold X] [--start T] [--hours H]
        [--tick S] [--json OUT] [--plot OUT.png] [--events OUT.jsonl] [--compare]

A live run replays from its record (pilot.energy.sources.record): ``--trace DIR/trace.csv
--forecaster recorded --forecasts DIR/forecasts.csv`` decides on what the run saw, its
provider's forecasts included.

The replay runs the policy's array path (pilot.control.batch.simulate_batch: the decisions of
Policy.step, numpy over sites x ticks) and turns the decision arrays into the events a live run
emits (pilot.analysis.decisions), which the carbon ledger folds into energy and emissions, the
same code the ServerApp's ledger runs. Power model: a site asked to provision draws `idle_kw`
from that tick, is ready `provision_delay_s` later (zero for the oracle), draws `train_kw`
while the policy trains it, and nothing once released. With the default 60 s tick a 240 s
delay is exact; a delay that is not a multiple of the tick is rounded up to the next tick.

pilot.analysis.replay folds the events into the --json document, and goes the other way too:
the events of a real run through the power model and the ledger.
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

from pilot.analysis.compare import COMPARE_HEAD, COMPARE_RUNS, compare_rows
from pilot.analysis.decisions import mode_events, ordered, site_events
from pilot.analysis.replay import summarize
from pilot.config.sites import FORECASTER_NAMES
from pilot.energy.carbon import Ledger
from pilot.events.schema import make_event

POLICIES = ("prototype", "forecast", "oracle")


def with_threshold(sites_config: Any, threshold: float | None) -> Any:
    if threshold is None or threshold == sites_config.threshold:
        return sites_config
    return dataclasses.replace(sites_config, threshold=float(threshold))


def _span(trace: Any, start: float | None, end: float | None, tick_s: float) -> tuple[float, float]:
    """[start, end), the trace's own span by default, checked to lie inside the trace."""
    start = float(trace.start) if start is None else float(start)
    end = float(trace.end) if end is None else float(end)
    if not float(trace.start) <= start < end <= float(trace.end):
        raise ValueError(
            f"simulated span [{start:.0f}, {end:.0f}) is not inside the trace "
            f"[{trace.start:.0f}, {trace.end:.0f}]: pick another --start/--hours"
        )
    if not tick_s > 0:
        raise ValueError(f"--tick {tick_s} must be > 0 seconds")
    return start, end


def _decide(
    cfg: Any,
    pcfg: Any,
    trace: Any,
    ticks: np.ndarray,
    delays: np.ndarray,
    forecaster: str,
    forecasts: str | Path | None,
) -> Any:
    """The policy's decisions (sites x ticks) on the trace's MCI and, for a policy that
    forecasts, on `forecaster`'s forecasts."""
    from pilot.control.batch import simulate_batch
    from pilot.control.outlook import forecast_arrays
    from pilot.energy.sources.record import forecaster as make_forecaster

    sites = list(cfg.sites)
    regions = [s.region for s in sites]
    mci = np.stack([np.asarray(trace.series(r, ticks), dtype=np.float64) for r in regions])
    fca = None
    if pcfg.use_forecast:
        fc = make_forecaster(cfg, forecaster, trace, forecasts)
        fca = forecast_arrays(
            fc,
            trace,
            regions,
            ticks,
            pcfg.horizon_s,
            pcfg.threshold,
            release_s=pcfg.release_delay_s,
            mci=mci,
        )
    return simulate_batch(
        pcfg,
        delays,
        ticks,
        mci,
        fca,
        idle_kw=np.array([s.idle_kw for s in sites]),
        train_kw=np.array([s.train_kw for s in sites]),
    )


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
    from pilot.control.policy import policy_config

    cfg = with_threshold(sites_config, threshold)
    sites = list(cfg.sites)
    start, end = _span(trace, start, end, tick_s)
    pcfg = policy_config(cfg, policy_name)
    forecaster = forecaster or cfg.forecaster
    ticks = np.arange(start, end, tick_s)
    delays = np.array([float(s.provision_delay_s) for s in sites])
    res = _decide(cfg, pcfg, trace, ticks, delays, forecaster, forecasts)
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
        events += site_events(
            s.name, res.provision[i], res.train[i], bounds, float(delay[i]), pcfg.name
        )
    events += mode_events([s.name for s in sites], res.provision, res.train, ticks)
    events.append(make_event("run_end", end, reason="end of simulation"))
    return ordered(events)


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


# --- CLI ---------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
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
    return ap


def _load(args: argparse.Namespace) -> tuple[Any, Any, float]:
    """(the sites config, the trace, the start) the arguments name; a span past the trace end
    fails here, with the trace's own "too short" error."""
    from pilot.config.sites import load_sites
    from pilot.energy.traces import load_trace, parse_time

    sites = load_sites(args.sites)
    if not args.trace and sites.trace is None:
        raise ValueError(f"no trace: pass --trace FILE ({args.sites} names none)")
    trace = load_trace(args.trace or [sites.trace])
    start = parse_time(args.start) if args.start else float(trace.start)
    if args.hours is not None and start + args.hours * 3600 > trace.end:
        trace.require(start, start + args.hours * 3600)
    return sites, trace, start


def _chosen(runs: Sequence[tuple[str, str, str | None]], policy: str, forecaster: str) -> str:
    """The label of the run --plot/--events describe: --policy (with --forecaster or the sites'
    one), under --compare too."""
    return next(
        (lb for lb, n, fc in runs if n == policy and fc in (None, forecaster)),
        next(lb for lb, n, _ in runs if n == policy),
    )


def _print_tables(
    args: argparse.Namespace, policy: str, docs: dict[str, dict[str, Any]], doc: dict[str, Any]
) -> None:
    from pilot.analysis.tables import print_table, table_rows

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


def _write_events(args: argparse.Namespace, sites: Any, events: list[dict[str, Any]]) -> None:
    # Name the inputs so `python -m pilot.analysis.report DIR` can render a simulated run as well.
    trace_paths = args.trace or [str(sites.trace)]
    events[0].update(
        trace=[str(Path(p).resolve()) for p in trace_paths],
        sites=str(Path(args.sites).resolve()),
    )
    Path(args.events).write_text("".join(json.dumps(e) + "\n" for e in events))


def _plot(
    args: argparse.Namespace,
    trace: Any,
    sites: Any,
    policy: str,
    doc: dict[str, Any],
    events: list[dict[str, Any]],
) -> None:
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


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        sites, trace, start = _load(args)
        policy = args.policy or sites.policy
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
    docs = {n: r[0] for n, r in results.items()}
    doc, events = results[_chosen(runs, policy, args.forecaster or sites.forecaster)]
    _print_tables(args, policy, docs, doc)
    if args.json:
        Path(args.json).write_text(json.dumps(docs if args.compare else doc, indent=2) + "\n")
    if args.events:
        _write_events(args, sites, events)
    if args.plot:
        _plot(args, trace, sites, policy, doc, events)
    return 0


if __name__ == "__main__":
    sys.exit(main())
