"""A small JSON-over-HTTP client for the providers: client-side rate limits, retries with
exponential backoff on 5xx / timeouts / connection errors, and 429 handled by waiting out
``Retry-After`` (for every later request too: the limit is per account, not per region).

Errors carry the status and the path only, never headers or bodies: those are where
credentials and tokens travel.
"""

from __future__ import annotations

import collections
import email.utils
import logging
import math
import time
from typing import Any

import requests

from pilot.energy.sources.base import DataError, SourceError, Timer, Unavailable

log = logging.getLogger("pilot.energy.sources")


class Rejected(Exception):
    """A 4xx answer other than 429: retrying will not help."""

    def __init__(self, status: int, what: str):
        super().__init__(f"{what}: HTTP {status}")
        self.status = status


class RateLimit:
    """At most ``count`` requests in any ``window_s`` (a sliding window, like the providers')."""

    def __init__(self, count: int, window_s: float):
        self.count, self.window_s = count, window_s
        self.sent: collections.deque[float] = collections.deque()

    def acquire(self, timer: Timer) -> None:
        while True:
            now = timer.monotonic()
            while self.sent and now - self.sent[0] >= self.window_s:
                self.sent.popleft()
            if len(self.sent) < self.count:
                self.sent.append(now)
                return
            timer.sleep(self.sent[0] + self.window_s - now)


def retry_after_s(value: str | None, now_epoch: float) -> float | None:
    """Seconds a Retry-After header asks for (delta-seconds or an HTTP date); None if absent."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - now_epoch)
    except (TypeError, ValueError):
        return None


class HttpClient:
    def __init__(
        self,
        name: str,
        base_url: str,
        timer: Timer,
        limit: RateLimit,
        *,
        timeout_s: float = 10.0,
        retries: int = 4,
        backoff_s: float = 2.0,
        max_backoff_s: float = 60.0,
    ):
        if not base_url.startswith(("http://", "https://")):
            raise SourceError(f"{name}: API URL {base_url!r} must start with http:// or https://")
        self.name, self.base_url = name, base_url.rstrip("/")
        self.timer, self.limit = timer, limit
        self.timeout_s, self.retries = timeout_s, retries
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.blocked_until = -math.inf  # monotonic instant a 429 asked us to wait for
        self.session = requests.Session()

    def get_json(
        self,
        path: str,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        auth: tuple[str, str] | None = None,
        limit: RateLimit | None = None,
    ) -> Any:
        """GET ``path`` and decode its JSON. Raises Rejected (4xx), Unavailable (after the
        retries), DataError (not JSON)."""
        what = f"{self.name} {path}" + (f" {_params(params)}" if params else "")
        problem = ""
        for attempt in range(self.retries + 1):
            self.timer.sleep(self.blocked_until - self.timer.monotonic())
            (limit or self.limit).acquire(self.timer)
            wait = min(self.max_backoff_s, self.backoff_s * 2**attempt)
            try:
                resp = self.session.get(
                    self.base_url + path,
                    params=params,
                    headers=headers,
                    auth=auth,
                    timeout=self.timeout_s,
                )
            except requests.Timeout:
                problem = f"timed out after {self.timeout_s:g} s"
            except requests.RequestException as exc:  # refused, reset, cut short
                problem = f"request failed ({type(exc).__name__})"
            else:
                status = resp.status_code
                if 400 <= status < 500 and status != 429:
                    raise Rejected(status, what)
                if status < 400:
                    try:
                        return resp.json()
                    except ValueError as exc:
                        raise DataError(f"{what}: malformed JSON ({exc})") from None
                after = retry_after_s(resp.headers.get("Retry-After"), time.time())
                wait = wait if after is None else after
                problem = f"HTTP {status}"
                if status == 429:  # the limit is the account's: hold every request
                    self.blocked_until = self.timer.monotonic() + wait
                    problem += " (rate limited)"
            if attempt < self.retries:
                log.warning("%s: %s; retrying in %.1f s", what, problem, wait)
                self.timer.sleep(wait)
        raise Unavailable(f"{what}: {problem} ({self.retries + 1} tries)")


def _params(params: dict[str, Any]) -> str:
    return "&".join(f"{k}={v}" for k, v in params.items())
