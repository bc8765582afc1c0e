"""The README's "Manual multi-terminal deployment", run exactly as written: its fenced block is
parsed into terminals and each one runs in its own bash, with real processes (the embedded
Valkey, flower-superlink, three flower-supernodes, `flwr run`, energy_simulation.py).

Only what must differ on a shared test box is replaced: the ports (free ones) and the default
CURTAIL_HOME (a temporary one). The README's own speed-up is kept: faster, a busy machine's
ClientApp start-up (tens of seconds of wall time) would outlast the short windows.

Checks: a bad preset fails its run with one line; the demo goes PAUSE -> LOCAL -> FEDERATED
with its progress in the `flwr run --stream` output, `flwr stop` ends it with the report in
the run dir, and Ctrl-C in every terminal leaves no process.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from test_launch import MARK, marked

from pilot.infra.procs import free_port

# the README's terminals, a whole stack by hand: the slower tier (make test-slow)
pytestmark = [pytest.mark.slow, pytest.mark.tier2]

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Manual multi-terminal deployment"
README_HOME = "~/.cache/curtail-llm"
README_PORTS = ("9092", "9094", "9095", "9096")  # SuperLink, then one per SuperNode
RUN = "byhand"
TEXT = {".log", ".jsonl", ".csv", ".md", ".json", ".toml"}


def readme_terminals() -> dict[str, str]:
    """The section's bash block as {terminal: its lines}: "every terminal", "once", and the
    names after "# terminal"."""
    text = (REPO / "README.md").read_text()
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, f"no bash block in the README's {SECTION!r}"
    parts: dict[str, list[str]] = {}
    lines: list[str] = []
    for line in block.group(1).splitlines():
        m = re.match(r"# (every terminal|once|terminal (\w+))\b", line)
        if m:
            lines = parts.setdefault(m.group(2) or m.group(1), [])
        else:
            lines.append(line)
    return {k: "\n".join(v).strip() + "\n" for k, v in parts.items()}


def _wait(what: str, cond: Callable[[], bool], timeout: float, logs: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n{logs()}"
        time.sleep(0.5)


class Terminals:
    """One bash per README terminal, each in its own session like a terminal window; Ctrl-C
    is SIGINT to its process group."""

    def __init__(self, tmp: Path):
        self.home = tmp / "home"
        self.logs = tmp / "terminals"
        self.logs.mkdir()
        self.mark = uuid.uuid4().hex
        ports = [str(free_port()) for _ in README_PORTS]
        self.subst = {
            README_HOME: str(self.home),
            **dict(zip(README_PORTS, ports, strict=True)),
        }
        self.scripts = {k: self._localize(v) for k, v in readme_terminals().items()}
        # nothing of ours leaks in: the README's exports alone must suffice
        self.env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("CURTAIL_REDIS_URL", "FLWR_HOME", "CURTAIL_HOME")
        }
        self.env[MARK] = self.mark
        self.procs: dict[str, subprocess.Popen] = {}
        self.password = ""

    def _localize(self, script: str) -> str:
        for old, new in self.subst.items():
            script = script.replace(old, new)
        return script

    def _argv(self, name: str, script: str | None) -> list[str]:
        body = self.scripts["every terminal"] + (script or self.scripts[name])
        return ["bash", "-c", "set -e\n" + body]

    def run(self, name: str, script: str | None = None, timeout: float = 300, log: str = "") -> str:
        """A terminal whose commands finish; its output (also in the log ``log or name``)."""
        res = subprocess.run(
            self._argv(name, script),
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        out = res.stdout + res.stderr
        (self.logs / f"{log or name}.log").write_text(out)
        assert res.returncode == 0, f"terminal {name} failed:\n{out}"
        return out

    def start(self, name: str) -> None:
        with open(self.logs / f"{name}.log", "wb") as log:
            self.procs[name] = subprocess.Popen(
                self._argv(name, None),
                cwd=REPO,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log(self, name: str) -> str:
        p = self.logs / f"{name}.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def tails(self) -> str:
        return "\n".join(f"--- {n}\n{self.log(n)[-2500:]}" for n in self.procs)

    def ctrl_c(self, name: str, timeout: float = 60) -> int:
        proc = self.procs[name]
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise AssertionError(
                f"terminal {name} ignored Ctrl-C:\n{self.log(name)[-2000:]}"
            ) from None

    def close(self) -> None:
        for name in reversed(list(self.procs)):  # a failed test: Ctrl-C, then kill the rest
            if self.procs[name].poll() is None:
                try:
                    self.ctrl_c(name, timeout=20)
                except AssertionError:
                    pass
        for pid in marked(self.mark):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def terminals(tmp_path_factory):
    """The README's set-up up to the SuperNodes: prepared data, Valkey, SuperLink, 3 nodes."""
    t = Terminals(tmp_path_factory.mktemp("manual"))
    try:
        t.run("once")
        t.start("redis")
        _wait("curtail-llm redis", (t.home / "redis.url").is_file, 60, t.tails)
        t.password = re.search(r"://:([^@]+)@", (t.home / "redis.url").read_text()).group(1)
        t.start("superlink")
        _wait("the SuperLink's port", lambda: _port_open(int(t.subst["9092"])), 90, t.tails)
        for site in ("texas", "california", "australia"):
            t.start(site)
        yield t
    finally:
        t.close()


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _run_status(t: Terminals, run_id: str) -> str:
    out = t.run(
        "stop",
        f"export FLWR_HOME={t.home}/flwr\nflwr ls local-deployment --run-id {run_id}"
        " --format json\n",
    )
    return json.loads(out[out.index("{") :])["runs"][0]["status"]


