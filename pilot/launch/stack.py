"""Bringing the stack up in order (Redis, energy simulation, SuperLink, `flwr run`), watching it, and reporting the run."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pilot.config.paths import REPO, curtail_home
from pilot.infra.procs import ChildExited, ProcessSet
from pilot.infra.signals import ENV_URL as ENV_REDIS
from pilot.launch.errors import Interrupted, LaunchError
from pilot.launch.plan import SSL_KEYS, Plan
from pilot.launch.view import LiveView

CONNECTION = "local-deployment"  # name of the Flower connection in our private FLWR_HOME


# ----------------------------------------------------------------------------------------
# the stack


def child_env(redis_url: str | None, **extra: str) -> dict[str, str]:
    """Environment for children: our venv's tools first on PATH (Flower starts
    `flower-superexec`/`flwr-serverapp` by name), the Redis URL only in CURTAIL_REDIS_URL."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("CURTAIL_HOME", str(curtail_home()))
    if redis_url:
        env[ENV_REDIS] = redis_url
    env.update(extra)
    return env


def write_flwr_home(home: Path, port: int, root_certificates: Path | None = None) -> Path:
    """A private FLWR_HOME so the user's own Flower connections are neither used nor changed.
    With `root_certificates` (the CA's PEM) the connection verifies the SuperLink's TLS."""
    home.mkdir(parents=True, exist_ok=True)
    security = (
        f"root-certificates = {toml_value(str(root_certificates))}\n"
        if root_certificates
        else "insecure = true\n"
    )
    (home / "config.toml").write_text(
        "[superlink]\n"
        f'default = "{CONNECTION}"\n\n'
        f"[superlink.{CONNECTION}]\n"
        f'address = "127.0.0.1:{port}"\n' + security
    )
    return home


def superlink_security(plan: Plan) -> tuple[list[str], Path | None]:
    """(SuperLink flags, CA certificate or None) for the plan: --insecure, or TLS with the
    preset's certificates or a private CA made in <run-dir>/tls (loopback names only)."""
    if not plan.tls:
        return ["--insecure"], None
    from pilot.infra.tls import ca_and_server_cert

    if plan.certs:
        files = {k: plan.certs[k] for k in SSL_KEYS}
    else:
        made = ca_and_server_cert(plan.run_dir / "tls", ["127.0.0.1", "localhost"])
        files = dict(zip(SSL_KEYS, (made.ca_cert, made.cert, made.key), strict=True))
    argv = [a for k, path in files.items() for a in (f"--{k.replace('_', '-')}", str(path))]
    if plan.supernode_auth:
        argv.append("--enable-supernode-auth")
    return argv, files["ssl_ca_certfile"]


def register_supernodes(plan: Plan, env: dict[str, str]) -> Path:
    """Make (once) and register every site's SuperNode key with the running SuperLink; returns
    the key directory the provisioner starts nodes with. A key registered by an earlier launch
    of the same run stays valid."""
    from pilot.infra.tls import node_key

    keys = plan.run_dir / "tls" / "nodes"
    for site in plan.sites_config.names:
        _, public = node_key(keys, site)
        argv = ["flwr", "supernode", "register", str(public), CONNECTION, "--name", site]
        res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
        said = (res.stdout + res.stderr).strip()
        if res.returncode != 0 and "already" not in said.lower():
            last = said.splitlines()[-1] if said else f"exit code {res.returncode}"
            raise LaunchError(f"could not register the SuperNode key of {site}: {last}")
    return keys


def wait_for(cond: Callable[[], bool], timeout: float, what: str, procs: ProcessSet) -> None:
    """Poll `cond` until true; a critical child dying meanwhile fails at once."""
    deadline = time.monotonic() + timeout
    while not cond():
        procs.check()
        if time.monotonic() > deadline:
            raise LaunchError(
                f"{what} did not come up within {timeout:.0f} s: see the logs in {procs.log_dir}"
            )
        time.sleep(0.2)


def port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Outcome:
    status: str  # "completed" | "failed" | "interrupted" | "timeout"
    detail: str = ""
    run_id: str | None = None


def run_stack(plan: Plan, view: LiveView) -> Outcome:
    """Bring the stack up, watch the run until it ends, tear everything down."""
    stack = Stack(plan, view)
    try:
        stack.redis()
        overrides = stack.superlink()
        failed = stack.flwr_run(overrides)
        if failed is not None:
            return failed
        stack.energy_simulation()
        return stack.watch()
    except ChildExited as e:
        return Outcome("failed", str(e))
    finally:
        stack.close()


