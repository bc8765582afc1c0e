"""The fleet of sites as the ServerApp sees it: which Flower node is which site, which sites
are provisioned, ready and leaving. The Fleet is the only writer of that bookkeeping; the
control loop asks it and tells it what happened (it emits no events and calls no provisioner).

A site's state (``SiteState``), from the bookkeeping and the round:

    OFF --provision--> PROVISIONING --node mapped, delay over--> READY --in a round--> TRAINING
    TRAINING --stop requested--> LEAVING --reply in / dropped--> READY (kept warm) or OFF
    any provisioned state --provisioner says failed--> FAILED --node replaced--> PROVISIONING
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


@dataclass
class Fleet:
    query_retry_s: float = 5.0  # wall seconds before a node that failed a QUERY is asked again
    query_ttl_s: float = 120.0  # a QUERY unanswered this long is asked again
    node_site: dict[int, str] = field(default_factory=dict)
    site_node: dict[str, int] = field(default_factory=dict)
    node_info: dict[str, dict] = field(default_factory=dict)  # site -> {"gpus", "device"}
    queries: dict[str, tuple[int, float]] = field(default_factory=dict)  # msg -> (node, sent)
    query_failed: dict[int, float] = field(default_factory=dict)  # node -> wall of failure
    known_nodes: set[int] = field(default_factory=set)
    provisioned: set[str] = field(default_factory=set)
    complete: set[str] = field(default_factory=set)  # provisioned, ready, announced
    leaving: dict[str, str] = field(default_factory=dict)  # site -> reason, reply pending

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
        old = self.site_node.get(site)
        if old is not None and old != nid:
            self.node_site.pop(old, None)
        self.node_site[nid], self.site_node[site] = site, nid
        self.node_info[site] = {"gpus": gpus, "device": device}

    def gone(self, nid: int) -> str | None:
        """``nid`` left the Grid; returns its site when it was that site's current node."""
        self.known_nodes.discard(nid)
        site = self.node_site.pop(nid, None)
        if site is None or self.site_node.get(site) != nid:
            return None
        del self.site_node[site]
        self.complete.discard(site)
        return site

    def unmap(self, site: str) -> None:
        """The site's node died: no more work for it; its new node maps by its QUERY reply."""
        stale = self.site_node.pop(site, None)
        if stale is not None:
            self.node_site.pop(stale, None)
        self.complete.discard(site)

    # -- sites ------------------------------------------------------------------------------
    def ready(self, status: dict[str, str]) -> set[str]:
        """Sites that can train: node mapped, provisioning delay over, not leaving."""
        return {
            s for s in self.site_node if s not in self.leaving and status.get(s) != "provisioning"
        }

    def newly_ready(self, ready: set[str]) -> list[str]:
        """Provisioned sites ready for the first time since provisioning (to announce)."""
        new = sorted((ready & self.provisioned) - self.complete)
        self.complete.update(new)
        return new

    def provision(self, site: str) -> None:
        self.provisioned.add(site)

    def deprovision(self, site: str) -> None:
        """Released. The node mapping goes when the node leaves the Grid (``gone``): a
        hand-started node stays connected and can be given work again later."""
        self.provisioned.discard(site)
        self.complete.discard(site)
        self.leaving.pop(site, None)

    def leave(self, site: str, reason: str) -> None:
        self.leaving[site] = reason

    def left(self, site: str) -> None:
        """A leaving site's reply is in (or it was dropped)."""
        self.leaving.pop(site, None)

    def waiting(self) -> bool:
        """Something is expected soon: a QUERY answer, a leaving site's reply, a node."""
        return bool(
            self.queries or self.leaving or any(s not in self.site_node for s in self.provisioned)
        )

    def state(self, site: str, status: str, training: bool) -> SiteState:
        """``site``'s state given its provisioner status and whether it trains in the round."""
        if status.startswith("failed"):
            return SiteState.FAILED
        if site in self.leaving:
            return SiteState.LEAVING
        if training:
            return SiteState.TRAINING
        if site in self.site_node and status != "provisioning":
            return SiteState.READY
        if site in self.provisioned:
            return SiteState.PROVISIONING
        return SiteState.OFF
