"""Typed access to the Redis schema shared by the energy simulation, the ServerApp and the
ClientApps (docs/ARCHITECTURE.md, ../shared/DESIGN.md). All keys live under
``curtail:<run>:``:

    meta            hash    sim_start, wall_start, speedup, sim_time, wall_time, status, sites,
                            regions, threshold, step_s, end, horizon_s, forecaster
    site:<s>        hash    latest time, mci, curtailed (raw 0/1), power_w, energy_wh
    signals         stream  one entry per site per tick (approximately bounded)
    forecast:<s>    string  JSON [[t, mci], ...] over the next horizon
    power:<s>       string  W, or a state word "off" | "idle" | "train" (site power model)
    stop:<s>        string  graceful-stop reason, with a TTL
    round:<n>:end   string  early end of round n
    lease:requests  list    JSON {id, site, round, rank, world}: a rank ran out of data mid-round
    lease:reply:<id> list   JSON Assignment for that request (empty chunks: no more), with a TTL
    logs:<s>        stream  per-step metrics from a site (bounded)
    events          stream  provisioning, rounds, joins/leaves, faults (kept whole: reports)

State lives in keys and streams; XREAD BLOCK wakes waiters, nothing depends on pub/sub.
Connections retry with exponential backoff on connection errors (a Redis restart or a
network blip is survived); the URL's password is never printed (``redact``).
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from typing import Any

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

ENV_URL = "CURTAIL_REDIS_URL"
SIGNALS_MAXLEN = 20_000  # ~ a day of 1-minute ticks for 10 sites; XADD MAXLEN ~ trims lazily
LOGS_MAXLEN = 10_000
ROUND_END_TTL_S = 7 * 86400
LEASE_REPLY_TTL_S = 120  # an unanswered reply (requester gone) expires; its chunks return at commit
POWER_STATES = ("off", "idle", "train")
RUN_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


SOCKET_TIMEOUT_S = 60.0  # blocking reads (XREAD BLOCK) must stay well below this


def redact(url: str | None) -> str:
    """The URL with its password (and user) masked, safe to print or log."""
    if not url:
        return str(url)
    return re.sub(r"^(\w+://)([^@/]*)@", r"\1***@", url)


def connect(
    url: str | None = None, retries: int = 10, backoff: float = 0.1, max_backoff: float = 5.0
) -> redis.Redis:
    """Client for ``url`` (default: $CURTAIL_REDIS_URL), checked with a PING.

    Both the first connection and later commands retry ``retries`` times on connection errors
    and timeouts, sleeping ``backoff * 2**i`` (capped at ``max_backoff``) between tries."""
    url = url or os.environ.get(ENV_URL)
    if not url:
        raise ValueError(f"no Redis URL: set {ENV_URL} (e.g. redis://:PASSWORD@127.0.0.1:6379/0)")
    retry = Retry(ExponentialBackoff(cap=max_backoff, base=backoff), retries)
    # redis-py 8 times reads out after 5 s by default, which would cut blocking XREADs short:
    # keep the read timeout well above the longest block any caller asks for.
    opts = dict(
        decode_responses=True,
        socket_connect_timeout=5,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_keepalive=True,
    )
    # first contact by hand: redis-py would also retry a wrong password (AuthenticationError
    # is a ConnectionError), which must fail at once
    probe = redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0), **opts)
    for attempt in range(retries + 1):
        try:
            probe.ping()
            break
        except redis.AuthenticationError:
            raise ValueError(f"Redis at {redact(url)} rejected the password") from None
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if attempt == retries:
                raise ConnectionError(
                    f"cannot reach Redis at {redact(url)} after {retries} retries: "
                    f"{type(exc).__name__}"
                ) from None
            time.sleep(min(max_backoff, backoff * 2**attempt))
        finally:
            probe.close()
    client = redis.Redis.from_url(
        url,
        retry=retry,
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        health_check_interval=30,
        **opts,
    )
    return client


def _f(v: Any) -> float | None:
    return None if v is None else float(v)


class Signals:
    """The schema over one run namespace. ``r`` must decode responses (``connect`` does)."""

    def __init__(self, r: redis.Redis, run: str):
        if not RUN_RE.match(run):
            raise ValueError(f"run name {run!r}: use 1-64 of A-Z a-z 0-9 _ . -")
        self.r = r
        self.run = run
        self.prefix = f"curtail:{run}:"

    def key(self, name: str) -> str:
        return self.prefix + name

    # -- meta (energy simulation) ------------------------------------------------------
    def publish_meta(self, **fields: Any) -> None:
        """Set meta fields; lists/dicts are stored as JSON, numbers as text."""
        enc = {
            k: json.dumps(v) if isinstance(v, list | dict) else str(v) for k, v in fields.items()
        }
        self.r.hset(self.key("meta"), mapping=enc)

    def meta(self) -> dict[str, Any]:
        raw = self.r.hgetall(self.key("meta"))
        out: dict[str, Any] = {}
        for k, v in raw.items():
            if k in ("sites", "regions"):
                out[k] = json.loads(v)
            elif k in ("status", "forecaster", "policy"):
                out[k] = v
            else:
                try:
                    out[k] = float(v)
                except ValueError:
                    out[k] = v
        return out

    def reset_published(self, sites: list[str]) -> None:
        """Drop what a previous energy simulation of this run published (meta, site:*,
        forecast:*, signals) so readers never mix two runs; reports from sites (power:*)
        and the server's keys stay."""
        keys = ["meta", "signals", *(f"site:{s}" for s in sites), *(f"forecast:{s}" for s in sites)]
        self.r.delete(*(self.key(k) for k in keys))

    def status(self) -> str | None:
        return self.r.hget(self.key("meta"), "status")

    # -- ticks (energy simulation) -----------------------------------------------------
    def publish_tick(
        self,
        t: float,
        states: dict[str, dict[str, float]],
        forecasts: dict[str, list[tuple[float, float]]] | None = None,
        wall: float | None = None,
    ) -> None:
        """One simulation tick, atomically: ``states[site] = {mci, curtailed, power_w, ...}``
        goes to ``site:<s>`` and the ``signals`` stream; ``meta.sim_time/wall_time`` advance."""
        p = self.r.pipeline(transaction=True)
        for site, st in states.items():
            fields = {"time": repr(float(t)), **{k: _enc(v) for k, v in st.items()}}
            p.hset(self.key(f"site:{site}"), mapping=fields)
            p.xadd(
                self.key("signals"),
                {"site": site, **fields},
                maxlen=SIGNALS_MAXLEN,
                approximate=True,
            )
        for site, pts in (forecasts or {}).items():
            p.set(
                self.key(f"forecast:{site}"),
                json.dumps([[round(a, 3), round(b, 3)] for a, b in pts]),
            )
        p.hset(
            self.key("meta"),
            mapping={
                "sim_time": repr(float(t)),
                "wall_time": repr(time.time() if wall is None else wall),
            },
        )
        p.execute()

    def site(self, s: str) -> dict[str, Any] | None:
        raw = self.r.hgetall(self.key(f"site:{s}"))
        return _dec_state(raw) if raw else None

    def forecast(self, s: str) -> list[tuple[float, float]]:
        raw = self.r.get(self.key(f"forecast:{s}"))
        return [(float(a), float(b)) for a, b in json.loads(raw)] if raw else []

    def wait_signals(
        self, last_id: str = "$", block_ms: int | None = 1000, count: int | None = None
    ) -> tuple[str, list[dict[str, Any]]]:
        """New ``signals`` entries after ``last_id`` ("0": from the start, "$": only new ones),
        blocking up to ``block_ms`` (None: don't block). Returns (id to pass next, entries)."""
        if last_id == "$":  # resolve now so that the next call misses nothing
            info = (
                self.r.xinfo_stream(self.key("signals"))
                if self.r.exists(self.key("signals"))
                else None
            )
            last_id = info["last-generated-id"] if info else "0-0"
        resp = self.r.xread({self.key("signals"): last_id}, count=count, block=block_ms)
        entries = []
        for _, items in resp or []:
            for eid, fields in items:
                entries.append({"id": eid, "site": fields.get("site"), **_dec_state(fields)})
                last_id = eid
        return last_id, entries

    # -- power (clients -> simulation) -------------------------------------------------
    def set_power(self, s: str, w: float | str, ttl_s: float | None = None) -> None:
        """Report the site's draw in W, or a state word of its power model. With ``ttl_s`` the
        report expires (a crashed site then falls back to "off")."""
        if isinstance(w, str):
            if w not in POWER_STATES:
                raise ValueError(f"power state {w!r}: use a number of W or one of {POWER_STATES}")
            val = w
        else:
            if not w >= 0:
                raise ValueError(f"power must be >= 0 W, got {w}")
            val = repr(float(w))
        self.r.set(self.key(f"power:{s}"), val, px=None if ttl_s is None else int(ttl_s * 1000))

    def power(self, s: str) -> float | str | None:
        v = self.r.get(self.key(f"power:{s}"))
        if v is None or v in POWER_STATES:
            return v
        return float(v)

    # -- control (server -> clients) ---------------------------------------------------
    def request_stop(self, s: str, reason: str, ttl_s: float = 3600.0) -> None:
        self.r.set(self.key(f"stop:{s}"), reason, px=int(ttl_s * 1000))

    def stop_reason(self, s: str) -> str | None:
        return self.r.get(self.key(f"stop:{s}"))

    def clear_stop(self, s: str) -> None:
        self.r.delete(self.key(f"stop:{s}"))

    def end_round(self, n: int) -> None:
        self.r.set(self.key(f"round:{n}:end"), "1", ex=ROUND_END_TTL_S)

    def round_ended(self, n: int) -> bool:
        return bool(self.r.exists(self.key(f"round:{n}:end")))

    # -- data leases (client <-> server, mid-round) ------------------------------------
    def request_lease(
        self, s: str, round_n: int, rank: int, world: int, timeout_s: float
    ) -> dict[str, Any] | None:
        """Ask the ServerApp for more data for ``rank`` of site ``s`` in round ``round_n``.
        Waits up to ``timeout_s`` (keep it below SOCKET_TIMEOUT_S) for the reply, an
        Assignment dict (no chunks: nothing more to give); None when none came."""
        req = uuid.uuid4().hex
        msg = {"id": req, "site": s, "round": round_n, "rank": rank, "world": world}
        self.r.rpush(self.key("lease:requests"), json.dumps(msg))
        got = self.r.blpop([self.key(f"lease:reply:{req}")], timeout=timeout_s)
        return json.loads(got[1]) if got else None

    def lease_requests(self, count: int = 100) -> list[dict[str, Any] | str]:
        """Pending lease requests, oldest first; an entry that is not a valid request comes
        back as the raw string so the caller can report it."""
        out: list[dict[str, Any] | str] = []
        for raw in self.r.lpop(self.key("lease:requests"), count=count) or []:
            try:
                req = json.loads(raw)
                req = {k: req[k] for k in ("id", "site", "round", "rank", "world")}
                req["round"], req["rank"], req["world"] = (
                    int(req["round"]),
                    int(req["rank"]),
                    int(req["world"]),
                )
                out.append(req)
            except (ValueError, TypeError, KeyError):
                out.append(raw)
        return out

    def reply_lease(self, req_id: str, assignment: dict[str, Any]) -> None:
        key = self.key(f"lease:reply:{req_id}")
        with self.r.pipeline() as p:
            p.rpush(key, json.dumps(assignment))
            p.expire(key, LEASE_REPLY_TTL_S)
            p.execute()

    # -- logs and events ---------------------------------------------------------------
    def log_step(self, s: str, **metrics: Any) -> str:
        return self.r.xadd(
            self.key(f"logs:{s}"),
            {k: _enc(v) for k, v in metrics.items()},
            maxlen=LOGS_MAXLEN,
            approximate=True,
        )

    def logs(self, s: str, since: str = "-", count: int | None = None) -> list[dict[str, Any]]:
        items = self.r.xrange(self.key(f"logs:{s}"), min=since, count=count)
        return [{"id": eid, **{k: _num(v) for k, v in f.items()}} for eid, f in items]

    def event(self, kind: str, **fields: Any) -> str:
        """Append to the run's event log; field values are stored as JSON."""
        enc = {"kind": kind, "wall": repr(time.time())}
        enc.update({k: json.dumps(v) for k, v in fields.items()})
        return self.r.xadd(self.key("events"), enc)

    def events(self, since: str = "-", count: int | None = None) -> list[dict[str, Any]]:
        out = []
        for eid, f in self.r.xrange(self.key("events"), min=since, count=count):
            e: dict[str, Any] = {"id": eid, "kind": f.pop("kind"), "wall": float(f.pop("wall"))}
            e.update({k: json.loads(v) for k, v in f.items()})
            out.append(e)
        return out

    def clear(self) -> int:
        """Delete every key of this run (a fresh start under the same name)."""
        keys = list(self.r.scan_iter(match=self.prefix + "*", count=500))
        return self.r.delete(*keys) if keys else 0


def _enc(v: Any) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float):
        return repr(v)
    return str(v)


def _num(v: str) -> Any:
    try:
        return float(v)
    except ValueError:
        return v


def _dec_state(raw: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in raw.items():
        if k == "site":
            continue
        if k == "curtailed":
            out[k] = v == "1"
        else:
            out[k] = _num(v)
    return out
