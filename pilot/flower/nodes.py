"""Which Flower node is which site: every new node id on the Grid is sent a QUERY, and its
``SiteInfo`` reply maps it in the fleet; a node that leaves the Grid is unmapped."""

from __future__ import annotations

import time
from typing import Any

from pilot.flower.context import RunContext
from pilot.flower.messages import MessageError, SiteInfo

QUERY_TTL_S = 120  # Flower message ttl of a QUERY (wall seconds)


class NodeDiscovery:
    def __init__(self, ctx: RunContext):
        self.ctx = ctx

    def poll(self) -> list[str]:
        """Ask new nodes who they are; returns the sites whose current node left the Grid."""
        from flwr.app import Message, RecordDict

        fleet, now = self.ctx.fleet, time.time()
        on_grid = set(self.ctx.grid.get_node_ids())
        lost = [s for nid in fleet.vanished(on_grid) if (s := fleet.gone(nid)) is not None]
        fresh = fleet.to_ask(on_grid, now)
        if fresh:
            msgs = [
                Message(RecordDict(), dst_node_id=nid, message_type="query", ttl=QUERY_TTL_S)
                for nid in fresh
            ]
            for nid, mid in zip(fresh, self.ctx.grid.push_messages(msgs), strict=True):
                if mid:
                    fleet.asked(nid, mid, now)
        return lost

    def on_reply(self, nid: int, msg: Any) -> None:
        """A QUERY reply: the node is mapped to its site, or the fault is recorded."""
        events, sites = self.ctx.events, self.ctx.sites
        try:
            if msg.has_error():
                raise MessageError(f"QUERY failed: {msg.error.reason}")
            info = SiteInfo.from_message(msg)
        except (MessageError, KeyError) as e:
            self.ctx.fleet.query_failed_at(nid, time.time())
            events.emit("fault", error=f"node {nid}: {e}")
            return
        if info.site not in sites.names:
            events.emit(
                "fault",
                error=f"node {nid} says it is site {info.site!r}, which is not in "
                f"{self.ctx.cfg.sites_file}",
                site=info.site,
            )
            return
        self.ctx.fleet.map(nid, info.site, info.gpus, info.device)
