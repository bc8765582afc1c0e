"""Live signals end to end: the energy simulation on WattTime and Electricity Maps feeds
served by a real loopback HTTP server (tests/provider_server.py), a real Valkey, real Vessim.

The accelerated run shares one Clock between the server (whose "now" it is), the pollers
and the simulation's pacing, so 3 simulated hours take ~10 s; the product itself runs live
sources at speed-up 1 (the CLI tests). The policy is fed from the published Redis signals as
the ServerApp reads them, and the recorded trace replays in pilot.analysis.simulate to the same
decisions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from provider_server import ProviderServer

from pilot.analysis import simulate
from pilot.config.sites import load_sites
from pilot.control.policy import Mode, make_policy
from pilot.energy import cosim as energy
from pilot.energy.clock import Clock
from pilot.energy.sources import open_sources
from pilot.energy.sources.base import Reading, Source
from pilot.energy.sources.emaps import ElectricityMaps
from pilot.energy.sources.record import SignalRecord
from pilot.energy.traces import load_trace, parse_time
from pilot.infra.signals import Signals, connect

ROOT = Path(__file__).resolve().parents[1]
T0 = parse_time("2024-06-01T00:00:00Z")
CA, DE = "CAISO_NORTH", "DE"
SPEEDUP, STEP, HOURS = 1200.0, 60, 3.0  # a tick every 0.05 s wall
SITES = """
[policy]
name = "prototype"
threshold = 100.0
release_delay_s = 600
horizon_s = 3600
{sites}
"""
SITE = """
[[sites]]
name = "{name}"
region = "{region}"
source = "{source}"
gpus = 0
train_kw = 2.0
idle_kw = 0.5
provision_delay_s = 120
"""


def sites_file(tmp_path: Path, *specs: tuple[str, str, str]) -> Path:
    body = "".join(SITE.format(name=n, region=r, source=s) for n, r, s in specs)
    path = tmp_path / "sites.toml"
    path.write_text(SITES.format(sites=body))
    return path


def window(lo_min: float, hi_min: float, low: float, high: float, start: float, n: int):
    """5-minute points from ``start``: ``low`` inside [lo_min, hi_min) minutes of T0."""
    pts = [start + 300.0 * k for k in range(n)]
    return [(t, low if lo_min * 60 <= t - T0 < hi_min * 60 else high) for t in pts]


def provider_env(server: ProviderServer) -> dict[str, str]:
    return {
        "WATTTIME_USERNAME": server.username,
        "WATTTIME_PASSWORD": server.password,
        "WATTTIME_API_URL": server.url,
        "ELECTRICITYMAPS_TOKEN": server.em_token,
        "ELECTRICITYMAPS_API_URL": server.url,
    }


def redis_dump(sig: Signals) -> str:
    """Every key and value of the run, as text."""
    out = []
    for key in sig.r.scan_iter(match=sig.prefix + "*"):
        kind = sig.r.type(key)
        if kind == "hash":
            out.append(f"{key} {sig.r.hgetall(key)}")
        elif kind == "stream":
            out.append(f"{key} {sig.r.xrange(key)}")
        elif kind == "string":
            out.append(f"{key} {sig.r.get(key)}")
    return "\n".join(out)


@pytest.fixture
def sig(redis_url):
    s = Signals(connect(redis_url), f"live-{uuid.uuid4().hex[:8]}")
    yield s
    s.clear()


class PolicyFeed(threading.Thread):
    """The ServerApp's decision loop, fed from the published stream tick by tick, with the
    simulator's provisioning model (ready ``delay`` s after provisioning starts)."""

    def __init__(self, sig: Signals, sites):
        super().__init__(daemon=True)
        self.sig, self.sites = sig, sites
        self.policy = make_policy(sites.policy, sites)
        self.since: dict[str, float] = {}
        self.modes: list[tuple[float, Mode]] = []  # (t, mode) whenever it changes
        self.entries: list[dict] = []
        self.done = threading.Event()

    def run(self) -> None:
        cursor, pending = "0-0", {}
        while not self.done.is_set():
            cursor, entries = self.sig.wait_signals(cursor, block_ms=100)
            for e in entries:
                self.entries.append(e)
                pending.setdefault(e["time"], {})[e["site"]] = e
                if len(pending[e["time"]]) == len(self.sites.sites):
                    self.step(e["time"], pending.pop(e["time"]))

    def step(self, t: float, tick: dict[str, dict]) -> None:
        # as pilot.flower.loop reads site:<s>: a site without "mci" is missing (not curtailed);
        # prototype plans without forecasts
        mci = {s: e["mci"] for s, e in tick.items() if "mci" in e}
        delays = {s.name: s.provision_delay_s for s in self.sites.sites}
        ready = {s for s, t0 in self.since.items() if t - t0 >= delays[s]}
        d = self.policy.step(t, mci, {}, ready)
        self.since = {s: self.since.get(s, t) for s in d.provision}
        if not self.modes or self.modes[-1][1] != d.mode:
            self.modes.append((t, d.mode))


