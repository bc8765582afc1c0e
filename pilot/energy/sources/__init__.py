"""Curtailment-signal sources behind one interface (base.Source): a trace replay (trace.py)
or live provider feeds (live.py over watttime.py / emaps.py), recorded by record.py.

Each site names its source in the sites config (``source = "watttime"``; its ``region`` is
the provider's region or zone); credentials come from the environment only
(credentials.py). ``open_sources`` builds and starts one source per kind for a site set.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from pilot.config.sites import SitesConfig
from pilot.energy.sources.base import Provider, Source, SourceError, Timer, WallTimer
from pilot.energy.sources.emaps import ElectricityMaps
from pilot.energy.sources.live import LiveSource
from pilot.energy.sources.record import SignalRecord
from pilot.energy.sources.watttime import WattTime


def _provider(
    kind: str, timer: Timer, env: Mapping[str, str] | None, horizon_s: float, http: dict[str, Any]
) -> Provider:
    if kind == "watttime":
        return WattTime.from_env(timer, env, horizon_s=horizon_s, **http)
    return ElectricityMaps.from_env(timer, env, **http)


def open_sources(
    sites: SitesConfig,
    trace_source: Source | None,
    *,
    horizon_s: float,
    now: Callable[[], float] = time.time,
    poll_s: float | None = None,
    max_age_s: float | None = None,
    record: SignalRecord | None = None,
    env: Mapping[str, str] | None = None,
    http: dict[str, Any] | None = None,
) -> dict[str, Source]:
    """{site: started source}. Live sources log in and poll once here, so rejected
    credentials fail now (AuthError) rather than at some later tick. ``poll_s`` /
    ``max_age_s`` override the providers' defaults; ``http``: options of
    pilot.energy.sources.http.HttpClient (timeouts, retries, backoff)."""
    kinds = {s.source for s in sites.sites}
    if "trace" in kinds and trace_source is None:
        raise SourceError('sites with source = "trace" need a trace (--trace)')
    by_kind: dict[str, Source] = {"trace": trace_source} if trace_source is not None else {}
    try:
        for kind in sorted(kinds - {"trace"}):
            timer = WallTimer()
            provider = _provider(kind, timer, env, horizon_s, http or {})
            regions = [s.region for s in sites.sites if s.source == kind]
            src = LiveSource(
                provider,
                regions,
                timer,
                horizon_s=horizon_s,
                now=now,
                poll_s=poll_s,
                max_age_s=max_age_s,
                record=record,
            )
            by_kind[kind] = src  # before start: closed below if starting fails
            src.start()
    except BaseException:
        for src in by_kind.values():
            src.close()
        raise
    return {s.name: by_kind[s.source] for s in sites.sites}
