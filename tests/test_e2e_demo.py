"""A shortened cpu-demo, end to end, through the same command a user runs (`python -m
pilot.launch`): real Valkey, real energy simulation, real Flower SuperLink/SuperNodes, real
training on the offline demo corpus. Only the simulated span, the speed-up and the number of
steps differ from the full demo.

The span is a slice of the bundled synthetic trace chosen so that every phase occurs: no
window (PAUSE), Texas alone (LOCAL), Texas and California together (FEDERATED: California
joins), Texas leaves (LOCAL again), then California leaves (PAUSE).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from test_launch import MARK, marked  # tests/ is on sys.path (rootdir conftest, no package)

REPO = Path(__file__).resolve().parents[1]
SPAN = ["--start", "2024-06-01T15:00:00Z", "--hours", "8"]
SPEEDUP = "360"
STEPS = "200"  # more than the span can train: the run ends at the trace's end ("trace_end")
TIMEOUT_S = 420


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    home = tmp_path_factory.mktemp("curtail-home")
    mark = uuid.uuid4().hex
    env = {**os.environ, MARK: mark, "CURTAIL_HOME": str(home)}
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pilot.launch",
            "up",
            "--preset",
            "cpu-demo",
            "--run-name",
            "e2e",
            "--speedup",
            SPEEDUP,
            "--steps",
            STEPS,
            *SPAN,
            "--no-live",
            "--timeout",
            str(TIMEOUT_S - 60),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    return res, home / "runs" / "e2e", mark


def _events(run_dir: Path) -> list[dict]:
    return [
        json.loads(line)
        for line in (run_dir / "events.jsonl").read_text().splitlines()
        if line.strip()
    ]


def test_demo_completes_and_writes_the_report(demo_run):
    res, run_dir, _ = demo_run
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    for name in ("report.md", "report.json", "events.csv", "timeline.png", "events.jsonl"):
        assert (run_dir / name).is_file() and (run_dir / name).stat().st_size > 0, name
    assert "report.md" in res.stdout  # the report's file paths are printed
    assert "TOTAL" in res.stdout  # and its table


def test_demo_timeline_shows_every_phase_a_join_and_a_leave(demo_run):
    _, run_dir, _ = demo_run
    events = _events(run_dir)
    kinds = {e["kind"] for e in events}
    modes = {e["mode"] for e in events if e["kind"] == "mode"}
    assert {"PAUSE", "LOCAL", "FEDERATED"} <= modes, modes
    assert {"join", "leave", "provision_started", "deprovision", "aggregate"} <= kinds, kinds
    assert [e["kind"] for e in events][-1] == "run_end"
    csv_kinds = {
        line.split(",")[1] for line in (run_dir / "events.csv").read_text().splitlines()[1:]
    }
    assert kinds <= csv_kinds


def test_demo_loss_falls_and_report_matches_its_events(demo_run):
    _, run_dir, _ = demo_run
    report = json.loads((run_dir / "report.json").read_text())
    assert report["loss"]["last"] < report["loss"]["first"]
    assert report["replay_check"]["rel_diff"] < 1e-6  # live ledger == events replayed
    events = _events(run_dir)
    assert report["rounds_aggregated"] == len(
        {e["round"] for e in events if e["kind"] == "aggregate"}
    )
    assert report["total"]["energy_kwh"] > 0


def test_demo_leaves_no_process_no_port_and_no_secret_behind(demo_run):
    res, run_dir, mark = demo_run
    assert marked(mark) == []
    port = int(re.search(r"SuperLink on 127\.0\.0\.1:(\d+)", res.stdout).group(1))
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))  # raises if anything still listens there
    # The Redis password never reaches a log or a file of the run (only CURTAIL_REDIS_URL).
    secret = re.compile(r"redis://[^\s@]*:(?!\*\*\*@)[^\s@]+@")
    for path in run_dir.rglob("*"):
        if path.is_file() and path.suffix in (".log", ".jsonl", ".csv", ".md", ".json", ".toml"):
            assert not secret.search(path.read_text(errors="replace")), path
    assert not secret.search(res.stdout + res.stderr)
