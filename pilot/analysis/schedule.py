"""Rounds from a curtailment schedule, without Flower: who trains how many steps in each round.

The policy's schedule (pilot.analysis.simulate's ``train_interval`` events on a trace) is cut into
rounds by the ServerApp's rules (pilot/flower/loop.py): a round opens when a site may train; it
lasts ``round_max_s`` while one site trains (LOCAL) and ``round_min_s`` once two or more do
(FEDERATED; a join shortens a running round to that); a site whose window closes leaves with
its partial work; a site that becomes ready joins a running round only with ``join_min_s``
left, else it waits for the next round. Two join rules:

- ``stale`` (the live rule): the joiner starts from the round's opening global model;
- ``close``: the join closes the round (the partial work so far is aggregated) and a new
  round opens for every training site from the fresh global model.

Simplification (documented in the README): a round in which no site trains any more closes at
once, where the live server keeps it open while a paused site stays warm.

Seconds become steps at one rate for all sites (``steps_for``): the total is split over the
site-rounds in proportion to their training seconds (largest remainder), so a plan trains
exactly the token count it is given, wherever its sites train.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

JOIN_RULES = ("stale", "close")


@dataclass
class Work:
    site: str
    seconds: float = 0.0  # simulated seconds of training in the round
    steps: int = 0
    since: float | None = None  # start of the open span, None while not training


@dataclass
class PlannedRound:
    start: float
    deadline: float
    work: dict[str, Work] = field(default_factory=dict)
    end: float = 0.0

    def training(self) -> set[str]:
        return {s for s, w in self.work.items() if w.since is not None}

    def stop(self, site: str, t: float) -> None:
        w = self.work[site]
        if w.since is not None:
            w.seconds += t - w.since
            w.since = None


def intervals(events: Sequence[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """{site: [(start, end)]} from the train_interval events of a (simulated) run."""
    out: dict[str, list[tuple[float, float]]] = {}
    for e in events:
        if e["kind"] == "train_interval":
            out.setdefault(str(e["site"]), []).append((float(e["start"]), float(e["end"])))
    return out


def plan_rounds(
    spans: dict[str, list[tuple[float, float]]],
    *,
    round_min_s: float,
    round_max_s: float,
    join_min_s: float,
    join_rule: str = "stale",
) -> list[PlannedRound]:
    """The rounds the ServerApp would run over these training spans (seconds only)."""
    if join_rule not in JOIN_RULES:
        raise ValueError(f"join rule {join_rule!r}: use one of {JOIN_RULES}")
    # every instant at which the set of training sites can change
    times = sorted({t for ivs in spans.values() for iv in ivs for t in iv})
    rounds: list[PlannedRound] = []
    cur: PlannedRound | None = None

    def on(site: str, t: float) -> bool:
        return any(a <= t < b for a, b in spans[site])

    def open_round(t: float, sites: set[str]) -> PlannedRound:
        length = round_min_s if len(sites) > 1 else round_max_s
        r = PlannedRound(start=t, deadline=t + length)
        r.work = {s: Work(s, since=t) for s in sorted(sites)}
        rounds.append(r)
        return r

    def close(r: PlannedRound, t: float) -> None:
        for s in r.work:
            r.stop(s, t)
        r.end = t

    pending = list(reversed(times))  # span edges, next one last
    while pending:
        t = pending.pop()
        train = {s for s in spans if on(s, t)}
        if cur is not None:
            for s in cur.training() - train:
                cur.stop(s, t)  # leaves: its partial work counts
            if t >= cur.deadline or not cur.training():
                close(cur, t)
                cur = None
        if cur is None:
            cur = open_round(t, train) if train else None
        else:
            for s in sorted(train & set(cur.work) - cur.training()):
                cur.work[s].since = t  # back in the same round, from its own weights
            new = train - set(cur.work)
            if new and cur.deadline - t >= join_min_s:
                if join_rule == "close":
                    close(cur, t)
                    cur = open_round(t, train)
                else:
                    for s in sorted(new):
                        cur.work[s] = Work(s, since=t)
                    if len(cur.training()) > 1:
                        cur.deadline = min(cur.deadline, t + round_min_s)
        # the open round's deadline is a change point too
        if cur is not None and (not pending or cur.deadline < pending[-1]):
            pending.append(cur.deadline)
    return [r for r in rounds if any(w.seconds > 0 for w in r.work.values())]


def steps_for(rounds: list[PlannedRound], total_steps: int) -> list[PlannedRound]:
    """Fill in Work.steps: total_steps split over all site-rounds in proportion to seconds
    (largest remainder, ties by order), dropping work that gets no step and empty rounds."""
    works = [w for r in rounds for w in r.work.values()]
    seconds = sum(w.seconds for w in works)
    if seconds <= 0 or total_steps <= 0:
        raise ValueError("the schedule trains no site at all: pick another trace, span or sites")
    exact = [total_steps * w.seconds / seconds for w in works]
    for w, x in zip(works, exact, strict=True):
        w.steps = math.floor(x)
    left = total_steps - sum(w.steps for w in works)
    order = sorted(range(len(works)), key=lambda i: (-(exact[i] - math.floor(exact[i])), i))
    for i in order[:left]:
        works[i].steps += 1
    kept = []
    for r in rounds:
        r.work = {s: w for s, w in r.work.items() if w.steps > 0}
        if r.work:
            kept.append(r)
    return kept


def continuous(sites: Sequence[str], start: float, end: float) -> dict[str, list]:
    """Spans for continuous training: every site trains over the whole [start, end)."""
    return {s: [(start, end)] for s in sites}
