"""The fleet of sites as the ServerApp sees it: one record per site (its node, whether it is
provisioned, leaving, restarting) plus the node ids the Grid shows. The Fleet is the only
writer of that bookkeeping; the control loop asks it and tells it what happened (it emits no
events and calls no provisioner).

A site's state (``SiteState``), from its record, its provisioner status and the round:

    OFF --provision--> PROVISIONING --node mapped, delay over--> READY --in a round--> TRAINING
    TRAINING --stop requested--> LEAVING --reply in / dropped--> READY (kept warm) or OFF
    any provisioned state --node died--> FAILED --restart due (backoff)--> PROVISIONING
    FAILED --restart budget spent--> FAILED, released, for the cool-down --> OFF

A node's deaths are counted in a sliding window (``RestartBudget``): the first restart is at
once, each further one waits twice as long, and one death too many releases the site for a
cool-down instead of restarting a crash loop forever.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum


class SiteState(StrEnum):
    OFF = "off"
    PROVISIONING = "provisioning"
    READY = "ready"
    TRAINING = "training"
    LEAVING = "leaving"
    FAILED = "failed"


@dataclass(frozen=True)
class RestartBudget:
    """How often a site's dead node is restarted (wall seconds)."""

    restarts: int = 5  # deaths within ``window_s`` that are restarted; one more: cool-down
    window_s: float = 600.0
    backoff_s: float = 2.0  # the wait before the 2nd restart in the window; doubling after
    cooldown_s: float = 600.0  # a site out of restarts is not provisioned for this long

    def delay(self, deaths: int) -> float | None:
        """Wait before restarting after the ``deaths``-th death in the window (None: spent)."""
        if deaths > self.restarts:
            return None
        return 0.0 if deaths <= 1 else self.backoff_s * 2 ** (deaths - 2)


@dataclass
class SiteRecord:
    provisioned: bool = False
    node: int | None = None  # its current node on the Grid (None: not mapped)
    gpus: int = 0
    device: str = ""
    announced: bool = False  # provision_complete emitted since it was provisioned
    leaving: str | None = None  # why it was asked to stop; its reply is pending
    deaths: list[float] = field(default_factory=list)  # wall times, within the budget window
    restart_at: float | None = None  # wall time its dead node is started again
    failed_until: float = -math.inf  # cool-down after the restart budget was spent


