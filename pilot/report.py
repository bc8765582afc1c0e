"""Run reports: tables, report.md/json, events.csv and the timeline figure.

    python -m pilot.report RUN_DIR [--trace FILE] [--sites FILE] [--threshold X] [--show]

The ServerApp writes the report itself as a run ends (`write_after_run`); this command rebuilds
it (`--show`: prints the table of the one written). It reads RUN_DIR/events.jsonl, the carbon ledger (RUN_DIR/ledger.json, else the newest
`meta.json` under RUN_DIR holding a "carbon_ledger" key, else the events replayed) and the
trace, writes RUN_DIR/report.md, report.json, events.csv and timeline.png, and prints a table.

Events schema (RUN_DIR/events.jsonl; one JSON object a line, in emission order; the same
objects as the Redis `events` stream). Every event has

    kind  str    one of the kinds below
    t     float  simulated time, epoch seconds UTC (the trace's time axis)
    wall  float  optional, time.time() at emission

and, by kind:

    run_start           run, trace (path | list of paths), sites (path), threshold, policy,
                        sim_start, speedup
    mode                mode ("PAUSE" | "LOCAL" | "FEDERATED"), train (list of sites),
                        provision (list of sites); emitted when the decision changes
    provision_decided   site, reason
    provision_started   site, reason     the site draws power (idle_kw) from here on
    provision_complete  site             ready: joined, can train
    deprovision         site, reason     power draw stops here
    round_start         round, sites (list), deadline_t
    join                site, round, resumed   a site entering a running round (resumed: it
                        paused warm in this round and goes on from its own weights)
    leave               site, round, reason, warm   a site asked to stop stepping (warm: it
                        stays provisioned, idle, above the threshold; else released after)
    lease_extended      site, round, rank, chunks, rows   more data leased mid-round
    train_interval      site, round, start, end (sim t), tokens, steps, loss,
                        curve (per-step losses over [start, end), binned: loss_curve),
                        energy_j (measured joules over [start, end), or null),
                        cropped_tokens (the whole reply's: document tails the loader's
                        packing read but cut off, never trained on)
    round_end           round, sites, tokens, loss, cropped_tokens (all replies of the round)
    aggregate           round, loss (the round-mean train loss: work-weighted mean of the
                        sites' per-step training losses over the round, NOT the loss of the
                        averaged model), tokens, global_step, sites
    validation          round, model_t (sim t of the aggregation that made the model),
                        global_step, tokens (trained so far), bpb (the global model's bits per
                        byte on the held-out shard: nanochat.train.val_bpb, as the torchrun
                        baseline; null if it failed), eval_tokens (the budget), seconds (wall
                        seconds it took), device, error (only when it failed); one per
                        aggregate, emitted when the ServerApp's background evaluation is done
    fault               error, site (optional), round (optional)
    run_end             reason

Energy accounting uses provision_started / deprovision / train_interval only (pilot.carbon.
Ledger.observe); a site still provisioned at the last event is closed there. The other kinds
feed the tables and the figure.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from pilot import quality
from pilot.carbon import Interval, Ledger, windows
from pilot.events import EVENT_KINDS

MODE_COLORS = {"PAUSE": "#d9d9d9", "LOCAL": "#fdd49e", "FEDERATED": "#a1d99b"}
REPORT_FILES = ("report.md", "report.json", "events.csv", "timeline.png")

log = logging.getLogger(__name__)


# --- events -----------------------------------------------------------------------------------


def load_events(path: str | Path) -> list[dict[str, Any]]:
    """events.jsonl -> list of dicts; a torn last line (a crash mid-write) is skipped, others are errors."""
    path = Path(path)
    lines = path.read_text().splitlines()
    out: list[dict[str, Any]] = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            ev = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines):
                break
            raise ValueError(f"{path}:{i}: not JSON ({e.msg}); fix or remove the line") from None
        if not isinstance(ev, dict) or "kind" not in ev or "t" not in ev:
            raise ValueError(f"{path}:{i}: an event needs 'kind' and 't' (sim seconds)")
        out.append(ev)
    return out


def write_events_csv(events: Sequence[dict[str, Any]], path: str | Path) -> None:
    cols = ["t", "kind"]
    for ev in events:
        cols += [k for k in ev if k not in cols]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for ev in events:
            w.writerow(
                {k: json.dumps(v) if isinstance(v, list | dict) else v for k, v in ev.items()}
            )


def mode_spans(
    events: Sequence[dict[str, Any]], intervals: Iterable[Interval], start: float, end: float
) -> list[tuple[float, float, str]]:
    """(start, end, mode) over [start, end): from `mode` events, else derived from training intervals."""
    marks = sorted(
        (float(e["t"]), str(e["mode"])) for e in events if e["kind"] == "mode" and "mode" in e
    )
    if not marks:
        # No mode events (an older run): the mode is how many sites train at each instant.
        edges = sorted(
            {start, end}
            | {x for iv in intervals if iv.state == "train" for x in (iv.start, iv.end)}
        )
        train = [iv for iv in intervals if iv.state == "train"]
        for a, b in zip(edges, edges[1:], strict=False):
            mid = 0.5 * (a + b)
            n = sum(1 for iv in train if iv.start <= mid < iv.end)
            marks.append((a, "PAUSE" if n == 0 else "LOCAL" if n == 1 else "FEDERATED"))
    spans: list[tuple[float, float, str]] = []
    for (t, m), nxt in zip(marks, marks[1:] + [(end, "")], strict=True):
        a, b = max(t, start), min(nxt[0], end)
        if b <= a:
            continue
        if spans and spans[-1][2] == m and spans[-1][1] == a:
            spans[-1] = (spans[-1][0], b, m)
        else:
            spans.append((a, b, m))
    return spans


def loss_curve(step_losses: Sequence[float], points: int) -> list[float]:
    """Per-step losses in at most `points` equal bins (bin means), in order: a training curve
    small enough for an event however long the round."""
    n = len(step_losses)
    if n <= points:
        return [float(x) for x in step_losses]
    edges = np.linspace(0, n, points + 1).round().astype(int)
    return [float(np.mean(step_losses[a:b])) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def losses(events: Sequence[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """Loss points for the figure: the round-mean train loss per round ("global"), each
    site's training curve (bins of its interval's curve spread evenly over the interval, else
    one point at the interval's end) and the global model's val bpb ("val_bpb", at the time
    of the aggregation it measured; site names are DNS labels, so no site can be called so)."""
    out: dict[str, list[tuple[float, float]]] = {"global": [], "val_bpb": []}
    for e in events:
        if e["kind"] == "validation" and e.get("bpb") is not None:
            out["val_bpb"].append((float(e.get("model_t", e["t"])), float(e["bpb"])))
            continue
        loss = e.get("loss")
        if loss is None or not np.isfinite(float(loss)):
            continue
        if e["kind"] == "aggregate":
            out["global"].append((float(e["t"]), float(loss)))
        elif e["kind"] == "train_interval" and e.get("site"):
            pts = out.setdefault(str(e["site"]), [])
            curve, end = e.get("curve") or [], float(e.get("end", e["t"]))
            if not curve:
                pts.append((end, float(loss)))
                continue
            start = float(e.get("start", end))
            width = (end - start) / len(curve)
            pts.extend((start + (i + 0.5) * width, float(c)) for i, c in enumerate(curve))
    return out


# --- the figure -------------------------------------------------------------------------------


def timeline(
    path: str | Path,
    trace: Any,
    sites: Sequence[Any],
    intervals: Sequence[Interval],
    *,
    threshold: float,
    start: float,
    end: float,
    modes: Sequence[tuple[float, float, str]] = (),
    loss: dict[str, list[tuple[float, float]]] | None = None,
    title: str = "",
) -> Path:
    """MCI per site with the threshold; provisioned and training bars per site; mode band; loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    has_loss = bool(loss) and any(loss.values())
    n = len(sites)
    ratios = [3.0, 0.35 + 0.35 * n, 0.35] + ([1.6] if has_loss else [])
    fig, axes = plt.subplots(
        len(ratios),
        1,
        sharex=True,
        figsize=(12, 2.0 + sum(ratios) * 1.3),
        gridspec_kw={"height_ratios": ratios, "hspace": 0.08},
    )
    ax_mci, ax_bar, ax_mode = axes[:3]
    h = lambda t: (np.asarray(t, dtype=float) - start) / 3600.0  # noqa: E731  hours since start
    colors = plt.get_cmap("tab10").colors

    ts = np.linspace(start, end, int(min(4000, max(200, (end - start) / 60))))
    for i, s in enumerate(sites):
        ax_mci.plot(
            h(ts),
            trace.series(s.region, ts),
            color=colors[i % 10],
            lw=1.2,
            label=f"{s.name} ({s.region})",
        )
    ax_mci.axhline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold:g}")
    ax_mci.set_ylabel("MCI (gCO2/kWh)")
    ax_mci.legend(loc="upper right", fontsize=8, ncol=min(4, n + 1))
    ax_mci.set_title(title or "curtailment-following training timeline")

    for i, s in enumerate(sites):
        y = n - 1 - i
        # Faint background: the raw curtailment windows, so bars outside them stand out.
        win = windows(trace, s.region, start, end, threshold)
        ax_bar.broken_barh(
            [(h(a), h(b) - h(a)) for a, b in win],
            (y - 0.45, 0.9),
            facecolors="#e5f5e0",
            edgecolor="none",
        )
        prov = [(h(iv.start), h(iv.end) - h(iv.start)) for iv in intervals if iv.site == s.name]
        train = [
            (h(iv.start), h(iv.end) - h(iv.start))
            for iv in intervals
            if iv.site == s.name and iv.state == "train"
        ]
        ax_bar.broken_barh(
            prov, (y - 0.35, 0.7), facecolors=colors[i % 10], alpha=0.25, edgecolor="none"
        )
        ax_bar.broken_barh(train, (y - 0.22, 0.44), facecolors=colors[i % 10], edgecolor="none")
    ax_bar.set_yticks(range(n), [s.name for s in reversed(sites)])
    ax_bar.set_ylim(-0.6, n - 0.4)
    ax_bar.legend(
        handles=[
            Patch(color="#e5f5e0", label="MCI < threshold"),
            Patch(color="grey", alpha=0.25, label="provisioned"),
            Patch(color="grey", label="training"),
        ],
        loc="center left",
        fontsize=7,
        bbox_to_anchor=(1.0, 0.5),
        frameon=False,
    )

    for a, b, m in modes:
        ax_mode.axvspan(h(a), h(b), color=MODE_COLORS.get(m, "white"), lw=0)
    ax_mode.set_yticks([])
    ax_mode.set_ylabel("mode", rotation=0, ha="right", va="center")
    ax_mode.legend(
        handles=[Patch(color=c, label=m) for m, c in MODE_COLORS.items()],
        loc="center left",
        fontsize=7,
        bbox_to_anchor=(1.0, 0.5),
        frameon=False,
    )

    if has_loss:
        _loss_panel(axes[3], loss, sites, h, colors)
    axes[-1].set_xlim(0, h(end))
    axes[-1].set_xlabel(f"hours since {datetime.fromtimestamp(start, UTC):%Y-%m-%d %H:%M} UTC")
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _loss_panel(ax_loss, loss, sites, h, colors) -> None:
    """Sites' training curves and the round-mean train loss (nats/token, left axis) with the
    global model's validation bits per byte (right axis: another unit, so its own scale)."""
    for i, s in enumerate(sites):
        pts = loss.get(s.name, [])
        if pts:
            ax_loss.plot(
                h([p[0] for p in pts]),
                [p[1] for p in pts],
                ".-",
                color=colors[i % 10],
                ms=2,
                lw=0.8,
                alpha=0.6,
                label=s.name,
            )
    g = loss.get("global", [])
    if g:
        ax_loss.plot(
            h([p[0] for p in g]),
            [p[1] for p in g],
            "-o",
            color="k",
            ms=3,
            lw=1.2,
            label="round-mean train loss",
        )
    ax_loss.set_ylabel("train loss (nats)")
    handles, labels = ax_loss.get_legend_handles_labels()
    v = loss.get("val_bpb", [])
    if v:
        ax_bpb = ax_loss.twinx()
        ax_bpb.plot(
            h([p[0] for p in v]),
            [p[1] for p in v],
            "-s",
            color="tab:red",
            ms=3,
            lw=1.2,
            label="global model val bpb",
        )
        ax_bpb.set_ylabel("val bits/byte", color="tab:red")
        more = ax_bpb.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    if handles:
        ax_loss.legend(handles, labels, loc="upper right", fontsize=8)


