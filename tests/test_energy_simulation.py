"""Acceptance: the Vessim co-simulation against a real Valkey server publishes the schema, a
subscriber sees every curtailment transition of the trace in order, and power reported by a
site shows up in the simulation's recorded consumption."""

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pilot.config.sites import load_sites
from pilot.energy import cosim as energy
from pilot.energy.traces import load_trace
from pilot.infra.signals import Signals, connect

ROOT = Path(__file__).resolve().parents[1]
SITES = ROOT / "configs" / "sites.toml"


@pytest.fixture
def setup(redis_url):
    sites = load_sites(SITES)
    trace = load_trace(sites.trace)
    sig = Signals(connect(redis_url), f"e-{uuid.uuid4().hex[:8]}")
    yield sig, sites, trace
    sig.clear()


def expected_transitions(trace, sites, start, hours, step, thr=100.0):
    """(t, site, curtailed) whenever a site's raw curtailment flips at the ticks (first tick included)."""
    ticks = start + np.arange(0, hours * 3600, step)
    out = []
    for s in sites.sites:
        c = trace.series(s.region, ticks) < thr
        out.append((ticks[0], s.name, bool(c[0])))
        out += [(ticks[k], s.name, bool(c[k])) for k in np.flatnonzero(c[1:] != c[:-1]) + 1]
    return sorted(out, key=lambda x: x[0])


def test_accelerated_three_site_run_publishes_the_schema_and_is_paced(setup):
    sig, sites, trace = setup
    cfg = energy.SimConfig(sig.run, trace.start, hours=4, step_s=300, speedup=4 * 3600 / 1.5)
    t = time.monotonic()
    summary = energy.run(sig, sites, trace, cfg, verbose=False)
    wall = time.monotonic() - t
    assert summary["status"] == "finished" and summary["ticks"] == 48
    assert wall >= 1.3  # paced: 4 h at this speed-up take ~1.5 s (the last tick isn't waited for)
    m = sig.meta()
    assert m["status"] == "finished" and m["sites"] == sites.names and m["threshold"] == 100.0
    assert m["sim_start"] == trace.start and m["speedup"] == cfg.speedup
    assert m["sim_time"] == trace.start + 4 * 3600 - 300
    for s in sites.sites:
        st = sig.site(s.name)
        assert st["time"] == m["sim_time"]
        assert st["mci"] == pytest.approx(trace.at(s.region, st["time"]), abs=1e-3)
        assert st["curtailed"] == (st["mci"] < 100.0) and st["power_w"] == 0.0
        fc = sig.forecast(s.name)
        assert fc[0][0] == st["time"] and fc[-1][0] == st["time"] + 3600
    assert sig.r.xlen(sig.key("signals")) == 48 * 3
    assert sig.events()[-1]["kind"] == "energy_sim"


def test_subscriber_sees_every_curtailment_transition_in_order(setup, redis_url):
    """The real CLI in its own process, 48 h of trace in a few seconds; a live subscriber."""
    sig, sites, trace = setup
    step, hours = 300, 48
    seen: list[tuple[float, str, bool]] = []
    last: dict[str, bool] = {}
    done = threading.Event()

    def subscribe():
        cursor = "0-0"
        while not done.is_set():
            cursor, entries = sig.wait_signals(cursor, block_ms=200)
            for e in entries:
                if last.get(e["site"]) != e["curtailed"]:
                    seen.append((e["time"], e["site"], e["curtailed"]))
                    last[e["site"]] = e["curtailed"]
            if not entries and sig.status() in ("finished", "stopped", "failed"):
                return

    sub = threading.Thread(target=subscribe)
    sub.start()
    env = {**os.environ, "CURTAIL_REDIS_URL": redis_url}
    cmd = [
        sys.executable,
        str(ROOT / "energy_simulation.py"),
        "--sites",
        str(SITES),
        "--run",
        sig.run,
        "--step",
        str(step),
        "--hours",
        str(hours),
        "--speedup",
        str(hours * 3600 / 4),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    sub.join(timeout=10)
    done.set()
    assert proc.returncode == 0, proc.stderr
    assert "finished: 576 ticks" in proc.stdout
    password = redis_url.split(":")[2].split("@")[0]
    assert password not in proc.stdout + proc.stderr
    want = expected_transitions(trace, sites, trace.start, hours, step)
    assert sum(1 for _, _, c in want if c) >= 6  # the trace really has windows
    assert seen == want


def test_sigterm_stops_cleanly_with_status_stopped(setup, redis_url):
    sig, _, _ = setup
    env = {**os.environ, "CURTAIL_REDIS_URL": redis_url}
    cmd = [sys.executable, str(ROOT / "energy_simulation.py"), "--run", sig.run, "--speedup", "60"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while sig.status() != "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert sig.status() == "stopped" and out.strip().splitlines()[-1].startswith("stopped:")


def test_reported_power_shows_up_in_recorded_consumption(setup, tmp_path):
    sig, sites, trace = setup
    # static reports: a number, a power-model state, and none (off)
    sig.set_power("texas", 1500.0)
    sig.set_power("california", "idle")
    cfg = energy.SimConfig(sig.run, trace.start, hours=6, step_s=300, speedup=0)
    summary = energy.run(sig, sites, trace, cfg, record=tmp_path / "rec", verbose=False)
    assert summary["vessim_energy_wh"] == pytest.approx(
        {"texas": 9000.0, "california": 2808.0, "australia": 0.0}
    )
    assert summary["energy_wh"] == pytest.approx(summary["vessim_energy_wh"])
    ts = pd.read_csv(tmp_path / "rec" / "timeseries.csv")
    assert (ts[ts.microgrid == "texas"]["actor_states.gpu.power"] == -1500.0).all()
    assert sig.site("texas")["energy_wh"] == pytest.approx(9000.0)


def test_power_changed_by_a_site_mid_run_is_followed(setup, tmp_path):
    """A "site" that trains while its grid is curtailed, reacting to the published signal."""
    sig, sites, trace = setup
    start = trace.start + 3 * 3600  # australia's window opens inside this span
    cfg = energy.SimConfig(sig.run, start, hours=3, step_s=600, speedup=600 / 0.25)  # 0.25 s/tick
    done = threading.Event()

    def site_client():
        cursor = "0-0"
        while not done.is_set():
            cursor, entries = sig.wait_signals(cursor, block_ms=100)
            for e in entries:
                if e["site"] == "australia":
                    sig.set_power("australia", "train" if e["curtailed"] else "off")

    client = threading.Thread(target=site_client)
    client.start()
    try:
        energy.run(sig, sites, trace, cfg, record=tmp_path / "rec", verbose=False)
    finally:
        done.set()
        client.join()
    ts = pd.read_csv(tmp_path / "rec" / "timeseries.csv")
    au = ts[ts.microgrid == "australia"].reset_index(drop=True)
    curtailed = (au["grid_signals.mci"] < 100.0).to_numpy()
    power = -au["actor_states.gpu.power"].to_numpy()
    assert curtailed.any() and not curtailed.all()
    # the site's report for tick k is what the simulation draws at tick k+1
    np.testing.assert_array_equal(power[1:], np.where(curtailed[:-1], 2024.0, 0.0))