@dataclass
class Fleet:
    query_retry_s: float = 5.0  # wall seconds before a node that failed a QUERY is asked again
    query_ttl_s: float = 120.0  # a QUERY unanswered this long is asked again
    budget: RestartBudget = field(default_factory=RestartBudget)
    records: dict[str, SiteRecord] = field(default_factory=dict)
    node_site: dict[int, str] = field(default_factory=dict)
    queries: dict[str, tuple[int, float]] = field(default_factory=dict)  # msg -> (node, sent)
    query_failed: dict[int, float] = field(default_factory=dict)  # node -> wall of failure
    known_nodes: set[int] = field(default_factory=set)

    def record(self, site: str) -> SiteRecord:
        return self.records.setdefault(site, SiteRecord())

    # -- read views -------------------------------------------------------------------------
    @property
    def site_node(self) -> dict[str, int]:
        return {s: r.node for s, r in self.records.items() if r.node is not None}

    @property
    def provisioned(self) -> set[str]:
        return {s for s, r in self.records.items() if r.provisioned}

    def node(self, site: str) -> int | None:
        rec = self.records.get(site)
        return None if rec is None else rec.node

    def leaving(self, site: str) -> bool:
        rec = self.records.get(site)
        return rec is not None and rec.leaving is not None

    def info(self, site: str) -> dict:
        rec = self.record(site)
        return {"gpus": rec.gpus, "device": rec.device}

    # -- nodes ------------------------------------------------------------------------------
    def vanished(self, on_grid: set[int]) -> list[int]:
        """Known nodes no longer on the Grid."""
        return sorted(self.known_nodes - on_grid)

    def to_ask(self, on_grid: set[int], now: float) -> list[int]:
        """Nodes on the Grid not asked yet (or asked too long ago without an answer)."""
        return [
            nid
            for nid in sorted(on_grid - self.known_nodes)
            if now - self.query_failed.get(nid, -math.inf) >= self.query_retry_s
        ]

    def asked(self, nid: int, msg_id: str, now: float) -> None:
        self.queries[msg_id] = (nid, now)
        self.known_nodes.add(nid)

    def answered(self, msg_id: str) -> int | None:
        """The node a QUERY reply is from (None: not a QUERY of ours)."""
        entry = self.queries.pop(msg_id, None)
        return None if entry is None else entry[0]

    def query_failed_at(self, nid: int, now: float) -> None:
        self.known_nodes.discard(nid)
        self.query_failed[nid] = now

    def expire_queries(self, now: float) -> None:
        for mid, (nid, sent) in list(self.queries.items()):
            if now - sent > self.query_ttl_s:  # the node died before replying: ask again later
                del self.queries[mid]
                self.known_nodes.discard(nid)

    def map(self, nid: int, site: str, gpus: int, device: str) -> None:
        """``nid`` is ``site``'s node now (a restarted node replaces its stale registration)."""
        rec = self.record(site)
        if rec.node is not None and rec.node != nid:
            self.node_site.pop(rec.node, None)
        self.node_site[nid] = site
        rec.node, rec.gpus, rec.device = nid, gpus, device

    def gone(self, nid: int) -> str | None:
        """``nid`` left the Grid; returns its site when it was that site's current node."""
        self.known_nodes.discard(nid)
        site = self.node_site.pop(nid, None)
        if site is None or self.record(site).node != nid:
            return None
        rec = self.record(site)
        rec.node, rec.announced = None, False
        return site

    def unmap(self, site: str) -> None:
        """The site's node died: no more work for it; its new node maps by its QUERY reply."""
        rec = self.record(site)
        if rec.node is not None:
            self.node_site.pop(rec.node, None)
        rec.node, rec.announced = None, False

    # -- sites ------------------------------------------------------------------------------
    def ready(self, status: dict[str, str]) -> set[str]:
        """Sites that can train: node mapped, provisioning delay over, not leaving, not
        waiting for a restart."""
        return {
            s
            for s, r in self.records.items()
            if r.node is not None
            and r.leaving is None
            and r.restart_at is None
            and status.get(s) != "provisioning"
        }

    def newly_ready(self, ready: set[str]) -> list[str]:
        """Provisioned sites ready for the first time since provisioning (to announce)."""
        new = sorted(
            s for s in ready if self.record(s).provisioned and not self.record(s).announced
        )
        for s in new:
            self.record(s).announced = True
        return new

    def may_provision(self, site: str, now: float) -> bool:
        """False while ``site`` cools down after spending its restart budget."""
        return now >= self.record(site).failed_until

    def provision(self, site: str) -> None:
        self.record(site).provisioned = True

    def deprovision(self, site: str) -> None:
        """Released. The node mapping goes when the node leaves the Grid (``gone``): a
        hand-started node stays connected and can be given work again later."""
        rec = self.record(site)
        rec.provisioned, rec.announced, rec.leaving, rec.restart_at = False, False, None, None

    def leave(self, site: str, reason: str) -> None:
        self.record(site).leaving = reason

    def left(self, site: str) -> None:
        """A leaving site's reply is in (or it was dropped)."""
        self.record(site).leaving = None

    def died(self, site: str, now: float) -> float | None:
        """``site``'s node died (already unmapped): when to start it again (wall), by the
        restart budget; None: the budget is spent and the site cools down (release it)."""
        rec = self.record(site)
        rec.deaths = [t for t in rec.deaths if now - t < self.budget.window_s] + [now]
        delay = self.budget.delay(len(rec.deaths))
        if delay is None:
            rec.deaths, rec.restart_at = [], None
            rec.failed_until = now + self.budget.cooldown_s
            return None
        rec.restart_at = now + delay
        return rec.restart_at

    def restarting(self, site: str) -> bool:
        return self.record(site).restart_at is not None

    def restarts_due(self, now: float) -> list[str]:
        """Provisioned sites whose dead node is due to start again (cleared as returned)."""
        due = sorted(
            s
            for s, r in self.records.items()
            if r.provisioned and r.restart_at is not None and now >= r.restart_at
        )
        for s in due:
            self.record(s).restart_at = None
        return due

    def waiting(self) -> bool:
        """Something is expected soon: a QUERY answer, a leaving site's reply, a node."""
        return bool(
            self.queries
            or any(
                r.leaving is not None or (r.provisioned and r.node is None)
                for r in self.records.values()
            )
        )

    def state(self, site: str, status: str, training: bool, now: float = -math.inf) -> SiteState:
        """``site``'s state given its provisioner status and whether it trains in the round."""
        rec = self.record(site)
        if status.startswith("failed") or rec.restart_at is not None or now < rec.failed_until:
            return SiteState.FAILED
        if rec.leaving is not None:
            return SiteState.LEAVING
        if training:
            return SiteState.TRAINING
        if rec.node is not None and status != "provisioning":
            return SiteState.READY
        if rec.provisioned:
            return SiteState.PROVISIONING
        return SiteState.OFF
