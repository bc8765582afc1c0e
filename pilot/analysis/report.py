"""Run reports: tables, report.md/json, events.csv and the timeline figure.

    python -m pilot.analysis.report RUN_DIR [--trace FILE] [--sites FILE] [--threshold X] [--show]

The ServerApp has this command write the report as a run ends (`--after-run`); it also rebuilds
it (`--show`: prints the table of the one written). It reads RUN_DIR/events.jsonl, the carbon ledger (RUN_DIR/ledger.json, else the newest
`meta.json` under RUN_DIR holding a "carbon_ledger" key, else the events replayed) and the
trace, writes RUN_DIR/report.md, report.json, events.csv and timeline.png, and prints a table.

The events it reads are documented in docs/EVENTS.md (generated from pilot/events/schema.py).

Energy accounting uses provision_started / deprovision / train_interval only (pilot.energy.carbon.
Ledger.observe); a site still provisioned at the last event is closed there. The other kinds
feed the tables and the figure.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pilot.analysis import goodput, quality
from pilot.analysis.figure import MODE_COLORS, losses, mode_spans, timeline
from pilot.analysis.replay import accounted_span, replay
from pilot.analysis.tables import markdown_table, print_table, table_rows
from pilot.energy.carbon import Ledger
from pilot.events.reader import load_events, write_events_csv
from pilot.events.schema import EVENT_KINDS

REPORT_FILES = ("report.md", "report.json", "events.csv", "timeline.png")

log = logging.getLogger(__name__)


def load_ledger(run_dir: Path, events: Sequence[dict[str, Any]]) -> tuple[Ledger, str]:
    """The live ledger (ledger.json, else the newest checkpoint meta), else the events replayed."""
    if (run_dir / "ledger.json").exists():
        return Ledger.from_dict(json.loads((run_dir / "ledger.json").read_text())), "ledger.json"
    metas = sorted(run_dir.rglob("meta.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for p in metas:
        meta = json.loads(p.read_text())
        if isinstance(meta, dict) and "carbon_ledger" in meta:
            return Ledger.from_dict(meta["carbon_ledger"]), str(p.relative_to(run_dir))
    return Ledger.from_events(events), "events (replayed)"


def _resolve(p: str, run_dir: Path) -> str:
    q = Path(p).expanduser()
    return str(q if q.is_absolute() or q.exists() else run_dir / q)


def _inputs(run_dir: Path, info: dict[str, Any], trace: Any, sites_config: Any) -> tuple[Any, Any]:
    """(trace, sites config): those given, else the files the run_start event names."""
    if sites_config is None:
        from pilot.config.sites import load_sites

        if "sites" not in info:
            raise ValueError("no sites config: pass --sites FILE (the run_start event names none)")
        sites_config = load_sites(_resolve(info["sites"], run_dir))
    if trace is None:
        from pilot.energy.traces import load_trace

        if "trace" not in info:
            raise ValueError("no trace: pass --trace FILE (the run_start event names none)")
        # the energy simulation publishes several files comma-separated (its --trace)
        paths = info["trace"] if isinstance(info["trace"], list) else info["trace"].split(",")
        trace = load_trace([_resolve(p, run_dir) for p in paths])
    return trace, sites_config


def _replay_check(
    summary: dict[str, Any],
    events: Sequence[dict[str, Any]],
    trace: Any,
    sites_config: Any,
    threshold: float,
    grid_s: float,
) -> dict[str, Any]:
    """The ledger against the simulator's view of the same events (power model only, measured
    joules ignored): a live ledger must agree with it within 1% where no site measures its power."""
    r_tot = replay(events, trace, sites_config, threshold=threshold, grid_s=grid_s)["total"]
    check = {}
    for k in ("energy_kwh", "emissions_kg"):
        a, b = summary["total"][k], r_tot[k]
        check[k] = {"ledger": a, "replay": b, "rel_diff": abs(a - b) / max(abs(a), abs(b), 1e-12)}
    check["rel_diff"] = max(check["energy_kwh"]["rel_diff"], check["emissions_kg"]["rel_diff"])
    return check


def _event_stats(
    events: Sequence[dict[str, Any]],
    modes: Sequence[tuple[float, float, str]],
    loss: dict[str, list[tuple[float, float]]],
) -> dict[str, Any]:
    """report.json's counts from the events: rounds, faults, kinds, hours per mode, loss."""
    counts = Counter(e["kind"] for e in events)
    rounds = {int(e["round"]) for e in events if e["kind"] == "aggregate" and "round" in e}
    g = loss["global"]
    return {
        "rounds_aggregated": len(rounds),
        "faults": [e for e in events if e["kind"] == "fault"],
        "event_counts": dict(counts),
        "unknown_event_kinds": sorted(k for k in counts if k not in EVENT_KINDS),
        "mode_hours": {
            m: sum(b - a for a, b, mm in modes if mm == m) / 3600.0 for m in MODE_COLORS
        },
        "loss": {"first": g[0][1], "last": g[-1][1]} if g else None,  # round-mean train loss
    }