class Stack:
    """One launch's processes. Each bring-up step is a method, checked before the next one
    starts; close() tears down whatever was started, however far bring-up got."""

    def __init__(self, plan: Plan, view: LiveView):
        self.plan, self.view = plan, view
        self.logs = plan.run_dir / "logs"
        self.procs = ProcessSet(self.logs)
        self.valkey: Any = None  # pilot.infra.valkey.EmbeddedValkey, when we started one
        self.url = ""  # the Redis URL (it carries the password): children get it in their env
        self.sig: Any = None  # pilot.infra.signals.Signals of the run, read by the view
        self.env: dict[str, str] = {}  # the Flower children's environment
        self.flwr: subprocess.Popen | None = None  # `flwr run --stream`
        self.run_id = ""

    def redis(self) -> None:
        """An embedded Valkey (or the plan's Redis), an empty namespace for the run, and the
        view attached to it."""
        import redis

        from pilot.infra.signals import Signals, connect
        from pilot.infra.valkey import EmbeddedValkey

        plan = self.plan
        try:
            if plan.redis_url is None:
                # Its config file (holding the password) is in a private temp dir, removed on stop.
                self.valkey = EmbeddedValkey(password=secrets.token_urlsafe(24))
                self.url = self.valkey.start().url
            else:
                self.url = plan.redis_url
            # A clear error (URL redacted) if the server refuses us; then an empty namespace
            # for the run, so nobody reads a past run's status or events under the same name.
            Signals(connect(self.url), plan.run_name).clear()
        except (RuntimeError, ConnectionError) as e:
            raise LaunchError(f"Redis is not usable: {e}") from None
        # The view gets its own client without retries: a Redis that went away must not
        # stall the watch loop or the teardown in connection back-off.
        client = redis.Redis.from_url(self.url, decode_responses=True, socket_timeout=2)
        self.sig = Signals(client, plan.run_name)
        self.view.attach(self.sig)
        self.view.phase("Redis ready")

    def superlink(self) -> dict[str, str]:
        """The SuperLink, with a private FLWR_HOME; returns the run-config overrides the
        provisioned SuperNodes need to reach it (its CA, their registered keys)."""
        plan = self.plan
        security, ca_cert = superlink_security(plan)
        flwr_home = write_flwr_home(plan.run_dir / "flwr-home", plan.port, ca_cert)
        self.env = child_env(self.url, FLWR_HOME=str(flwr_home))
        argv = ["flower-superlink", *security, "--disable-runtime-dependency-installation"]
        argv += ["--host", "127.0.0.1", "--port", str(plan.port)]
        self.procs.start("superlink", argv, env=self.env, cwd=plan.run_dir)
        wait_for(lambda: port_open(plan.port), 60, "the Flower SuperLink", self.procs)
        self.view.phase(f"SuperLink on 127.0.0.1:{plan.port}" + (" (TLS)" if ca_cert else ""))
        # The provisioned SuperNodes verify the SuperLink with the CA and sign with their key.
        overrides = {"root-certificates": str(ca_cert)} if ca_cert else {}
        if plan.supernode_auth:
            overrides["supernode-auth-keys"] = str(register_supernodes(plan, self.env))
            self.view.phase(f"{len(plan.sites_config.names)} SuperNode keys registered")
        return overrides

    def flwr_run(self, overrides: dict[str, str]) -> Outcome | None:
        """`flwr run --stream`: the ServerApp, which provisions the SuperNodes itself. None once
        the run has started; the failed Outcome when flwr run could not start it."""
        plan = self.plan
        run_config = plan.run_dir / "run-config.toml"
        run_config.write_text(
            "".join(f"{k} = {toml_value(v)}\n" for k, v in {**plan.run_config, **overrides}.items())
        )
        argv = ["flwr", "run", str(REPO), CONNECTION, "--stream", "--run-config", str(run_config)]
        flwr = self.procs.start("flwr-run", argv, env=self.env, cwd=REPO, critical=False)
        self.flwr = flwr
        run_log = self.logs / "flwr-run.log"
        wait_for(
            lambda: flwr_run_id(run_log) is not None or flwr.poll() is not None,
            120,
            "the Flower run",
            self.procs,
        )
        run_id = flwr_run_id(run_log)
        if run_id is None:
            self.procs.check()  # a dead SuperLink is the cause, not flwr run's reaction to it
            lines = [ln for ln in tail(run_log, 20).splitlines() if ln.strip()]
            return Outcome(
                "failed", f"flwr run could not start the run: {lines[-1] if lines else '?'}"
            )
        self.run_id = run_id
        self.view.phase(f"Flower run {run_id} started")
        return None

    def energy_simulation(self) -> None:
        """The energy simulation. Started last on purpose: the ServerApp waits for its clock, so
        no simulated time passes unseen while Flower and the ServerApp are still starting."""
        plan = self.plan
        argv = [sys.executable, str(REPO / "energy_simulation.py"), "--run", plan.run_name]
        argv += ["--sites", str(plan.sites), "--speedup", str(plan.speedup)]
        if plan.trace:
            argv += ["--trace", ",".join(plan.trace)]
        if plan.sites_config.live:  # what the run saw, for replay (credentials: env only)
            argv += ["--record-signals", str(plan.run_dir / "signals")]
        if "tick_s" in plan.launch:  # simulated seconds per signal tick
            argv += ["--step", str(int(plan.launch["tick_s"]))]
        if "poll_s" in plan.launch:  # live sources: wall seconds between provider polls
            argv += ["--poll", str(plan.launch["poll_s"])]
        if plan.start:
            argv += ["--start", plan.start]
        if plan.hours:
            argv += ["--hours", str(plan.hours)]
        # It exits 0 at the end of the span; the ServerApp then ends the run ("trace_end").
        self.procs.start("energy", argv, env=child_env(self.url), cwd=REPO, may_finish=True)
        wait_for(lambda: self.sig.status() is not None, 60, "the energy simulation", self.procs)
        self.view.phase("running")

    def watch(self) -> Outcome:
        """Refresh the view until `flwr run --stream` returns (the run has ended)."""
        plan, flwr = self.plan, self.flwr
        assert flwr is not None, "flwr_run() first"
        deadline = time.monotonic() + plan.timeout if plan.timeout else None
        while flwr.poll() is None:
            self.procs.check()
            self.view.refresh()
            if deadline and time.monotonic() > deadline:
                return Outcome(
                    "timeout", f"gave up after {plan.timeout:.0f} s (--timeout)", self.run_id
                )
            time.sleep(0.5)
        self.procs.check()  # flwr run may notice a crashed SuperLink before the loop does
        self.view.refresh()
        status, detail = flwr_run_status(self.run_id, self.env)
        if flwr.returncode != 0 and status == "completed":
            status, detail = "failed", f"flwr run exited with {flwr.returncode}"
        return Outcome(status, detail, self.run_id)

    def close(self) -> None:
        """Stop every child and the embedded Valkey."""
        # A second Ctrl-C must not cut the teardown short and leave processes behind.
        with signals_deferred():
            self.view.detach()  # last look at Redis while it is still up
            self.view.phase("stopping")
            self.procs.close(timeout=float(self.plan.launch.get("stop_timeout_s", 10)))
            if self.valkey is not None:
                self.valkey.stop()


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


