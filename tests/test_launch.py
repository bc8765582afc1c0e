"""The launcher: process teardown and bad invocations (fast, real processes, no training).

Every launcher started here gets a unique marker in its environment; children inherit the
environment, so scanning /proc for the marker finds anything it left behind, even processes
that detached into their own sessions (as Flower's SuperExec does).
"""

from __future__ import annotations

import contextlib
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

from pilot.infra.procs import descendants, free_port

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
    from pilot.infra.procs import ProcessSet
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
    from pilot.infra.procs import ProcessSet

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

    from pilot.launch.stack import CONNECTION, write_flwr_home

    home = write_flwr_home(tmp_path / "flwr", 12345)
    cfg = tomllib.loads((home / "config.toml").read_text())
    assert cfg["superlink"]["default"] == CONNECTION
    assert cfg["superlink"][CONNECTION] == {"address": "127.0.0.1:12345", "insecure": True}


def test_child_env_carries_redis_url_only_in_its_env_var():
    from pilot.launch.stack import ENV_REDIS, child_env

    env = child_env("redis://:pw@127.0.0.1:1/0", FLWR_HOME="/x")
    assert env[ENV_REDIS] == "redis://:pw@127.0.0.1:1/0"
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert ENV_REDIS not in child_env(None) or os.environ.get(ENV_REDIS)


def test_run_config_values_round_trip_through_toml():
    import tomllib

    from pilot.launch.plan import parse_value
    from pilot.launch.stack import toml_value

    for v in (3, 2.5, True, "cpu-demo", "a 'quoted' \"x\""):
        assert tomllib.loads(f"k = {toml_value(v)}")["k"] == v
    assert parse_value("12") == 12 and parse_value("'x'") == "x" and parse_value("abc") == "abc"


# --- bad invocations: one clear line, exit != 0, nothing left running -----------------------


def test_unknown_preset_names_the_available_ones(tmp_path):
    res, mark = launch(["up", "--preset", "no-such-preset"], tmp_path)
    line = assert_one_line_error(res, "unknown preset 'no-such-preset'", "cpu-demo")
    assert res.returncode == 2, line
    assert marked(mark) == []


def test_preset_path_names_runs_after_its_file_and_security_flags_are_checked(
    tmp_path, monkeypatch
):
    from pilot.launch.cli import make_plan, parse_args
    from pilot.launch.errors import LaunchError

    monkeypatch.setenv("CURTAIL_HOME", str(tmp_path))
    demo = REPO / "configs" / "cpu-demo.toml"
    plan = make_plan(parse_args(["up", "--preset", str(demo)]))
    assert re.fullmatch(r"cpu-demo-\d{8}-\d{6}", plan.run_name)
    assert (plan.tls, plan.supernode_auth) == (False, False)
    plan = make_plan(parse_args(["up", "--supernode-auth"]))
    assert (plan.tls, plan.supernode_auth) == (True, True)  # node auth needs TLS

    half = tmp_path / "half-tls.toml"
    half.write_text(demo.read_text().replace("tls = false", 'tls = true\nssl_certfile = "x.crt"'))
    with pytest.raises(LaunchError, match="set all of ssl_ca_certfile, ssl_certfile, ssl_keyfile"):
        make_plan(parse_args(["up", "--preset", str(half)]))


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


def test_unknown_run_config_key_names_the_declared_ones(tmp_path):
    res, mark = launch(["--set", "no-such-key=1"], tmp_path)
    assert_one_line_error(res, "--set no-such-key", "run-name", "num-iterations")
    assert marked(mark) == []


def test_replay_window_outside_the_trace_is_refused(tmp_path):
    res, mark = launch(["--start", "2031-01-01T00:00:00Z"], tmp_path)
    assert_one_line_error(res, "outside the trace", "2031-01-01")
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


