"""A live provider as a source: a background poller keeps each region's latest value and
forecast; ticks read them without waiting on the network.

Faults never stop the poller: a provider that stays down through the HTTP client's retries
makes the region stale at once; an unusable answer (malformed, another region, an older or
conflicting timestamp) is logged and skipped, and the value it would have replaced ages
into staleness after ``max_age_s``. Rejected credentials fail ``start`` (exit 2).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from pilot.energy.forecast import compose
from pilot.energy.sources.base import (
    AuthError,
    Cancelled,
    DataError,
    Observation,
    Provider,
    Reading,
    Series,
    Source,
    Timer,
    Unavailable,
)
from pilot.energy.sources.record import SignalRecord
from pilot.energy.traces import iso

log = logging.getLogger("pilot.energy.sources")


class LiveSource(Source):
    """``provider``'s values for ``regions``, polled every ``poll_s`` wall seconds (``timer``)
    and stale after ``max_age_s`` of simulated time (``now``: the run's clock; wall time at
    speed-up 1). Every new value and forecast goes to ``record``."""

    def __init__(
        self,
        provider: Provider,
        regions: list[str],
        timer: Timer,
        *,
        horizon_s: float,
        now: Callable[[], float] = time.time,
        poll_s: float | None = None,
        max_age_s: float | None = None,
        record: SignalRecord | None = None,
    ):
        self.provider, self.regions, self.timer = provider, sorted(set(regions)), timer
        self.kind = provider.name
        self.horizon_s, self.now, self.record = horizon_s, now, record
        self.poll_s = provider.poll_s if poll_s is None else poll_s
        self.max_age_s = provider.max_age_s if max_age_s is None else max_age_s
        self._lock = threading.Lock()
        self._latest: dict[str, Observation] = {}
        self._forecast: dict[str, tuple[float | None, Series]] = {}  # (issued_at, series)
        self._down: dict[str, str] = {}  # region -> why the provider is failing it
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        try:
            self.provider.login()
        except (Unavailable, DataError) as exc:  # not the user's fault: the polls retry it
            log.warning("%s: %s; retrying with the polls", self.kind, exc)
        for region in self.regions:
            self.poll_region(region, strict=True)
        self._thread = threading.Thread(target=self._run, name=f"poll-{self.kind}", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.timer.cancel()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        try:
            while True:
                self.timer.sleep(self.poll_s)
                for region in self.regions:
                    self.poll_region(region)
        except Cancelled:
            return

    def poll_region(self, region: str, strict: bool = False) -> None:
        """Ask the provider once (with its retries). ``strict``: rejected credentials raise."""
        try:
            obs = self.provider.fetch(region)
        except Cancelled:
            raise
        except AuthError as exc:
            if strict:
                raise
            self._fail(region, str(exc))
        except Unavailable as exc:
            self._fail(region, str(exc))
        except DataError as exc:
            log.error("%s; value skipped", exc)
        except Exception:  # a bug must not silence the feed: log it, the region ages out
            log.exception("%s %s: unexpected error; value skipped", self.kind, region)
        else:
            self._accept(obs)

    def _fail(self, region: str, why: str) -> None:
        log.error("%s; %s signal stale until the provider answers", why, region)
        with self._lock:
            self._down[region] = why

    def _accept(self, obs: Observation) -> None:
        r = obs.region
        with self._lock:
            last = self._latest.get(r)
            if last is not None and obs.time < last.time:
                log.error(
                    "%s %s: out-of-order value for %s (have %s); skipped",
                    self.kind, r, iso(obs.time), iso(last.time),
                )  # fmt: skip
                return
            if last is not None and obs.time == last.time and obs.mci != last.mci:
                log.error(
                    "%s %s: duplicate timestamp %s with another value (%.3f, had %.3f); skipped",
                    self.kind, r, iso(obs.time), obs.mci, last.mci,
                )  # fmt: skip
                return
            new_value = last is None or obs.time > last.time
            self._latest[r] = obs
            if self._down.pop(r, None) is not None:
                log.info("%s %s: signal fresh again (%s)", self.kind, r, iso(obs.time))
            issued = self._forecast.get(r, (None, None))[0]
            new_forecast = obs.forecast is not None and (
                obs.issued_at is None or obs.issued_at != issued
            )
            if new_forecast:
                self._forecast[r] = (obs.issued_at, obs.forecast)
        if self.record is not None:
            if new_value:
                self.record.observed(self.kind, r, obs.time, obs.mci, self.now())
            if new_forecast:
                issued_at = self.now() if obs.issued_at is None else obs.issued_at
                self.record.forecast(self.kind, r, issued_at, obs.forecast)

    def reading(self, region: str, now: float) -> Reading | None:
        with self._lock:
            obs = self._latest.get(region)
            if obs is None or region in self._down or now - obs.time > self.max_age_s:
                return None
            series = self._forecast.get(region, (None, []))[1]
        return Reading(obs.time, obs.mci, compose(now, obs.mci, series, self.horizon_s))

    def stale_reason(self, region: str) -> str:
        with self._lock:
            obs = self._latest.get(region)
            if region in self._down:
                return self._down[region]
        if obs is None:
            return f"{self.kind} {region}: no value yet"
        return f"{self.kind} {region}: last value ({iso(obs.time)}) older than {self.max_age_s:g} s"
