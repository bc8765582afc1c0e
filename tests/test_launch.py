"""The launcher: process teardown and bad invocations (fast, real processes, no training).

Every launcher started here gets a unique marker in its environment; children inherit the
environment, so scanning /proc for the marker finds anything it left behind, even processes
that detached into their own sessions (as Flower's SuperExec does).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from pilot.procs import descendants

REPO = Path(__file__).resolve().parents[1]
MARK = "CURTAIL_TEST_MARK"


def marked(mark: str) -> list[int]:
    """Pids of live (non-zombie) processes whose environment carries the marker."""
    needle = f"{MARK}={mark}".encode()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env = Path(f"/proc/{entry.name}/environ").read_bytes()
            state = Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in env.split(b"\0") and state != "Z":
            found.append(int(entry.name))
    return found


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def launch(args: list[str], tmp_path: Path, timeout: float = 60, **env: str):
    """Run `python -m pilot.launch ARGS` to completion; returns (result, marker)."""
    mark = uuid.uuid4().hex
    full_env = {**os.environ, MARK: mark, "CURTAIL_HOME": str(tmp_path / "home"), **env}
    res = subprocess.run(
        [sys.executable, "-m", "pilot.launch", *args, "--no-live"],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return res, mark


def assert_one_line_error(res: subprocess.CompletedProcess, *needles: str) -> str:
    assert res.returncode != 0, res.stdout + res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one error line, got:\n{res.stderr}"
    assert "Traceback" not in res.stderr + res.stdout
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


# --- process management --------------------------------------------------------------------

SPAWNER = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    from pilot.procs import ProcessSet
    ps = ProcessSet()
    # a child that detaches a grandchild into its own session, as flower-superlink does
    ps.start("detacher", [sys.executable, "-c",
        "import subprocess, sys, time;"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'],"
        " start_new_session=True); time.sleep(600)"])
    # a child that ignores SIGTERM and must be killed
    ps.start("stubborn", [sys.executable, "-c",
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
    time.sleep(1.5)
    os.kill(ps.children[0].proc.pid, signal.SIGKILL)  # orphan the detached grandchild
    print("before", len(ps.children), flush=True)
    killed = ps.close(timeout=1.0)
    print("killed", len(killed), "codes", [c.proc.returncode for c in ps.children], flush=True)
""")


def test_close_stops_detached_orphans_and_sigterm_ignoring_children(tmp_path):
    mark = uuid.uuid4().hex
    res = subprocess.run(
        [sys.executable, "-c", SPAWNER],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, MARK: mark},
    )
    assert res.returncode == 0, res.stderr
    assert "codes [-9, -9]" in res.stdout  # the stubborn one needed SIGKILL
    assert marked(mark) == []


