"""The one interface every curtailment-signal source implements, and the errors it raises.

A source answers, per grid region and simulated instant, the region's current MCI (gCO2/kWh),
the time that value describes, and the forecast to publish (``forecast:<site>``), or None
when it has no value fresh enough: a stale region, which the energy simulation publishes as
not curtailed. ``trace.TraceSource`` replays a trace; ``live.LiveSource`` polls a provider
(``watttime``, ``emaps``) in the background.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Protocol

from pilot.energy.forecast import Series


@dataclass(frozen=True)
class Reading:
    """What the energy simulation publishes for a region at one tick."""

    time: float  # the instant the value describes (a provider's point_time), epoch s
    mci: float  # gCO2/kWh
    forecast: Series  # from the tick's instant over the horizon ([] = no forecast)


@dataclass(frozen=True)
class Observation:
    """One answer of a provider: the latest value and, where it has one, its forecast."""

    region: str
    time: float
    mci: float
    forecast: Series | None = None  # None: this answer carries no forecast
    issued_at: float | None = None  # when the provider generated the forecast


class Provider(Protocol):
    """A live provider's client (watttime.WattTime, emaps.ElectricityMaps)."""

    name: str
    poll_s: float  # how often its signal changes (wall s)
    max_age_s: float  # a value older than this is stale

    def login(self) -> None:
        """Check the credentials now (AuthError)."""
        ...

    def fetch(self, region: str) -> Observation:
        """The region's latest value; raises Unavailable, DataError or AuthError."""
        ...


class Source(ABC):
    kind: str = ""

    def start(self) -> None:  # noqa: B027 - an optional hook (a trace has nothing to start)
        """Connect and check credentials (AuthError) before the first tick."""

    def close(self) -> None:  # noqa: B027 - an optional hook
        """Stop background work."""

    def stale_reason(self, region: str) -> str:
        return "no value"

    @abstractmethod
    def reading(self, region: str, now: float) -> Reading | None:
        """The region's signal at simulated instant ``now``; None when stale."""


class SourceError(ValueError):
    """A setup problem the user must fix (missing credentials, a bad record dir): exit 2."""


class AuthError(SourceError):
    """The provider rejected the credentials."""


class Unavailable(Exception):
    """The provider did not answer usefully after the retries (5xx, timeouts, 429s)."""


class DataError(Exception):
    """An answer that cannot be used (malformed JSON, missing fields, unknown region)."""


class Cancelled(Exception):
    """A wait was cut short because the source is closing."""


class Timer(Protocol):
    """Wall time for HTTP waits, rate limits and token lifetimes (tests inject a fake)."""

    def monotonic(self) -> float: ...

    def sleep(self, seconds: float) -> None:
        """Wait; raise Cancelled once ``cancel`` was called."""
        ...

    def cancel(self) -> None: ...


class WallTimer:
    def __init__(self) -> None:
        self._stop = threading.Event()

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        if self._stop.wait(max(0.0, seconds)):
            raise Cancelled()

    def cancel(self) -> None:
        self._stop.set()
