"""The launched stack on live signals: `curtail-llm up` with a live preset (configs/live-cpu.toml,
its sites on WattTime and Electricity Maps) against tests/provider_server.py on loopback, with
real Valkey, energy simulation, SuperLink, SuperNodes, ServerApp and training.

Live sources run in real time, so the test shortens the providers' clock instead: a point
every second, and the test moves the served values across the threshold as the stack reacts
(alpha below once the run is paused, beta once alpha trains alone), then stops the signal
feed (SIGTERM to the energy simulation, as an operator does), which ends the run. The
recorded trace and forecasts then replay in pilot.analysis.simulate to the same mode decisions.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
from provider_server import ProviderServer
from test_launch import MARK, _cmd, marked
from test_live_e2e import CA, DE, SITE, provider_env

from pilot.analysis import simulate
from pilot.config.sites import load_sites
from pilot.energy.traces import load_trace, parse_time
from pilot.infra.procs import descendants

REPO = Path(__file__).resolve().parents[1]
HIGH, LOW = 300.0, 50.0  # gCO2/kWh either side of the threshold (100)
SITES = """
[policy]
name = "forecast"
threshold = 100.0
min_window_s = 0
horizon_s = 60
"""
# the live preset, shortened: a tick a second, a poll every 2 s, the test's corpus
PRESET_CHANGES = {
    'sites = "configs/live-sites.toml"': 'sites = "{sites}"',
    "tick_s = 60 ": "tick_s = 1 ",
    "poll_s = 300 ": "poll_s = 2 ",  # Electricity Maps: <= 1 request/s
    'data_dir = "data/demo"': 'data_dir = "{data}"',
    'tokenizer_dir = "tokenizer/demo"': 'tokenizer_dir = "{tokenizer}"',
    "vocab_size = 8192": "vocab_size = 1024",
    "round_min_s = 900 ": "round_min_s = 60 ",
    "round_max_s = 1800 ": "round_max_s = 600 ",
    "join_min_s = 120 ": "join_min_s = 5 ",
    "eval_tokens = 16384 ": "eval_tokens = 2048 ",
}
TIMEOUT_S = 300
TEXT = (".log", ".jsonl", ".csv", ".md", ".json", ".toml", ".txt")


def live_preset(tmp_path: Path, data: Path, tokenizer: Path) -> tuple[Path, Path]:
    """(preset, its sites file)."""
    sites = tmp_path / "live-sites.toml"
    specs = (("alpha", CA, "watttime"), ("beta", DE, "electricitymaps"))
    body = "".join(SITE.format(name=n, region=r, source=s) for n, r, s in specs)
    sites.write_text(SITES + body.replace("provision_delay_s = 120", "provision_delay_s = 1"))
    text = (REPO / "configs" / "live-cpu.toml").read_text()
    for old, new in PRESET_CHANGES.items():
        assert text.count(old) >= 1, old
        text = text.replace(old, new.format(sites=sites, data=data, tokenizer=tokenizer))
    preset = tmp_path / "live-test.toml"
    preset.write_text(text)
    return preset, sites


def modes(events: list[dict], before: float) -> list[str]:
    """The run's modes in order, each change once, up to ``before``."""
    out: list[str] = []
    for e in events:
        if e["kind"] == "mode" and e["t"] < before and (not out or out[-1] != e["mode"]):
            out.append(e["mode"])
    return out


def read_events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def cmdlines(mark: str) -> str:
    """The command lines of the run's processes now."""
    return "\n".join(_cmd(pid) for pid in marked(mark))