def test_unknown_preset_fails_the_run_with_one_line_naming_the_presets(terminals):
    t = terminals
    script = t.scripts["run"].replace("preset='cpu-demo'", "preset='no-such'")
    script = script.replace(f"run-name='{RUN}'", "run-name='bad'")
    out = t.run("run", script, timeout=180, log="bad-preset")
    errors = [ln for ln in out.splitlines() if "configuration error" in ln]
    assert len(errors) == 1, out
    assert "unknown preset 'no-such'" in errors[0] and "cpu-demo" in errors[0], errors
    assert "cpu-demo-sites" not in errors[0] and "paper-3site" not in errors[0], errors
    assert "Traceback" not in out, out
    run_id = re.search(r"Successfully started run (\d+)", out).group(1)
    assert _run_status(t, run_id) == "finished:failed"


def test_readme_commands_reach_federated_stop_cleanly_and_leave_the_report(terminals):
    t = terminals
    run_dir = t.home / "runs" / RUN
    t.start("run")
    _wait("the run id", lambda: "Successfully started run" in t.log("run"), 120, t.tails)
    run_id = re.search(r"Successfully started run (\d+)", t.log("run")).group(1)
    started = time.monotonic()
    t.start("energy")

    def events() -> list[dict]:
        path = run_dir / "events.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return [json.loads(x) for x in lines if x.strip().endswith("}")]

    def federated_aggregate() -> bool:
        evs = events()
        fed = [i for i, e in enumerate(evs) if e["kind"] == "mode" and e["mode"] == "FEDERATED"]
        return bool(fed) and any(e["kind"] == "aggregate" for e in evs[fed[0] :])

    _wait("an aggregation after FEDERATED", federated_aggregate, 360, t.tails)
    to_federated = time.monotonic() - started
    modes = [e["mode"] for e in events() if e["kind"] == "mode"]
    assert modes[0] == "PAUSE" and modes.index("LOCAL") < modes.index("FEDERATED"), modes

    stop = t.scripts["stop"].replace("RUN_ID", run_id)
    t.run("stop", stop, timeout=120)
    _wait("the stream to end", lambda: t.procs["run"].poll() is not None, 180, t.tails)
    assert t.procs["run"].returncode == 0

    # the stream ends as soon as the run is marked stopped; the ServerApp goes on to end it
    from pilot.analysis.report import REPORT_FILES, is_current

    _wait("the ServerApp's report", lambda: is_current(run_dir), 120, t.tails)
    assert all((run_dir / name).is_file() for name in REPORT_FILES)
    ends = [e for e in events() if e["kind"] == "run_end"]
    assert [e["reason"] for e in ends] == ["stopped"], ends
    stream = t.log("run")
    for line in ("mode PAUSE", "mode LOCAL train=texas", "mode FEDERATED", "aggregate round"):
        assert line in stream, line
    assert "HTTP Request" not in stream and "Traceback" not in stream

    for name in ("energy", "australia", "california", "texas", "superlink", "redis"):
        t.ctrl_c(name)
    _wait("every process to exit", lambda: marked(t.mark) == [], 30, t.tails)
    files = [*t.logs.iterdir(), *(p for p in run_dir.rglob("*") if p.suffix in TEXT)]
    assert not [f for f in files if t.password in f.read_text(errors="replace")]
    print(
        f"time from the energy simulation's start to a FEDERATED aggregation: {to_federated:.0f} s"
    )