def _cmd(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


NEAR_WINDOW = ["--start", "2024-06-01T16:05:00Z", "--hours", "4"]


def _launch_until_a_supernode_runs(home: Path, run_name: str, *flags: str):
    """Launch the cpu-demo minutes before Texas's window opens and return once its SuperNode
    has started (so the tree holds Valkey, the energy simulation, the SuperLink, its detached
    SuperExec, the ServerApp and a SuperNode in its own session): (launcher, marker, pids seen,
    SuperNode log)."""
    mark = uuid.uuid4().hex
    env = {**os.environ, MARK: mark, "CURTAIL_HOME": str(home)}
    logs = home / "runs" / run_name / "logs"
    argv = [sys.executable, "-m", "pilot.launch", "--run-name", run_name, "--no-live"]
    proc = subprocess.Popen(
        [*argv, *NEAR_WINDOW, *flags],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, like a shell job
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
    except BaseException:
        _end(proc)
        raise
    return proc, mark, seen, next(logs.glob("supernode-*.log"))


def _end(proc: subprocess.Popen) -> None:
    """A launcher a failed test leaves running: SIGTERM first, so it tears its stack down
    (a SIGKILL would orphan Valkey, the SuperLink and the nodes), then SIGKILL."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def _stop_mid_run(action: str, home: Path):
    """Launch until a SuperNode runs, then disturb it: "sigterm" the launcher, "ctrl-c" its
    whole process group as a terminal does, or "crash" the SuperLink. Returns (exit code,
    output, marker, ports seen)."""
    proc, mark, seen, _ = _launch_until_a_supernode_runs(home, action)
    try:
        ports = _ports_of(seen)
        if action == "sigterm":
            proc.send_signal(signal.SIGTERM)
        elif action == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            superlink = [p for p in descendants(proc.pid) if "flower-superlink" in _cmd(p)]
            os.kill(superlink[0], signal.SIGKILL)
        out, _ = proc.communicate(timeout=90)
    finally:
        _end(proc)
    return proc.returncode, out, mark, ports


# ctrl-c takes sigterm's teardown path by another signal: the slower tier (make test-slow)
@pytest.mark.parametrize(
    "action", ["sigterm", pytest.param("ctrl-c", marks=pytest.mark.tier2), "crash"]
)
def test_stopping_mid_run_leaves_no_process_and_no_port_behind(action, prepared_home):
    rc, out, mark, ports = _stop_mid_run(action, prepared_home)
    if action == "crash":
        assert rc == 1, out
        assert "superlink exited" in out and "logs of every process" in out
    else:
        assert rc == 130, out
        assert "interrupted; everything it started has been stopped" in out
    assert "Traceback" not in out
    assert marked(mark) == []
    assert len(ports) >= 3, ports  # valkey, superlink, supernode
    assert all(port_free(p) for p in ports), [p for p in ports if not port_free(p)]


def test_tls_with_supernode_auth_admits_only_registered_nodes(prepared_home, tmp_path):
    """--supernode-auth (TLS implied): the SuperLink serves TLS from a private CA, the
    provisioned SuperNode verifies it and signs with its registered key and connects; a node
    with an unregistered key is refused; no process serves or dials in plain text."""
    from pilot.infra.tls import node_key

    proc, mark, seen, node_log = _launch_until_a_supernode_runs(
        prepared_home, "tls", "--supernode-auth"
    )
    try:
        deadline = time.monotonic() + 120
        while "SuperNode ID" not in node_log.read_text():  # registered with the SuperLink
            assert proc.poll() is None and time.monotonic() < deadline, node_log.read_text()
            time.sleep(0.5)
        cmds = {pid: _cmd(pid) for pid in seen | set(descendants(proc.pid))}
        (link,) = [c for c in cmds.values() if "/flower-superlink " in c]
        assert "--enable-supernode-auth" in link and "--insecure" not in link
        nodes = [c for c in cmds.values() if "flower-supernode" in c and "--superlink" in c]
        assert nodes and all("--root-certificates" in c and "--insecure" not in c for c in nodes)
        keys = prepared_home / "runs" / "tls" / "tls"
        assert (keys / "superlink.key").stat().st_mode & 0o777 == 0o600
        assert (keys / "nodes" / "texas.key").stat().st_mode & 0o777 == 0o600

        port = link.split("--port ")[1].split()[0]
        intruder, _ = node_key(tmp_path, "intruder")  # a key nobody registered
        # Output to a file: the node's SuperExec child would hold a pipe open after it exits.
        with open(tmp_path / "intruder.log", "wb") as log:
            refused = subprocess.Popen(
                [f"{sys.prefix}/bin/flower-supernode", "--superlink", f"127.0.0.1:{port}",
                 "--root-certificates", str(keys / "ca.crt"), "--auth-supernode-private-key",
                 str(intruder), "--port", str(free_port()), "--max-retries", "1"],
                env={**os.environ, MARK: mark, "FLWR_HOME": str(tmp_path / "flwr"),
                     "PATH": f"{sys.prefix}/bin{os.pathsep}{os.environ['PATH']}"},
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        try:
            assert refused.wait(timeout=120) != 0
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(refused.pid, signal.SIGKILL)  # and its SuperExec
        said = (tmp_path / "intruder.log").read_text()
        assert "SuperNode ID" not in said and "Failed to activate SuperNode" in said
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=90)
    finally:
        _end(proc)
    assert proc.returncode == 130, out
    assert "SuperLink on 127.0.0.1" in out and "(TLS)" in out and "keys registered" in out
    assert marked(mark) == []


# --- live view: what Redis says, folded into per-site state --------------------------------


def test_live_view_follows_sites_through_provisioning_training_and_leaving(redis_url):
    from rich.console import Console

    from pilot.config.sites import load_sites
    from pilot.energy.traces import load_trace
    from pilot.infra.signals import Signals, connect
    from pilot.launch.view import LiveView

    sites = load_sites(REPO / "configs" / "sites.toml")
    trace = load_trace(REPO / "configs" / "traces" / "synthetic-3site.csv")
    sig = Signals(connect(redis_url), f"view-{uuid.uuid4().hex[:8]}")
    t0 = trace.start
    sig.publish_meta(sim_start=t0, speedup=360.0, status="running", sites=sites.names)
    sig.publish_tick(
        t0 + 600,
        {
            "texas": {"mci": 60.0, "curtailed": True, "power_w": 0.0},
            "california": {"mci": 300.0, "curtailed": False, "power_w": 0.0},
        },
    )
    out = Console(record=True, width=200, force_terminal=False)
    view = LiveView("v", live=False, trace=trace, sites_config=sites, console=out)
    view.attach(sig)
    view.refresh()
    assert view.state.shown_state("texas") == "curtailed"
    assert view.state.shown_state("california") == "off"

    sig.event("mode", t=t0 + 600, mode="PAUSE", train=[], provision=["texas"])
    sig.event("provision_started", t=t0 + 600, site="texas", reason="in window")
    view.refresh()
    assert view.state.shown_state("texas") == "provisioning"
    sig.event("provision_complete", t=t0 + 840, site="texas")
    sig.event("mode", t=t0 + 840, mode="LOCAL", train=["texas"], provision=["texas"])
    sig.event("round_start", t=t0 + 840, round=1, sites=["texas"], deadline_t=t0 + 8040)
    sig.log_step("texas", step=5, loss=7.5, tokens_per_s=900.0)
    sig.publish_tick(t0 + 4440, {"texas": {"mci": 60.0, "curtailed": True, "power_w": 2024.0}})
    view.refresh()
    st = view.state
    assert st.shown_state("texas") == "training" and st.mode == "LOCAL" and st.round == 1
    assert st.last_log["texas"]["loss"] == 7.5
    assert "texas:training(step 5 loss 7.500)" in view.status_line()  # progress inside a round
    view.state.update_carbon(force=True)
    # 240 s idle at 0.468 kW + 3600 s training at 2.024 kW, counted live before the round ends
    assert st.energy_kwh == pytest.approx((240 * 0.468 + 3600 * 2.024) / 3600, rel=1e-6)
    assert st.emissions_kg > 0

    sig.event("leave", t=t0 + 4440, site="texas", round=1, reason="no window")
    sig.event(
        "aggregate", t=t0 + 4500, round=1, loss=7.4, tokens=4096, global_step=9, sites=["texas"]
    )
    sig.event("deprovision", t=t0 + 4500, site="texas", reason="no window")
    view.detach()
    assert st.shown_state("texas") == "curtailed"  # off, but its grid is still in a window
    assert (st.leaves, st.global_step, st.tokens, st.loss) == (1, 9, 4096, 7.4)
    printed = out.export_text()
    assert "provision_started texas" in printed and "leave texas (no window)" in printed
    assert "aggregate round 1 step 9 round-mean train loss 7.400" in printed


def test_live_table_renders_every_site_and_the_totals(redis_url):
    from rich.console import Console

    from pilot.config.sites import load_sites
    from pilot.launch.view import LiveView

    sites = load_sites(REPO / "configs" / "sites.toml")
    view = LiveView("demo", live=False, sites_config=sites)
    view.state.observe({"kind": "mode", "t": 0.0, "mode": "FEDERATED", "train": sites.names})
    out = Console(record=True, width=160)
    out.print(view.render())
    text = out.export_text()
    assert all(name in text for name in sites.names)
    assert "FEDERATED" in text and "emissions" in text and "global step" in text


def test_reused_run_name_continues_the_replay_where_the_run_stopped(tmp_path):
    from pilot.energy.synthetic import synthetic
    from pilot.energy.traces import parse_time
    from pilot.launch.errors import LaunchError
    from pilot.launch.plan import continue_replay

    trace = synthetic(["SPP_TX"], hours=24, seed=1)
    run_dir = tmp_path / "run"
    assert continue_replay(run_dir, trace, None, 10.0) == (None, 10.0)  # a new run: unchanged

    run_dir.mkdir()
    stopped = trace.start + 4 * 3600.0
    lines = [f'{{"kind": "mode", "t": {t}}}' for t in (trace.start, stopped)]
    (run_dir / "events.jsonl").write_text("\n".join(lines) + "\n")
    start, hours = continue_replay(run_dir, trace, None, 10.0)
    assert parse_time(start) == stopped and hours == pytest.approx(6.0)

    with pytest.raises(LaunchError, match="pick a new --run-name"):
        continue_replay(run_dir, trace, None, 3.0)


def test_live_preset_needs_no_trace_and_runs_in_real_time(tmp_path, monkeypatch):
    from pilot.launch.cli import make_plan, parse_args
    from pilot.launch.errors import LaunchError

    monkeypatch.setenv("CURTAIL_HOME", str(tmp_path))
    plan = make_plan(parse_args(["up", "--preset", "live-cpu", "--hours", "2"]))
    assert plan.trace == [] and plan.trace_data is None and plan.speedup == 1.0
    assert plan.sites_config.live and plan.hours == 2.0
    for flags in (["--speedup", "60"], ["--start", "2024-06-01T00:00:00Z"]):
        with pytest.raises(LaunchError, match="live signal sources: they run in real time"):
            make_plan(parse_args(["up", "--preset", "live-cpu", *flags]))