@pytest.fixture(scope="module")
def live_run(tmp_path_factory, demo_data, tokenizer_dir):
    tmp = tmp_path_factory.mktemp("live-launch")
    preset, sites = live_preset(tmp, demo_data, tokenizer_dir)
    now = time.time()
    grid = [float(int(now)) + k for k in range(-60, TIMEOUT_S + 60)]  # a point a second
    data = {CA: [(t, HIGH) for t in grid], DE: [(t, HIGH) for t in grid]}
    mark, home = uuid.uuid4().hex, tmp / "home"
    run_dir = home / "runs" / "live"
    argv = [sys.executable, "-m", "pilot.launch", "up", "--preset", str(preset)]
    argv += ["--run-name", "live", "--no-live", "--hours", "1", "--timeout", str(TIMEOUT_S - 30)]
    seen_cmdlines = []
    with ProviderServer(data, time.time) as server:
        env = {**os.environ, MARK: mark, "CURTAIL_HOME": str(home), **provider_env(server)}
        with (tmp / "launch.out").open("w+") as out:
            proc = subprocess.Popen(
                argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
            try:
                # the test's clock: each crossing once the stack has reacted to the last one
                for mode, region in (("PAUSE", CA), ("LOCAL", DE), ("FEDERATED", None)):
                    wait_for(lambda m=mode: m in modes(read_events(run_dir / "events.jsonl"),
                                                       float("inf")), proc, out)  # fmt: skip
                    seen_cmdlines.append(cmdlines(mark))
                    if region is not None:
                        server.set_from(region, time.time(), LOW)
                # a few ticks on FEDERATED recorded, then stop the feed: the run ends
                fed = next(e["t"] for e in read_events(run_dir / "events.jsonl")
                           if e.get("mode") == "FEDERATED")  # fmt: skip
                wait_for(lambda: last_tick(run_dir / "signals" / "trace.csv") > fed + 2, proc, out)
                energy = [p for p in descendants(proc.pid) if "energy_simulation" in _cmd(p)]
                os.kill(energy[0], signal.SIGTERM)
                proc.wait(timeout=TIMEOUT_S)
            finally:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(timeout=60)
            out.seek(0)
            output = out.read()
    return SimpleNamespace(
        rc=proc.returncode, output=output, run_dir=run_dir, sites=sites, mark=mark,
        server=server, cmdlines="\n".join(seen_cmdlines),
    )  # fmt: skip


def last_tick(trace: Path) -> float:
    rows = trace.read_text().splitlines()[1:] if trace.exists() else []
    return parse_time(rows[-1].split(",")[0]) if rows else float("-inf")


def wait_for(cond: Callable[[], bool], proc: subprocess.Popen, out) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not cond():
        if proc.poll() is not None or time.monotonic() > deadline:
            out.seek(0)
            raise AssertionError(f"launcher gone or too slow:\n{out.read()[-4000:]}")
        time.sleep(0.2)


def test_live_preset_goes_pause_local_federated_and_replays_to_the_same_modes(live_run):
    run_dir = live_run.run_dir
    assert live_run.rc == 0, live_run.output[-4000:]
    assert "live signals (electricitymaps, watttime)" in live_run.output
    assert "run completed" in live_run.output
    assert marked(live_run.mark) == []
    events = read_events(run_dir / "events.jsonl")
    rec = run_dir / "signals"
    trace = load_trace(rec / "trace.csv")
    assert events[0]["trace"] == str(rec / "trace.csv")  # the report used what the run saw
    assert events[-1]["kind"] == "run_end" and events[-1]["reason"] == "trace_end"
    live = modes(events, trace.end)
    assert live == ["PAUSE", "LOCAL", "FEDERATED"]
    assert (run_dir / "report.md").is_file()

    replay = simulate.run(
        trace, load_sites(live_run.sites), "forecast", tick_s=1.0, forecaster="recorded",
        forecasts=rec / "forecasts.csv",
    )  # fmt: skip
    assert modes(replay, trace.end) == live


def test_no_credential_on_command_lines_logs_events_or_records(live_run):
    server = live_run.server
    assert server.tokens and live_run.cmdlines
    seen = live_run.output + live_run.cmdlines
    for path in live_run.run_dir.rglob(
        "*"
    ):  # FAB installs under flwr-home/apps: this repository's files
        if path.suffix in TEXT and "apps" not in path.relative_to(live_run.run_dir).parts:
            seen += path.read_text(errors="replace")
    assert all(s not in seen for s in server.credentials())
