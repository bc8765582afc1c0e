"""Goodput: how much of a site's provisioned-and-ready time went into training steps, and
where the rest of each round went (pure, over a run's events).

Ready: from ``provision_complete`` until the site's ``deprovision`` (or the run's last event).
Training: the ``train_interval`` spans, less each reply's first-step excess (compilation and
warm-up count as cost, not training). Per round, each reply's fixed cost in wall seconds
(``costs`` on its first span): start (TRAIN sent -> order in the trainer), weights in (->
first step), warm-up, save (waiting for the last inner state to reach disk), weights out
(last step -> reply received).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from pilot.energy.spans import union

PARTS = ("start", "weights_in", "warmup", "save", "weights_out")


def _speedup(events: Sequence[dict[str, Any]]) -> float:
    """Simulated seconds per wall second over the run (1 without wall stamps)."""
    stamped = [e for e in events if e.get("wall") is not None]
    if len(stamped) < 2 or stamped[-1]["wall"] <= stamped[0]["wall"]:
        return 1.0
    return (stamped[-1]["t"] - stamped[0]["t"]) / (stamped[-1]["wall"] - stamped[0]["wall"])


def _ready(events: Sequence[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """Per site, its ready spans (sim)."""
    end = max(float(e["t"]) for e in events)
    since: dict[str, float] = {}
    spans: dict[str, list[tuple[float, float]]] = {}
    for e in events:
        site = e.get("site")
        if e["kind"] == "provision_complete":
            since.setdefault(site, float(e["t"]))
        elif e["kind"] == "deprovision" and site in since:
            spans.setdefault(site, []).append((since.pop(site), float(e["t"])))
    for site, t in since.items():
        spans.setdefault(site, []).append((t, end))
    return {s: union(v) for s, v in spans.items()}


def summary(events: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """{"goodput": {"sites": {site: {...}}, "total": {...}}}: ready and training hours, the
    goodput share and the mean fixed cost per reply, per site and over all sites."""
    speedup, ready = _speedup(events), _ready(events)
    trains = [e for e in events if e["kind"] == "train_interval"]
    sites = sorted(set(ready) | {e["site"] for e in trains})
    out = {s: _site(s, ready.get(s, []), trains, speedup) for s in sites}
    total_ready = sum(v["ready_hours"] for v in out.values())
    total_train = sum(v["train_hours"] for v in out.values())
    costs = [c for e in trains if (c := e.get("costs"))]
    return {
        "goodput": {
            "sites": out,
            "total": {
                "ready_hours": total_ready,
                "train_hours": total_train,
                "goodput": total_train / total_ready if total_ready > 0 else None,
                "replies": len(costs),
                "mean_cost_s": _means(costs),
            },
        }
    }


def _site(site: str, ready: list, trains: list, speedup: float) -> dict[str, Any]:
    mine = [e for e in trains if e["site"] == site]
    costs = [c for e in mine if (c := e.get("costs"))]
    warmup_sim = sum(c.get("warmup", 0.0) for c in costs) * speedup
    train_s = max(0.0, sum(e["end"] - e["start"] for e in mine) - warmup_sim)
    ready_s = sum(b - a for a, b in ready)
    return {
        "ready_hours": ready_s / 3600.0,
        "train_hours": train_s / 3600.0,
        "goodput": min(1.0, train_s / ready_s) if ready_s > 0 else None,
        "replies": len(costs),
        "mean_cost_s": _means(costs),
    }


def _means(costs: list[dict[str, float]]) -> dict[str, float]:
    return {p: statistics.fmean(c.get(p, 0.0) for c in costs) if costs else 0.0 for p in PARTS}


def markdown(report: dict[str, Any]) -> list[str]:
    """The report's goodput line and its per-site table."""
    g = report.get("goodput")
    if not g or g["total"]["goodput"] is None:
        return ["- goodput: no site was ready"]
    t = g["total"]
    lines = [
        f"- goodput: {t['goodput']:.1%} of {t['ready_hours']:.2f} provisioned-and-ready "
        f"site-hours went into training steps; fixed cost per reply (wall s): "
        + ", ".join(f"{p} {t['mean_cost_s'][p]:.2f}" for p in PARTS),
        "",
        "| site | ready h | training h | goodput | replies | "
        + " | ".join(f"{p} s" for p in PARTS)
        + " |",
        "|---|---|---|---|---|" + "---|" * len(PARTS),
    ]
    for site, v in g["sites"].items():
        share = "n/a" if v["goodput"] is None else f"{v['goodput']:.1%}"
        cells = " | ".join(f"{v['mean_cost_s'][p]:.2f}" for p in PARTS)
        lines.append(
            f"| {site} | {v['ready_hours']:.2f} | {v['train_hours']:.2f} | {share} | "
            f"{v['replies']} | {cells} |"
        )
    return lines + [""]
