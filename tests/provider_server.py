"""A real HTTP server on 127.0.0.1 that answers like WattTime v3 and Electricity Maps v3, for
the live-source tests: the documented response formats and auth schemes, scripted faults
(any status, headers, body, delay), and a log of every value it served.

The data: per region, points [(t, gCO2/kWh)] on the provider's time grid; at the server's
``now()`` the current point is the last one at or before it, the forecast the points after
it (a perfect forecast, unless a test scripts another answer). A missing point is a gap: the
current value stops advancing.
"""

from __future__ import annotations

import base64
import bisect
import json
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from pilot.energy.traces import LBS_PER_MWH_TO_G_PER_KWH

Points = list[tuple[float, float]]


def wt_time(t: float) -> str:  # WattTime writes +00:00 offsets
    return datetime.fromtimestamp(t, UTC).isoformat()


def em_time(t: float) -> str:  # Electricity Maps writes milliseconds and Z
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


@dataclass
class Fault:
    path: str
    status: int = 500
    body: str = '{"error": "scripted"}'
    headers: dict[str, str] | None = None
    delay_s: float = 0.0
    times: int = 1
    region: str | None = None  # only requests for this region / zone

    def matches(self, path: str, region: str | None) -> bool:
        return self.times > 0 and self.path == path and self.region in (None, region)


class ProviderServer:
    def __init__(
        self,
        data: dict[str, Points],
        now: Callable[[], float],
        *,
        username: str = "alice",
        password: str | None = None,
        em_token: str | None = None,
        forecast_points: int = 12,
        em_forecast: bool = True,
    ):
        self.data = {r: sorted(p) for r, p in data.items()}
        self.now = now
        self.username = username
        self.password = password or secrets.token_urlsafe(16)
        self.em_token = em_token or secrets.token_urlsafe(16)
        self.forecast_points = forecast_points
        self.em_forecast = em_forecast
        self.tokens: set[str] = set()  # every WattTime token ever issued (valid or not)
        self.valid: set[str] = set()
        self.logins = 0
        self.requests: list[str] = []  # paths, in order
        self.served: list[tuple[str, str, float, float]] = []  # (api, region, t, g/kWh)
        self.faults: list[Fault] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        # a short poll interval: shutdown() waits for it
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.02,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def __enter__(self) -> ProviderServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    # -- scripting ---------------------------------------------------------------------------
    def fail(self, path: str, **kw) -> None:
        """Answer the next ``times`` requests to ``path`` with this fault instead."""
        with self._lock:
            self.faults.append(Fault(path, **kw))

    def set_from(self, region: str, t: float, value: float) -> None:
        """From ``t`` on, the region's points (current and forecast alike) are ``value``."""
        with self._lock:
            self.data[region] = [(pt, value if pt >= t else v) for pt, v in self.data[region]]

    def revoke_tokens(self) -> None:
        with self._lock:
            self.valid.clear()

    def credentials(self) -> list[str]:
        return [self.password, self.em_token, *self.tokens]

    # -- documented answers ------------------------------------------------------------------
    def current(self, region: str, at: float | None = None) -> int | None:
        """Index of the region's point current at ``at`` (default: now); None before any."""
        at = self.now() if at is None else at
        i = bisect.bisect_right([t for t, _ in self.data.get(region, [])], at) - 1
        return None if i < 0 else i

    def watttime_body(self, region: str, at: float | None = None) -> dict | None:
        i = self.current(region, at)
        if i is None:
            return None
        pts = self.data[region][i : i + 1 + self.forecast_points]
        return {
            "data": [
                {"point_time": wt_time(t), "value": v / LBS_PER_MWH_TO_G_PER_KWH} for t, v in pts
            ],
            "meta": {
                "data_point_period_seconds": 300,
                "region": region,
                "warnings": [],
                "signal_type": "co2_moer",
                "model": {"date": "2023-03-01"},
                "units": "lbs_co2_per_mwh",
                "generated_at_period_seconds": 300,
                "generated_at": wt_time(pts[0][0]),
            },
        }

    def em_latest_body(self, zone: str, at: float | None = None) -> dict | None:
        i = self.current(zone, at)
        if i is None:
            return None
        t, v = self.data[zone][i]
        return {
            "zone": zone,
            "carbonIntensity": v,
            "datetime": em_time(t),
            "updatedAt": em_time(t + 60),
            "createdAt": em_time(t + 30),
            "emissionFactorType": "lifecycle",
            "isEstimated": False,
            "estimationMethod": None,
        }

    def em_forecast_body(self, zone: str, at: float | None = None) -> dict | None:
        i = self.current(zone, at)
        if i is None:
            return None
        pts = self.data[zone][i + 1 : i + 1 + self.forecast_points]
        return {
            "zone": zone,
            "forecast": [{"carbonIntensity": v, "datetime": em_time(t)} for t, v in pts],
            "updatedAt": em_time(self.data[zone][i][0]),
        }

    # -- HTTP --------------------------------------------------------------------------------
    def _answer(self, path: str, query: dict[str, str], headers) -> tuple[int, str, dict]:
        with self._lock:
            self.requests.append(path)
            region = query.get("region", query.get("zone"))
            fault = next((f for f in self.faults if f.matches(path, region)), None)
            if fault is not None:
                fault.times -= 1
        if fault is not None:
            time.sleep(fault.delay_s)
            return fault.status, fault.body, fault.headers or {}
        if path == "/login":
            return self._login(headers.get("Authorization", ""))
        if path == "/v3/forecast":
            if headers.get("Authorization", "").removeprefix("Bearer ") not in self.valid:
                return 401, '{"error": "invalid token"}', {}
            if query.get("signal_type") != "co2_moer":
                return 400, '{"error": "signal_type"}', {}
            return self._serve("watttime", query.get("region", ""), self.watttime_body)
        if path.startswith("/v3/carbon-intensity/"):
            if headers.get("auth-token") != self.em_token:
                return 401, '{"error": "Invalid authentication token"}', {}
            zone = query.get("zone", "")
            if path.endswith("/latest"):
                return self._serve("electricitymaps", zone, self.em_latest_body)
            if path.endswith("/forecast"):
                if not self.em_forecast:
                    return 403, '{"error": "not in your plan"}', {}
                body = self.em_forecast_body(zone)
                return (200, json.dumps(body), {}) if body else (404, '{"error": "zone"}', {})
        return 404, '{"error": "not found"}', {}

    def _login(self, auth: str) -> tuple[int, str, dict]:
        expected = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        if auth != f"Basic {expected}":
            return 401, '{"error": "invalid credentials"}', {}
        token = secrets.token_urlsafe(24)
        with self._lock:
            self.logins += 1
            self.tokens.add(token)
            self.valid.add(token)
        return 200, json.dumps({"token": token}), {}

    def _serve(self, api: str, region: str, body_of) -> tuple[int, str, dict]:
        body = body_of(region)
        if body is None:
            return 400, json.dumps({"error": f"no data for {region!r}"}), {}
        i = self.current(region)
        t, v = self.data[region][i]
        with self._lock:
            self.served.append((api, region, t, v))
        return 200, json.dumps(body), {}

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                u = urlparse(self.path)
                query = {k: v[0] for k, v in parse_qs(u.query).items()}
                status, body, headers = server._answer(u.path, query, self.headers)
                data = body.encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left

            def log_message(self, *args):  # quiet: the test output stays readable
                pass

        return Handler
