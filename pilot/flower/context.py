"""What every part of the live control loop shares, owned by the loop (``ElasticStrategy``):
the run's config and sites, the Grid, Redis signals, the event log, the fleet, the clock
(replaced whenever the energy simulation re-anchors it) and the checkpointed server state."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pilot.config.sites import SitesConfig
from pilot.control.fleet import Fleet
from pilot.control.run_config import RunConfig
from pilot.control.server_state import ServerState
from pilot.energy.clock import Clock
from pilot.events.log import EventLog


@dataclass
class RunContext:
    cfg: RunConfig
    sites: SitesConfig
    grid: Any  # flwr.serverapp.Grid (or the tests' in-memory one)
    sig: Any  # pilot.infra.signals.Signals
    events: EventLog
    fleet: Fleet
    clock: Clock
    dtype: Any  # torch dtype of the weights on the wire
    state: ServerState | None = None  # set by the loop's start(): from the checkpoint or fresh

    @property
    def server(self) -> ServerState:
        assert self.state is not None, "the run's state is loaded by start()"
        return self.state