def _markdown(report: dict[str, Any]) -> str:
    """report.md: the table, then one line per finding, then the figure."""
    head, rows = table_rows(report)
    t, loss, cut_h = report["total"], report["loss"], report["outside_trace_hours"]
    t0, t1 = (datetime.fromtimestamp(report[k], UTC) for k in ("start", "end"))
    md = [
        f"# Run report: {report['run']}",
        "",
        f"{t0:%Y-%m-%d %H:%M} → {t1:%Y-%m-%d %H:%M} UTC (sim), threshold "
        f"{report['threshold']:g} gCO2/kWh, policy {report['policy'] or 'n/a'}, "
        f"ledger from {report['ledger_source']}.",
        "",
        markdown_table(head, rows),
        "",
        f"- training inside curtailment windows: {t['in_window_train_hours']:.2f} of "
        f"{t['train_hours']:.2f} site-hours",
        f"- provisioned but idle (provisioning energy): {t['idle_energy_kwh']:.3f} kWh",
        "- mode hours: " + ", ".join(f"{m} {v:.2f}" for m, v in report["mode_hours"].items()),
        f"- rounds aggregated: {report['rounds_aggregated']}; faults: {len(report['faults'])}",
        f"- round-mean train loss: {loss['first']:.4f} → {loss['last']:.4f}"
        if loss
        else "- round-mean train loss: no aggregated rounds",
        *quality.markdown(report),
        *goodput.markdown(report),
        *(
            [f"- **{cut_h:.2f} h of the run lie outside the trace and are not accounted**"]
            if cut_h > 0
            else []
        ),
        "- ledger vs simulator replay of the events (power model): "
        f"{report['replay_check']['rel_diff']:.3%} apart",
        "",
        "![timeline](timeline.png)",
        "",
    ]
    return "\n".join(md)


def build(
    run_dir: str | Path,
    trace: Any = None,
    sites_config: Any = None,
    threshold: float | None = None,
    grid_s: float = 60.0,
) -> dict[str, Any]:
    """Write report.md, report.json, events.csv and timeline.png into run_dir; return report.json's dict.

    `trace` / `sites_config` default to the files named by the run_start event.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "events.jsonl").exists():
        raise ValueError(f"{run_dir}/events.jsonl not found: is {run_dir} a run directory?")
    events = load_events(run_dir / "events.jsonl")
    if not events:
        raise ValueError(f"{run_dir}/events.jsonl holds no events")
    info = next((e for e in events if e["kind"] == "run_start"), {})
    trace, sites_config = _inputs(run_dir, info, trace, sites_config)
    if threshold is None:
        threshold = float(info.get("threshold", sites_config.threshold))

    ledger, source = load_ledger(run_dir, events)
    start, end = accounted_span(events, trace)
    ts = [float(e["t"]) for e in events]
    cut_h = (max(ts) - end + start - min(ts)) / 3600
    summary = ledger.summary(
        trace, sites_config, start=start, end=end, threshold=threshold, grid_s=grid_s
    )
    ivs = ledger.intervals(end)
    modes = mode_spans(events, ivs, start, end)
    loss = losses(events)
    report = {
        "run": info.get("run", run_dir.name),
        "policy": info.get("policy"),
        "ledger_source": source,
        "replay_check": _replay_check(summary, events, trace, sites_config, threshold, grid_s),
        "outside_trace_hours": cut_h,
        **_event_stats(events, modes, loss),
        **quality.summary(events),
        **goodput.summary(events),
        **summary,
    }

    write_events_csv(events, run_dir / "events.csv")
    (run_dir / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    timeline(
        run_dir / "timeline.png",
        trace,
        list(sites_config.sites),
        ivs,
        threshold=threshold,
        start=start,
        end=end,
        modes=modes,
        loss=loss,
        title=f"run {report['run']}",
    )
    (run_dir / "report.md").write_text(_markdown(report))
    return report


def is_current(run_dir: Path) -> bool:
    """The whole report was written after the run's last event (report.md is written last)."""
    md, events = run_dir / "report.md", run_dir / "events.jsonl"
    done = all((run_dir / name).is_file() for name in REPORT_FILES) and events.is_file()
    return done and md.stat().st_mtime >= events.stat().st_mtime


def write_after_run(run_dir: Path) -> bool:
    """The end of a run (its own end, a stop or a failure): write the report and log its table.
    Never raises: the run's own outcome must not be masked by a report that failed."""
    try:
        rep = build(run_dir)
    except Exception as e:  # noqa: BLE001 - a report is a by-product of the run
        log.warning(
            "report not written (%s: %s): rebuild it with python -m pilot.analysis.report %s",
            type(e).__name__,
            e,
            run_dir,
        )
        return False
    head, rows = table_rows(rep)
    for line in markdown_table(head, rows).splitlines():
        log.info("%s", line)
    log.info("%s", quality.caption(rep))
    log.info("report: %s (%s)", run_dir / "report.md", ", ".join(REPORT_FILES[1:]))
    return True


def _print_report(rep: dict) -> None:
    head, rows = table_rows(rep)
    print_table(
        head,
        rows,
        title=f"run {rep['run']} — ledger from {rep['ledger_source']}",
        caption=quality.caption(rep),
    )


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m pilot.analysis.report", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("run_dir")
    ap.add_argument("--trace", nargs="+", help="trace file(s); default: the run_start event's")
    ap.add_argument("--sites", help="sites TOML; default: the run_start event's")
    ap.add_argument("--threshold", type=float)
    ap.add_argument("--show", action="store_true", help="print the report already written")
    ap.add_argument(
        "--after-run",
        action="store_true",
        help="as the ServerApp at a run's end: log the table, exit 1 if it could not be built",
    )
    args = ap.parse_args(argv)
    if args.after_run:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
        return 0 if write_after_run(Path(args.run_dir)) else 1
    if args.show:
        rep = json.loads((Path(args.run_dir) / "report.json").read_text())
        _print_report(rep)
        print(f"{Path(args.run_dir) / 'report.md'}, {', '.join(REPORT_FILES[1:])}")
        return 0
    try:
        trace = sites = None
        if args.trace:
            from pilot.energy.traces import load_trace

            trace = load_trace(args.trace)
        if args.sites:
            from pilot.config.sites import load_sites

            sites = load_sites(args.sites)
        rep = build(args.run_dir, trace, sites, args.threshold)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _print_report(rep)
    print(f"wrote {Path(args.run_dir) / 'report.md'}, {', '.join(REPORT_FILES[1:])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
