"""A shortened cpu-demo, end to end, through the same command a user runs (`python -m
pilot.launch.cli`): real Valkey, real energy simulation, real Flower SuperLink/SuperNodes, real
training on the offline demo corpus. Only the speed-up and the step budget differ from the
full demo.

The span is the demo's: no window (PAUSE), Texas alone (LOCAL), paused through a short
excursion above the threshold with its node warm and resumed in the same round, Texas and
California together (FEDERATED: California joins Texas's running round), Texas leaves
mid-round (LOCAL again, California alone), California leaves (PAUSE). Replayed 120x instead
of 96x, ~4 minutes here, in a fresh CURTAIL_HOME, so first-use preparation (corpus,
tokenizer) runs too.
"""

from __future__ import annotations

import csv
import json
import os
import re
import socket
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import pytest
from test_launch import MARK, marked  # tests/ is on sys.path (rootdir conftest, no package)

REPO = Path(__file__).resolve().parents[1]
SPEEDUP = "120"  # 8.9 h in 268 s; the demo's 30-minute SuperNode boot is 15 s wall
# Never the binding limit, on any machine: the run must end at the trace's end ("trace_end").
# (A CI box once trained past 200 steps within the span and the run ended on "steps".)
STEPS = "100000"
TIMEOUT_S = 480


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
    lines = (run_dir / "events.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def test_demo_completes_prepares_first_use_and_writes_the_report(demo_run):
    res, run_dir, _ = demo_run
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "first use: building the offline demo corpus" in res.stdout
    assert "first use: training a 8192-token tokenizer" in res.stdout
    assert "run completed" in res.stdout
    for name in ("report.md", "report.json", "events.csv", "timeline.png", "events.jsonl"):
        assert (run_dir / name).is_file() and (run_dir / name).stat().st_size > 0, name
    assert "report.md" in res.stdout and "TOTAL" in res.stdout  # paths and table printed
    assert "Traceback" not in res.stdout + res.stderr


def test_demo_timeline_shows_every_phase_a_join_and_a_leave(demo_run):
    res, run_dir, _ = demo_run
    events = _events(run_dir)
    kinds = [e["kind"] for e in events]
    modes = {e["mode"] for e in events if e["kind"] == "mode"}
    assert {"PAUSE", "LOCAL", "FEDERATED"} <= modes, modes
    assert {"join", "leave", "provision_started", "deprovision", "aggregate"} <= set(kinds)
    assert kinds[0] == "run_start" and kinds[-1] == "run_end"
    assert events[-1]["reason"] == "trace_end"
    # events.csv is the same timeline, row for row
    with (run_dir / "events.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["kind"] for r in rows] == kinds
    # and the live view printed the phases as they happened
    # (which site joins mid-round, not at a round's start, depends on the machine's speed)
    joined = {e["site"] for e in events if e["kind"] == "join"}
    assert "mode FEDERATED" in res.stdout and all(f"join {s}" in res.stdout for s in joined)


def test_demo_site_pauses_above_the_threshold_stays_warm_and_resumes_in_the_same_round(demo_run):
    _, run_dir, _ = demo_run
    events = _events(run_dir)
    pauses = [
        (i, e) for i, e in enumerate(events) if e["kind"] == "leave" and e.get("warm") is True
    ]
    assert pauses, "no site was paused warm"
    resumed = []
    for i, pause in pauses:
        site, rnd = pause["site"], pause["round"]
        later = events[i + 1 :]
        j = next(
            (k for k, e in enumerate(later) if e["kind"] == "join" and e["site"] == site), None
        )
        if j is None:
            continue
        join, between = later[j], later[:j]
        # warm: its node never went down or restarted before it trained again
        assert not any(
            e.get("site") == site and e["kind"] in ("deprovision", "provision_started")
            for e in between
        )
        if join["round"] != rnd:  # back too late for its round (ClientApp start-up here)
            continue
        # the same round, from the site's own weights
        assert join["resumed"] is True, join
        assert not any(e["kind"] == "round_end" and e["round"] == rnd for e in between)
        # its partial work before the pause was stopped by us (a site paused before its first
        # step, its ClientApp still starting on a busy machine, has no interval to show)
        stopped = [e for e in between if e["kind"] == "train_interval" and e["site"] == site]
        assert all(e["stopped_by"] == "stop" for e in stopped[-1:]), stopped
        resumed.append((site, rnd))
    assert resumed, f"paused {[(e['site'], e['round']) for _, e in pauses]}, none resumed"
    # each resumed round took the site's work as one reply (both parts) and averaged it when
    # it stepped (a busy box can pause a site before its first step and end the round before
    # its next one: a reply of no steps, nothing to average)
    for site, rnd in resumed:
        end = next(e for e in events if e["kind"] == "round_end" and e["round"] == rnd)
        assert site in end["sites"], end
        stepped = any(
            e["kind"] == "train_interval"
            and e["site"] == site
            and e["round"] == rnd
            and e["steps"] > 0
            for e in events
        )
        aggs = [e for e in events if e["kind"] == "aggregate" and e["round"] == rnd]
        assert (site in aggs[0]["sites"]) if stepped else not aggs or site not in aggs[0]["sites"]


def test_demo_loss_falls_and_the_report_matches_its_events(demo_run):
    from pilot.config.sites import load_sites
    from pilot.energy.carbon import Ledger
    from pilot.energy.traces import load_trace

    _, run_dir, _ = demo_run
    report = json.loads((run_dir / "report.json").read_text())
    events = _events(run_dir)
    losses = [e["loss"] for e in events if e["kind"] == "aggregate" and e.get("loss") is not None]
    assert len(losses) >= 2 and losses[-1] < losses[0], losses
    assert report["loss"] == {"first": losses[0], "last": losses[-1]}
    assert report["rounds_aggregated"] == len(
        {e["round"] for e in events if e["kind"] == "aggregate"}
    )
    assert report["event_counts"] == dict(Counter(e["kind"] for e in events))
    # Energy and emissions recomputed here from the events alone agree with the report.
    sites = load_sites(REPO / "configs" / "cpu-demo-sites.toml")
    trace = load_trace(REPO / "configs" / "traces" / "synthetic-3site.csv")
    ts = [float(e["t"]) for e in events]
    replay = Ledger.from_events(events).summary(trace, sites, start=min(ts), end=max(ts))
    assert report["total"]["energy_kwh"] > 0
    for key in ("energy_kwh", "emissions_kg", "train_hours"):
        assert report["total"][key] == pytest.approx(replay["total"][key], rel=1e-6), key
    # The report rests on the ServerApp's live ledger, and the what-if simulator replaying this
    # run's recorded events through its power model agrees with it within 1%.
    assert report["ledger_source"] == "ledger.json"
    assert report["replay_check"]["rel_diff"] < 0.01, report["replay_check"]


def test_demo_leaves_no_process_no_port_and_no_secret_behind(demo_run):
    res, run_dir, mark = demo_run
    assert marked(mark) == []
    port = int(re.search(r"SuperLink on 127\.0\.0\.1:(\d+)", res.stdout).group(1))
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))  # raises if anything still listens there
    # The Redis password never reaches a log or a file of the run (only CURTAIL_REDIS_URL).
    # Masked (***) and documentation (PASSWORD) forms are fine; FAB installs under
    # flwr-home/apps are copies of this repository's own files.
    secret = re.compile(r"redis://[^\s@]*:(?!\*\*\*@|PASSWORD@)[^\s@]+@")
    for path in run_dir.rglob("*"):
        if "apps" in path.relative_to(run_dir).parts or not path.is_file():
            continue
        if path.suffix in (".log", ".jsonl", ".csv", ".md", ".json", ".toml", ".txt"):
            assert not secret.search(path.read_text(errors="replace")), path
    assert not secret.search(res.stdout + res.stderr)


def test_demo_validates_the_global_model_after_every_aggregation(demo_run):
    res, run_dir, _ = demo_run
    events = _events(run_dir)
    rounds = [e["round"] for e in events if e["kind"] == "aggregate"]
    vals = [e for e in events if e["kind"] == "validation"]
    assert rounds and [e["round"] for e in vals] == rounds
    assert all(e["bpb"] is not None and 0 < e["bpb"] < 10 for e in vals), vals
    # the held-out measurement, budget from [train] eval_tokens; the model gets better
    assert {e["eval_tokens"] for e in vals} == {16384}
    assert vals[-1]["bpb"] < vals[0]["bpb"], [e["bpb"] for e in vals]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["val_bpb"]["final"] == vals[-1]["bpb"]
    assert [r["round"] for r in report["val_bpb"]["per_round"]] == rounds
    assert report["data"]["trained_tokens"] > 0 and report["data"]["cropped_tokens"] >= 0
    # metrics rows carry it too, and the closing table shows the final value
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_bpb"] for r in rows if "val_bpb" in r] == [e["bpb"] for e in vals]
    assert f"global model val bpb {vals[-1]['bpb']:.4f}" in res.stdout
