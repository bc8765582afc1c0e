"""Trace replay as a source: the MCI linearly interpolated at each tick, the forecast from the
configured forecaster (pilot.energy.forecast: perfect, persistence, ...). Never stale."""

from __future__ import annotations

from pilot.energy.forecast import Forecaster
from pilot.energy.sources.base import Reading, Source
from pilot.energy.traces import Trace


class TraceSource(Source):
    kind = "trace"

    def __init__(self, trace: Trace, forecaster: Forecaster, horizon_s: float):
        self.trace, self.forecaster, self.horizon_s = trace, forecaster, horizon_s

    def reading(self, region: str, now: float) -> Reading:
        # the last tick of a span ending with the trace may fall a step past it: hold the end
        t = min(now, self.trace.end)
        mci = round(self.trace.at(region, t), 3)  # as published: the forecast starts from it
        return Reading(now, mci, self.forecaster.forecast(region, now, self.horizon_s, mci))