def flwr_run_id(log: Path) -> str | None:
    m = (
        re.search(r"Successfully started run (\d+)", log.read_text(errors="replace"))
        if log.exists()
        else None
    )
    return m.group(1) if m else None


def flwr_run_status(run_id: str, env: dict[str, str]) -> tuple[str, str]:
    """Ask the SuperLink how the run ended: ("completed"|"failed", details)."""
    res = subprocess.run(
        ["flwr", "ls", CONNECTION, "--run-id", run_id, "--format", "json"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    try:
        runs = json.loads(res.stdout)["runs"]
        status, detail = runs[0]["status"], runs[0].get("status-details", "")
    except (json.JSONDecodeError, KeyError, IndexError):
        return "failed", f"could not read the run status from the SuperLink: {res.stderr[-200:]}"
    return ("completed" if status == "finished:completed" else "failed"), (
        "" if detail == "N/A" else detail
    )


def tail(path: Path, lines: int = 20) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# ----------------------------------------------------------------------------------------
# report


def make_report(plan: Plan, say: Callable[[str], None]) -> bool:
    """Print the report the ServerApp wrote as the run ended; build it here only where it did
    not (the ServerApp was killed, or its report failed). Either way its table and paths."""
    from pilot.analysis.report import is_current

    argv = [sys.executable, "-m", "pilot.analysis.report", str(plan.run_dir)]
    if is_current(plan.run_dir):
        argv.append("--show")
    else:  # same inputs as the ServerApp's report (a live run's: its run_start's record)
        argv += ["--trace", *plan.trace] if plan.trace else []
        argv += ["--sites", str(plan.sites)]
    res = subprocess.run(argv, env=child_env(None), cwd=REPO)
    if res.returncode != 0:
        say(f"the report failed (exit {res.returncode}); the run's files are in {plan.run_dir}")
        return False
    return True


def raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signal.Signals(signum).name)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP while the body runs, then act on the first one received."""
    got: list[int] = []
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {s: signal.signal(s, lambda n, f: got.append(n)) for s in sigs}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if got:
            raise KeyboardInterrupt if got[0] == signal.SIGINT else Interrupted(str(got[0]))
