"""Electricity Maps API v3: carbon intensity per zone, an *average* (consumption-weighted,
lifecycle by default) intensity, not a marginal one: it moves less at a window's edge than
WattTime's MOER, so a threshold tuned for marginal signals means something else here.

``GET /v3/carbon-intensity/latest?zone=`` returns ``{"zone", "carbonIntensity", "datetime",
...}``; ``GET /v3/carbon-intensity/forecast?zone=`` returns ``{"zone", "forecast":
[{"carbonIntensity", "datetime"}, ...], "updatedAt"}`` (plans without forecast access get
401/403: we then publish persistence). Auth: the ``auth-token`` header. Rate limits depend
on the plan and are not published as a number: we stay at one request a second and
honour 429 Retry-After.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from pilot.energy.sources.base import AuthError, DataError, Observation, Series, Timer, Unavailable
from pilot.energy.sources.credentials import require
from pilot.energy.sources.http import HttpClient, RateLimit, Rejected
from pilot.energy.sources.parse import field, number, points, time_of

log = logging.getLogger("pilot.energy.sources")

BASE_URL = "https://api.electricitymap.org"


class ElectricityMaps:
    name = "electricitymaps"
    poll_s = 300.0
    max_age_s = 2 * 3600.0  # many zones are hourly, published with a delay
    rate = (60, 60.0)  # plan-dependent, unpublished: one a second on average

    def __init__(self, token: str, timer: Timer, base_url: str = BASE_URL, **http: Any):
        self._headers = {"auth-token": token}
        self.http = HttpClient(self.name, base_url, timer, RateLimit(*self.rate), **http)
        self.has_forecast = True

    @classmethod
    def from_env(
        cls, timer: Timer, env: Mapping[str, str] | None = None, **kw: Any
    ) -> ElectricityMaps:
        """The token from ELECTRICITYMAPS_TOKEN (or *_FILE); the base URL from
        ELECTRICITYMAPS_API_URL (default: the real API)."""
        env = os.environ if env is None else env
        (token,) = require(["ELECTRICITYMAPS_TOKEN"], "Electricity Maps", env)
        return cls(token, timer, base_url=env.get("ELECTRICITYMAPS_API_URL") or BASE_URL, **kw)

    def login(self) -> None:
        """No session to open: the first request checks the token."""

    def fetch(self, region: str) -> Observation:
        where = f"electricitymaps {region} /v3/carbon-intensity/latest"
        try:
            body = self.http.get_json(
                "/v3/carbon-intensity/latest", {"zone": region}, self._headers
            )
        except Rejected as exc:
            if exc.status in (401, 403):
                raise AuthError(
                    f"Electricity Maps rejected the token for zone {region} (HTTP "
                    f"{exc.status}): check ELECTRICITYMAPS_TOKEN and the zones of your plan"
                ) from None
            raise DataError(f"{exc} (unknown zone?)") from None
        _check_zone(body, region, where)
        t = time_of(field(body, "datetime", str, where), where)
        mci = number(field(body, "carbonIntensity", object, where), where)
        series, issued = self._forecast(region) if self.has_forecast else (None, None)
        return Observation(region, t, mci, forecast=series, issued_at=issued)

    def _forecast(self, region: str) -> tuple[Series | None, float | None]:
        """The zone's forecast, or (None, None) when this answer has none: the latest value
        stays usable whatever goes wrong here."""
        where = f"electricitymaps {region} /v3/carbon-intensity/forecast"
        try:
            body = self.http.get_json(
                "/v3/carbon-intensity/forecast", {"zone": region}, self._headers
            )
            _check_zone(body, region, where)
            series = points(
                field(body, "forecast", list, where), "datetime", "carbonIntensity", where
            )
            issued = time_of(body["updatedAt"], where) if "updatedAt" in body else None
            return series, issued
        except Rejected as exc:
            if exc.status in (401, 403):
                self.has_forecast = False
                log.warning("%s: no forecast access on this plan; publishing persistence", exc)
            else:
                log.error("%s; forecast skipped", exc)
        except (DataError, Unavailable) as exc:
            log.error("%s; forecast skipped", exc)
        return None, None


def _check_zone(body: Any, region: str, where: str) -> None:
    zone = body.get("zone") if isinstance(body, dict) else None
    if zone is not None and zone != region:
        raise DataError(f"{where}: answer is for zone {zone!r}")