def test_live_feeds_drive_pause_local_federated_and_the_record_replays_to_the_same_decisions(
    sig, tmp_path, monkeypatch, caplog, capfd
):
    monkeypatch.setattr(ElectricityMaps, "rate", (10_000, 1.0))  # the test polls 20x a second
    path = sites_file(tmp_path, ("alpha", CA, "watttime"), ("beta", DE, "electricitymaps"))
    sites = load_sites(path)
    start, n = T0 - 3600.0, 60  # data from an hour before the run: tick 0 finds a value
    data = {CA: window(40, 150, 50.0, 300.0, start, n), DE: window(70, 130, 60.0, 400.0, start, n)}
    clock = Clock(T0, time.time(), SPEEDUP)
    rec = SignalRecord(tmp_path / "rec", [CA, DE], T0)
    cfg = energy.SimConfig(sig.run, T0, HOURS, STEP, SPEEDUP, trace_source=str(rec.trace_path))
    feed = PolicyFeed(sig, sites)
    with ProviderServer(data, clock.sim_now) as server:
        feed.start()
        sources = open_sources(
            sites,
            None,
            horizon_s=3600.0,
            now=clock.sim_now,
            poll_s=0.05,
            max_age_s=4 * 3600.0,  # a stalled machine must not turn a slow poll into a gap
            record=rec,
            env=provider_env(server),
            http={"timeout_s": 5.0, "retries": 3, "backoff_s": 0.05},
        )
        try:
            summary = energy.run(
                sig,
                sites,
                None,
                cfg,
                verbose=False,
                sources=sources,
                signal_record=rec,
                clock=clock,
            )
        finally:
            for src in set(sources.values()):
                src.close()
            rec.close()
        deadline = time.monotonic() + 10
        while len(feed.entries) < 2 * summary["ticks"] and time.monotonic() < deadline:
            time.sleep(0.05)
        feed.done.set()
        feed.join(5)
    assert summary["status"] == "finished" and summary["ticks"] == HOURS * 3600 / STEP

    # the policy went PAUSE -> LOCAL -> FEDERATED on the live signals (and back)
    modes = [m for _, m in feed.modes]
    assert modes == [Mode.PAUSE, Mode.LOCAL, Mode.FEDERATED, Mode.LOCAL, Mode.PAUSE]

    # what was published is what the server served, value for value
    served = {(r, t): v for _, r, t, v in server.served}
    region = {s.name: s.region for s in sites.sites}
    assert len(feed.entries) == 2 * summary["ticks"]
    for e in feed.entries:
        assert not e["stale"] and e["mci"] == pytest.approx(
            served[(region[e["site"]], e["observed_at"])], abs=1e-3
        )
    fc, truth = sig.forecast("alpha"), dict(data[CA])  # the provider's, not persistence
    assert len(fc) > 3 and all(v == pytest.approx(truth[t]) for t, v in fc[1:-1])

    # the record: every new value once, in order; the trace is what each tick published
    obs = (tmp_path / "rec" / "observations.csv").read_text().splitlines()[1:]
    rows = [r.split(",") for r in obs]
    for reg in (CA, DE):
        got = [(parse_time(t), float(v)) for _, _, r, t, v in rows if r == reg]
        want = sorted({(t, v) for (r, t), v in served.items() if r == reg})
        assert got == [(t, pytest.approx(v)) for t, v in want]
    trace = load_trace(rec.trace_path)
    for e in feed.entries:
        assert trace.at(region[e["site"]], e["time"]) == pytest.approx(e["mci"])

    # the recorded trace replays in the simulator to the same decisions
    events = simulate.run(trace, sites, "prototype", tick_s=STEP)
    replayed = [(e["t"], e["mode"]) for e in events if e["kind"] == "mode"]
    assert replayed == [(t, str(m)) for t, m in feed.modes if t < trace.end]
    out = tmp_path / "replay.json"
    cmd = [sys.executable, "-m", "pilot.analysis.simulate", "--trace", str(rec.trace_path)]
    cmd += ["--sites", str(path), "--policy", "prototype", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["policy"]["name"] == "prototype"

    # no credential anywhere
    seen = redis_dump(sig) + caplog.text + "".join(capfd.readouterr()) + proc.stdout
    seen += "".join(p.read_text() for p in (tmp_path / "rec").iterdir())
    assert server.tokens and all(s not in seen for s in server.credentials())


def test_a_stale_site_is_published_as_not_curtailed_without_value_or_forecast(sig, tmp_path):
    """The provider's data stops after 00:00 (a gap): 15 minutes later the value is too old."""
    path = sites_file(tmp_path, ("alpha", CA, "watttime"), ("beta", "SPP_TX", "watttime"))
    sites = load_sites(path)
    data = {CA: [(T0, 300.0)], "SPP_TX": [(T0, 50.0)]}
    rec = SignalRecord(tmp_path / "rec", [CA, "SPP_TX"], T0)
    cfg = energy.SimConfig(sig.run, T0, hours=0.5, step_s=300, speedup=0)
    with ProviderServer(data, lambda: T0) as server:
        sources = open_sources(
            sites, None, horizon_s=3600.0, now=lambda: T0, poll_s=1e6, record=rec,
            env=provider_env(server),
        )  # fmt: skip
        try:
            energy.run(sig, sites, None, cfg, verbose=False, sources=sources, signal_record=rec)
        finally:
            sources["alpha"].close()
            rec.close()
    _, entries = sig.wait_signals("0-0", block_ms=None)
    beta = [e for e in entries if e["site"] == "beta"]
    fresh = [e for e in beta if e["time"] - T0 <= 900]
    assert all(e["curtailed"] and e["mci"] == 50.0 and not e["stale"] for e in fresh)
    stale = [e for e in beta if e["time"] - T0 > 900]
    assert stale and all(e["stale"] and not e["curtailed"] and "mci" not in e for e in stale)
    # what the ServerApp reads: no value (the policy's "not curtailed"), no forecast
    st = sig.site("beta")
    assert "mci" not in st and not st["curtailed"] and st["observed_at"] == T0
    assert sig.forecast("beta") == []
    faults = [e for e in sig.events() if e["kind"] == "fault"]
    assert [(e["site"], e["t"]) for e in faults] == [("alpha", T0 + 1200), ("beta", T0 + 1200)]
    assert "older than 900" in faults[1]["error"]
    rows = rec.trace_path.read_text().splitlines()
    assert rows[-1].endswith(",,") and rows[1].endswith(",300.0,50.0")


def _cli(args: list[str], env: dict[str, str], timeout: float = 60):
    cmd = [sys.executable, str(ROOT / "energy_simulation.py"), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout), cmd


def test_cli_runs_live_in_real_time_and_records_what_it_saw(sig, redis_url, tmp_path):
    path = sites_file(tmp_path, ("alpha", CA, "watttime"), ("beta", DE, "electricitymaps"))
    base = (time.time() // 300) * 300 - 3600
    data = {CA: [(base + 300 * k, 80.0) for k in range(30)]}
    data[DE] = [(base + 300 * k, 150.0) for k in range(30)]
    with ProviderServer(data, time.time) as server:
        env = {**os.environ, "CURTAIL_REDIS_URL": redis_url, "CURTAIL_HOME": str(tmp_path)}
        env |= provider_env(server)
        args = ["--sites", str(path), "--run", sig.run, "--step", "1", "--hours", "0.001"]
        proc, cmd = _cli([*args, "--poll", "0.5"], env)
    assert proc.returncode == 0, proc.stderr
    assert "sources=electricitymaps,watttime" in proc.stdout and "finished: 4 ticks" in proc.stdout
    assert sig.site("alpha")["curtailed"] and not sig.site("beta")["curtailed"]
    assert sig.site("beta")["mci"] == 150.0 and len(sig.forecast("alpha")) > 2
    rec = tmp_path / "runs" / sig.run / "signals" / "trace.csv"
    meta = sig.meta()
    assert meta["speedup"] == 1.0 and meta["trace"] == str(rec)
    assert json.loads(meta["sources"]) == {"alpha": "watttime", "beta": "electricitymaps"}
    trace = load_trace(rec)
    assert trace.regions == [CA, DE] and len(trace.times) == 4
    seen = proc.stdout + proc.stderr + redis_dump(sig) + " ".join(cmd)
    seen += "".join(p.read_text() for p in rec.parent.iterdir())
    assert all(s not in seen for s in server.credentials())


def test_cli_with_a_wrong_password_says_so_in_one_line_and_exits_2(sig, redis_url, tmp_path):
    path = sites_file(tmp_path, ("alpha", CA, "watttime"))
    with ProviderServer({CA: [(T0, 80.0)]}, time.time) as server:
        env = {**os.environ, "CURTAIL_REDIS_URL": redis_url, "CURTAIL_HOME": str(tmp_path)}
        env |= provider_env(server) | {"WATTTIME_PASSWORD": "not-" + server.password}
        proc, _ = _cli(["--sites", str(path), "--run", sig.run], env)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "error: WattTime rejected the login (HTTP 401): check WATTTIME_USERNAME and "
        "WATTTIME_PASSWORD"
    ]
    assert server.password not in proc.stdout + proc.stderr and sig.meta() == {}


class Tap(Source):
    """A started source, unchanged, keeping every reading it gave (what each tick published)."""

    def __init__(self, src: Source):
        self.src, self.kind = src, src.kind
        self.readings: dict[tuple[str, float], Reading | None] = {}

    def reading(self, region: str, now: float) -> Reading | None:
        self.readings[region, now] = r = self.src.reading(region, now)
        return r

    def stale_reason(self, region: str) -> str:
        return self.src.stale_reason(region)


def test_a_recorded_live_run_replays_with_its_provider_forecasts_to_the_same_decisions(
    sig, tmp_path, monkeypatch
):
    """The forecast policy on live feeds whose forecasts see each window coming (so it
    pre-provisions): stepped on what each tick published, it decides exactly as pilot.analysis.simulate
    replaying the record with the recorded forecaster, and unlike a persistence replay."""
    monkeypatch.setattr(ElectricityMaps, "rate", (10_000, 1.0))
    path = sites_file(tmp_path, ("alpha", CA, "watttime"), ("beta", DE, "electricitymaps"))
    path.write_text(path.read_text().replace('"prototype"', '"forecast"'))
    sites = load_sites(path)
    start, n = T0 - 3600.0, 80
    data = {CA: window(40, 150, 50.0, 300.0, start, n), DE: window(70, 130, 60.0, 400.0, start, n)}
    clock = Clock(T0, time.time(), SPEEDUP)
    rec = SignalRecord(tmp_path / "rec", [CA, DE], T0)
    cfg = energy.SimConfig(sig.run, T0, HOURS, STEP, SPEEDUP, trace_source=str(rec.trace_path))
    # forecasts 2 h ahead: any issue of the last hour covers the policy's horizon
    with ProviderServer(data, clock.sim_now, forecast_points=24) as server:
        started = open_sources(
            sites, None, horizon_s=3600.0, now=clock.sim_now, poll_s=0.05, max_age_s=4 * 3600.0,
            record=rec, env=provider_env(server),
            http={"timeout_s": 5.0, "retries": 3, "backoff_s": 0.05},
        )  # fmt: skip
        taps = {src: Tap(src) for src in set(started.values())}
        try:
            energy.run(
                sig, sites, None, cfg, verbose=False, signal_record=rec, clock=clock,
                sources={site: taps[src] for site, src in started.items()},
            )  # fmt: skip
        finally:
            for src in taps:
                src.close()
            rec.close()
    readings = {k: r for tap in taps.values() for k, r in tap.readings.items()}

    # the live decisions: the policy on each tick's published value and forecast
    pol, since, live = make_policy("forecast", sites), {}, []
    ticks = [T0 + STEP * k for k in range(int(HOURS * 3600 / STEP))]
    for t in ticks:
        seen = {s.name: readings[s.region, t] for s in sites.sites}
        mci = {s: round(r.mci, 3) for s, r in seen.items()}
        fc = {s: [(round(a, 3), round(b, 3)) for a, b in r.forecast] for s, r in seen.items()}
        ready = {s for s, t0 in since.items() if t - t0 >= sites.site(s).provision_delay_s}
        d = pol.step(t, mci, fc, ready)
        since = {s: since.get(s, t) for s in d.provision}
        live.append((t, str(d.mode), sorted(d.train), sorted(d.provision)))

    def replay(forecaster: str) -> list[tuple]:
        events = simulate.run(
            load_trace(rec.trace_path), sites, "forecast", tick_s=STEP, forecaster=forecaster,
            forecasts=tmp_path / "rec" / "forecasts.csv",
        )  # fmt: skip
        return [
            (e["t"], e["mode"], e["train"], e["provision"]) for e in events if e["kind"] == "mode"
        ]

    # the simulator's mode events: one wherever the number of training sites changes
    changes = [x for i, x in enumerate(live) if i == 0 or len(x[2]) != len(live[i - 1][2])]
    assert [m for _, m, _, _ in changes] == ["PAUSE", "LOCAL", "FEDERATED", "LOCAL", "PAUSE"]
    assert replay("recorded") == changes
    assert any(p and m == "PAUSE" for _, m, _, p in live)  # pre-provisioned from a forecast
    assert replay("persistence") != changes