# --- tables -----------------------------------------------------------------------------------


def _f(x: float, nd: int = 3) -> str:
    return f"{x:.{nd}f}"


def table_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Per-site rows, a total row and one row per baseline; the last column is run ÷ baseline emissions."""
    head = ["", "kWh", "kg CO2", "train h", "prov h", "in-window", "wall h", "run/this"]
    rows = []
    for name, s in summary["sites"].items():
        rows.append(
            [
                name,
                _f(s["energy_kwh"]),
                _f(s["emissions_kg"]),
                _f(s["train_hours"], 2),
                _f(s["provisioned_hours"], 2),
                f"{s['curtailed_energy_share']:.0%}",
                "",
                "",
            ]
        )
    t = summary["total"]
    rows.append(
        [
            "TOTAL",
            _f(t["energy_kwh"]),
            _f(t["emissions_kg"]),
            _f(t["train_hours"], 2),
            _f(t.get("provisioned_hours", 0.0), 2),
            f"{t['curtailed_energy_share']:.0%}",
            _f(t["wall_hours"], 2),
            "",
        ]
    )
    for name, b in summary["baselines"].items():
        ratio = t["emissions_kg"] / b["emissions_kg"] if b["emissions_kg"] > 0 else float("nan")
        rows.append(
            [
                name,
                _f(b["energy_kwh"]),
                _f(b["emissions_kg"]),
                "",
                "",
                "",
                _f(b["wall_hours"], 2),
                f"{ratio:.1%}",
            ]
        )
    return head, rows


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def print_table(
    head: Sequence[str], rows: Sequence[Sequence[str]], title: str = "", caption: str = ""
) -> None:
    from rich.console import Console
    from rich.table import Table

    tab = Table(title=title or None, caption=caption or None)
    for i, c in enumerate(head):
        tab.add_column(c, justify="left" if i == 0 else "right")
    for r in rows:
        tab.add_row(*r)
    # Piped output (logs, CI) would otherwise wrap at 80 columns and truncate site names.
    Console(width=None if sys.stdout.isatty() else 140).print(tab)


# --- a run directory --------------------------------------------------------------------------


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
    if sites_config is None:
        from pilot.sites import load_sites

        if "sites" not in info:
            raise ValueError("no sites config: pass --sites FILE (the run_start event names none)")
        sites_config = load_sites(_resolve(info["sites"], run_dir))
    if trace is None:
        from pilot.traces import load_trace

        if "trace" not in info:
            raise ValueError("no trace: pass --trace FILE (the run_start event names none)")
        # the energy simulation publishes several files comma-separated (its --trace)
        paths = info["trace"] if isinstance(info["trace"], list) else info["trace"].split(",")
        trace = load_trace([_resolve(p, run_dir) for p in paths])
    if threshold is None:
        threshold = float(info.get("threshold", sites_config.threshold))
    sites = list(sites_config.sites)

    ledger, source = load_ledger(run_dir, events)
    from pilot.simulate import accounted_span, replay

    start, end = accounted_span(events, trace)
    cut_h = (
        max(float(e["t"]) for e in events) - end + start - min(float(e["t"]) for e in events)
    ) / 3600
    summary = ledger.summary(
        trace, sites_config, start=start, end=end, threshold=threshold, grid_s=grid_s
    )
    # The simulator's view of the same events (power model only, measured joules ignored):
    # a live ledger must agree with it within 1% where no site measures its power.
    r_tot = replay(events, trace, sites_config, threshold=threshold, grid_s=grid_s)["total"]
    check = {}
    for k in ("energy_kwh", "emissions_kg"):
        a, b = summary["total"][k], r_tot[k]
        check[k] = {"ledger": a, "replay": b, "rel_diff": abs(a - b) / max(abs(a), abs(b), 1e-12)}
    check["rel_diff"] = max(check["energy_kwh"]["rel_diff"], check["emissions_kg"]["rel_diff"])

    ivs = ledger.intervals(end)
    modes = mode_spans(events, ivs, start, end)
    loss = losses(events)
    counts = Counter(e["kind"] for e in events)
    rounds = sorted({int(e["round"]) for e in events if e["kind"] == "aggregate" and "round" in e})
    g = loss["global"]
    report = {
        "run": info.get("run", run_dir.name),
        "policy": info.get("policy"),
        "ledger_source": source,
        "replay_check": check,
        "outside_trace_hours": cut_h,
        "rounds_aggregated": len(rounds),
        "faults": [e for e in events if e["kind"] == "fault"],
        "event_counts": dict(counts),
        "unknown_event_kinds": sorted(k for k in counts if k not in EVENT_KINDS),
        "mode_hours": {
            m: sum(b - a for a, b, mm in modes if mm == m) / 3600.0 for m in MODE_COLORS
        },
        "loss": {"first": g[0][1], "last": g[-1][1]} if g else None,  # round-mean train loss
        **quality.summary(events),
        **summary,
    }

    write_events_csv(events, run_dir / "events.csv")
    (run_dir / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    timeline(
        run_dir / "timeline.png",
        trace,
        sites,
        ivs,
        threshold=threshold,
        start=start,
        end=end,
        modes=modes,
        loss=loss,
        title=f"run {report['run']}",
    )
    head, rows = table_rows(summary)
    md = [
        f"# Run report: {report['run']}",
        "",
        f"{datetime.fromtimestamp(start, UTC):%Y-%m-%d %H:%M} → {datetime.fromtimestamp(end, UTC):%Y-%m-%d %H:%M} UTC "
        f"(sim), threshold {threshold:g} gCO2/kWh, policy {report['policy'] or 'n/a'}, ledger from {source}.",
        "",
        markdown_table(head, rows),
        "",
        f"- training inside curtailment windows: {summary['total']['in_window_train_hours']:.2f} of "
        f"{summary['total']['train_hours']:.2f} site-hours",
        f"- provisioned but idle (provisioning energy): {summary['total']['idle_energy_kwh']:.3f} kWh",
        "- mode hours: " + ", ".join(f"{m} {v:.2f}" for m, v in report["mode_hours"].items()),
        f"- rounds aggregated: {len(rounds)}; faults: {len(report['faults'])}",
        f"- round-mean train loss: {g[0][1]:.4f} → {g[-1][1]:.4f}"
        if g
        else "- round-mean train loss: no aggregated rounds",
        *quality.markdown(report),
        *(
            [f"- **{cut_h:.2f} h of the run lie outside the trace and are not accounted**"]
            if cut_h > 0
            else []
        ),
        f"- ledger vs simulator replay of the events (power model): {check['rel_diff']:.3%} apart",
        "",
        "![timeline](timeline.png)",
        "",
    ]
    (run_dir / "report.md").write_text("\n".join(md))
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
            "report not written (%s: %s): rebuild it with python -m pilot.report %s",
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
        prog="python -m pilot.report", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("run_dir")
    ap.add_argument("--trace", nargs="+", help="trace file(s); default: the run_start event's")
    ap.add_argument("--sites", help="sites TOML; default: the run_start event's")
    ap.add_argument("--threshold", type=float)
    ap.add_argument("--show", action="store_true", help="print the report already written")
    args = ap.parse_args(argv)
    if args.show:
        rep = json.loads((Path(args.run_dir) / "report.json").read_text())
        _print_report(rep)
        print(f"{Path(args.run_dir) / 'report.md'}, {', '.join(REPORT_FILES[1:])}")
        return 0
    try:
        trace = sites = None
        if args.trace:
            from pilot.traces import load_trace

            trace = load_trace(args.trace)
        if args.sites:
            from pilot.sites import load_sites

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