def test_children_get_their_own_process_group(tmp_path):
    from pilot.procs import ProcessSet

    ps = ProcessSet()
    proc = ps.start("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert os.getpgid(proc.pid) == proc.pid != os.getpgid(0)
    finally:
        ps.stop(ps.children[0], timeout=5)
    assert proc.poll() is not None
    assert descendants(proc.pid) == []


def test_flwr_home_holds_only_the_local_deployment_connection(tmp_path):
    import tomllib

    from pilot.launch import CONNECTION, write_flwr_home

    home = write_flwr_home(tmp_path / "flwr", 12345)
    cfg = tomllib.loads((home / "config.toml").read_text())
    assert cfg["superlink"]["default"] == CONNECTION
    assert cfg["superlink"][CONNECTION] == {"address": "127.0.0.1:12345", "insecure": True}


def test_child_env_carries_redis_url_only_in_its_env_var():
    from pilot.launch import ENV_REDIS, child_env

    env = child_env("redis://:pw@127.0.0.1:1/0", FLWR_HOME="/x")
    assert env[ENV_REDIS] == "redis://:pw@127.0.0.1:1/0"
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert ENV_REDIS not in child_env(None) or os.environ.get(ENV_REDIS)


def test_run_config_values_round_trip_through_toml():
    import tomllib

    from pilot.launch import parse_value, toml_value

    for v in (3, 2.5, True, "cpu-demo", "a 'quoted' \"x\""):
        assert tomllib.loads(f"k = {toml_value(v)}")["k"] == v
    assert parse_value("12") == 12 and parse_value("'x'") == "x" and parse_value("abc") == "abc"


# --- bad invocations: one clear line, exit != 0, nothing left running -----------------------


def test_unknown_preset_names_the_available_ones(tmp_path):
    res, mark = launch(["up", "--preset", "no-such-preset"], tmp_path)
    line = assert_one_line_error(res, "unknown preset 'no-such-preset'", "cpu-demo")
    assert res.returncode == 2, line
    assert marked(mark) == []


def test_missing_trace_file_says_to_pass_an_existing_csv(tmp_path):
    res, mark = launch(["--trace", str(tmp_path / "nope.csv")], tmp_path)
    assert_one_line_error(res, "trace file not found", "nope.csv", "--trace")
    assert marked(mark) == []


def test_busy_port_says_how_to_pick_another(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res, mark = launch(["--port", str(port)], tmp_path)
    assert_one_line_error(res, f"port 127.0.0.1:{port} is busy", "--port 0")
    assert marked(mark) == []


def test_unreachable_redis_url_is_reported_without_its_password(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    url = f"redis://:s3cret-pw@127.0.0.1:{port}/0"
    res, mark = launch(["--redis-url", url], tmp_path)
    line = assert_one_line_error(res, "cannot reach Redis", str(port), "--redis-url")
    assert "s3cret-pw" not in res.stdout + res.stderr, line
    assert marked(mark) == []


def test_unbuilt_tokenizer_with_no_prepare_says_to_prepare_it(tmp_path):
    res, mark = launch(["--no-prepare"], tmp_path)  # CURTAIL_HOME is empty
    assert_one_line_error(res, "not built", "without --no-prepare")
    assert marked(mark) == []


# --- interrupt: the real stack, stopped early ---------------------------------------------


@pytest.fixture(scope="module")
def prepared_home(tmp_path_factory) -> Path:
    """A CURTAIL_HOME with the cpu-demo corpus and tokenizer, built by `curtail-llm prepare`."""
    home = tmp_path_factory.mktemp("prepared-home")
    res = subprocess.run(
        [sys.executable, "-m", "pilot.launch", "prepare", "--preset", "cpu-demo"],
        cwd=REPO,
        env={**os.environ, "CURTAIL_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    return home


def _ports_of(pids: set[int]) -> set[int]:
    """Ports our children listen on, from their command lines (valkey-server's process title
    is "valkey-server 127.0.0.1:PORT"; Flower's processes take --port N)."""
    ports = set()
    for pid in pids:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        for a, b in zip(argv, argv[1:] + [""], strict=True):
            if a == "--port" and b.isdigit():
                ports.add(int(b))
            m = re.search(r"127\.0\.0\.1:(\d+)$", a)
            if m and "valkey" in argv[0]:
                ports.add(int(m.group(1)))
    return ports


def test_sigterm_mid_run_stops_every_process_and_frees_every_port(prepared_home):
    """SIGTERM once a SuperNode runs (so the tree holds Valkey, the energy simulation, the
    SuperLink, its detached SuperExec, the ServerApp and a SuperNode in its own session):
    everything is gone afterwards, every port they listened on is free, exit code 130."""
    mark = uuid.uuid4().hex
    env = {**os.environ, MARK: mark, "CURTAIL_HOME": str(prepared_home)}
    logs = prepared_home / "runs" / "sigterm" / "logs"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pilot.launch", "--run-name", "sigterm", "--no-live"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen: set[int] = set()
    deadline = time.monotonic() + 180
    try:
        while not list(logs.glob("supernode-*.log")):
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "no SuperNode was ever provisioned"
            seen.update(descendants(proc.pid))
            time.sleep(0.2)
        time.sleep(1.0)  # let the SuperNode start its own SuperExec
        seen.update(descendants(proc.pid))
        ports = _ports_of(seen)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out
    assert "interrupted" in out
    assert marked(mark) == []
    assert len(ports) >= 3, ports  # valkey, superlink, supernode
    assert all(port_free(p) for p in ports), [p for p in ports if not port_free(p)]
