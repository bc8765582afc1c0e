"""WattTime API v3: marginal operating emissions rate (MOER, ``co2_moer``) per grid region.

Login: ``GET /login`` with HTTP basic auth returns ``{"token": ...}``, a bearer token valid for
30 minutes; we renew it after 25 and whenever a data request answers 401. Data: ``GET
/v3/forecast?region=&signal_type=co2_moer&horizon_hours=`` returns ``{"data": [{"point_time",
"value"}, ...], "meta": {"region", "units": "lbs_co2_per_mwh", "generated_at", ...}}``; its
first point is the current 5-minute interval, so one request gives both "now" and the
forecast. Published limits: 3,000 requests per rolling 5 minutes, 100 for /login.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from typing import Any

from pilot.energy.sources.base import AuthError, DataError, Observation, Timer
from pilot.energy.sources.credentials import require
from pilot.energy.sources.http import HttpClient, RateLimit, Rejected
from pilot.energy.sources.parse import field, points, time_of
from pilot.energy.traces import LBS_PER_MWH_TO_G_PER_KWH

log = logging.getLogger("pilot.energy.sources")

BASE_URL = "https://api.watttime.org"
TOKEN_RENEW_S = 25 * 60  # tokens last 30 min: renew with a margin for clock and request time
UNITS = "lbs_co2_per_mwh"


class WattTime:
    name = "watttime"
    poll_s = 300.0  # the signal updates every 5 minutes
    max_age_s = 900.0  # three missed intervals: stale
    rate = (3000, 300.0)  # published: requests per rolling window (s)
    login_rate = (100, 300.0)

    def __init__(
        self,
        username: str,
        password: str,
        timer: Timer,
        base_url: str = BASE_URL,
        horizon_s: float = 3600.0,
        **http: Any,
    ):
        self._auth = (username, password)
        self.timer = timer
        self.horizon_hours = max(1, math.ceil(horizon_s / 3600.0))
        self.http = HttpClient(self.name, base_url, timer, RateLimit(*self.rate), **http)
        self.login_limit = RateLimit(*self.login_rate)
        self._token: str | None = None
        self._token_at = -math.inf

    @classmethod
    def from_env(cls, timer: Timer, env: Mapping[str, str] | None = None, **kw: Any) -> WattTime:
        """Credentials from WATTTIME_USERNAME / WATTTIME_PASSWORD (or *_FILE); the base URL
        from WATTTIME_API_URL (default: the real API)."""
        env = os.environ if env is None else env
        user, password = require(["WATTTIME_USERNAME", "WATTTIME_PASSWORD"], "WattTime", env)
        return cls(user, password, timer, base_url=env.get("WATTTIME_API_URL") or BASE_URL, **kw)

    def login(self) -> None:
        try:
            body = self.http.get_json("/login", auth=self._auth, limit=self.login_limit)
        except Rejected as exc:
            if exc.status in (401, 403):
                raise AuthError(
                    f"WattTime rejected the login (HTTP {exc.status}): check "
                    "WATTTIME_USERNAME and WATTTIME_PASSWORD"
                ) from None
            raise DataError(str(exc)) from None
        token = body.get("token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise DataError("watttime /login: answer has no token")
        self._token, self._token_at = token, self.timer.monotonic()

    def fetch(self, region: str) -> Observation:
        params = {"region": region, "signal_type": "co2_moer", "horizon_hours": self.horizon_hours}
        try:
            body = self.http.get_json("/v3/forecast", params, self._headers())
        except Rejected as exc:
            if exc.status != 401:
                raise DataError(f"{exc} (region not in your plan, or unknown)") from None
            self._token = None  # revoked or expired early: log in again, once
            try:
                body = self.http.get_json("/v3/forecast", params, self._headers())
            except Rejected as again:
                raise DataError(str(again)) from None
        return parse_forecast(body, region)

    def _headers(self) -> dict[str, str]:
        if self._token is None or self.timer.monotonic() - self._token_at >= TOKEN_RENEW_S:
            self.login()
        return {"Authorization": f"Bearer {self._token}"}


def parse_forecast(body: Any, region: str) -> Observation:
    where = f"watttime {region} /v3/forecast"
    meta = field(body, "meta", dict, where)
    answered = meta.get("region")
    if answered is not None and answered != region:
        raise DataError(f"{where}: answer is for region {answered!r}")
    if meta.get("units") != UNITS:
        raise DataError(f"{where}: units {meta.get('units')!r}, expected {UNITS!r}")
    series = points(field(body, "data", list, where), "point_time", "value", where)
    series = [(t, v * LBS_PER_MWH_TO_G_PER_KWH) for t, v in series]
    issued = time_of(meta["generated_at"], where) if "generated_at" in meta else series[0][0]
    t0, v0 = series[0]
    return Observation(region, t0, v0, forecast=series, issued_at=issued)
