"""The ClientApp's side of the persistent trainer, torch-free: find the node's trainer (start it
when there is none, replace it when it runs other code or does not answer), hand it a TRAIN
order and the global model's raw arrays, and return what it answers.

Starting is serialised by a lock file, so two messages on one node never start two trainers.
The trainer's key is written fresh, readable only by this user, each time one is started.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection
from pathlib import Path
from typing import Any

from pilot.control.wire import RawArray
from pilot.flower.trainer.channel import PROTOCOL, Endpoint, code_id, code_root, recv, send
from pilot.infra.procs import alive, ancestor_running, command_line

# A trainer's start imports torch and sets up the device: ~7 s on an idle 2-core box, several
# times that under load. Beyond this the start has failed.
START_TIMEOUT_S = 300.0
STOP_WAIT_S = 10.0  # a replaced trainer gets this long to exit before it is killed
_MODULE = "pilot.flower.trainer.daemon"


class TrainerError(RuntimeError):
    """The site's trainer could not be started, died mid-round, or failed the order."""


def train(
    node_dir: Path,
    job: dict[str, Any],
    arrays: list[RawArray],
    cpu_threads: int = 0,
    node_pid: int | None = None,
) -> tuple[dict[str, Any], list[RawArray]]:
    """Run one TRAIN order on the node's trainer: (TrainReport fields, new model arrays). A
    trainer started here lives as long as ``node_pid`` (default: the SuperNode this process
    runs under, else its parent)."""
    endpoint = Endpoint(node_dir)
    _ensure_started(endpoint, cpu_threads, node_pid)
    header, out = _request(endpoint, {"op": "train", "job": job}, arrays)
    if header is None:
        raise TrainerError(f"the site's trainer exited mid-round (log: {endpoint.log})")
    if "error" in header:
        raise TrainerError(
            f"the site's trainer failed the round: {header['error']} (log: {endpoint.log})"
        )
    return header["report"], out


def hello(node_dir: Path) -> dict[str, Any] | None:
    """The node's trainer's greeting (its pid, code and protocol), or None if none answers."""
    return _request(Endpoint(node_dir), {"op": "hello"})[0]


def stop(node_dir: Path) -> bool:
    """Ask the node's trainer to exit (after its last inner state is saved); False if none
    answered."""
    return _request(Endpoint(node_dir), {"op": "stop"})[0] is not None


def _connect(endpoint: Endpoint) -> Connection | None:
    try:
        return Client(endpoint.socket, "AF_UNIX", authkey=endpoint.key.read_bytes())
    except (OSError, EOFError, AuthenticationError):  # no trainer, a dead one's, another key
        return None


def _request(
    endpoint: Endpoint, header: dict[str, Any], arrays: list[RawArray] | None = None
) -> tuple[dict[str, Any] | None, list[RawArray]]:
    """One request on a new connection: the answer, or (None, []) if no trainer answered."""
    conn = _connect(endpoint)
    if conn is None:
        return None, []
    with conn:
        try:
            send(conn, header, arrays or [])
            return recv(conn)
        except (OSError, EOFError):
            return None, []


def start_soon(
    node_dir: Path,
    cpu_threads: int = 0,
    node_pid: int | None = None,
    env: Mapping[str, str] | None = None,
) -> None:
    """Start the node's trainer if none runs, without waiting for it: the provisioner does
    this beside a new SuperNode (with the node's ``env``) and a QUERY does it too, so that
    torch is imported by the time the first TRAIN arrives."""
    _ensure_started(Endpoint(node_dir), cpu_threads, node_pid, wait=False, env=env)


def _ensure_started(
    endpoint: Endpoint,
    cpu_threads: int,
    node_pid: int | None,
    wait: bool = True,
    env: Mapping[str, str] | None = None,
) -> None:
    """A trainer of this code answers on the node's socket when this returns (with ``wait``;
    else one is at least starting)."""
    endpoint.node_dir.mkdir(parents=True, exist_ok=True)
    with open(endpoint.lock, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        hello, _ = _request(endpoint, {"op": "hello"})
        pid = _trainer_pid(endpoint)
        if hello is None and pid is not None:  # one still starting (a QUERY started it)
            if not wait:
                return
            hello = _await(endpoint, lambda: alive(pid))
        if hello is not None and (hello.get("code"), hello.get("protocol")) == (
            code_id(),
            PROTOCOL,
        ):
            return
        _retire(endpoint, hello)
        proc = _spawn(endpoint, cpu_threads, node_pid, os.environ if env is None else env)
        if wait and _await(endpoint, lambda: proc.poll() is None) is None:
            if proc.poll() is None:
                proc.kill()
                raise TrainerError(f"the site's trainer did not answer within {START_TIMEOUT_S} s")
            raise TrainerError(
                f"the site's trainer exited with code {proc.returncode} while starting: "
                f"{_tail(endpoint.log)}"
            )


def _await(endpoint: Endpoint, running: Callable[[], bool]) -> dict[str, Any] | None:
    """The trainer's hello once it answers; None if it stops ``running`` or takes longer than
    START_TIMEOUT_S."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and running():
        hello, _ = _request(endpoint, {"op": "hello"})
        if hello is not None:
            return hello
        time.sleep(0.2)
    return None


def _retire(endpoint: Endpoint, hello: dict[str, Any] | None) -> None:
    """Stop the trainer that is there (other code, or not answering) before starting ours."""
    if hello is not None:
        _request(endpoint, {"op": "stop"})
    pid = _trainer_pid(endpoint)
    if pid is None:
        return
    deadline = time.monotonic() + (STOP_WAIT_S if hello is not None else 0.0)
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if alive(pid):
        os.kill(pid, signal.SIGKILL)


def _trainer_pid(endpoint: Endpoint) -> int | None:
    """The pid in the node's trainer pidfile, if that process is a live trainer."""
    try:
        pid = int(endpoint.pidfile.read_text())
    except (OSError, ValueError):
        return None
    return pid if alive(pid) and _MODULE in command_line(pid) else None


def _spawn(
    endpoint: Endpoint, cpu_threads: int, node_pid: int | None, env: Mapping[str, str]
) -> subprocess.Popen:
    """Start a trainer for this node (call with the lock held): a fresh key, then the process,
    its pid in the pidfile before the lock is let go."""
    fd = os.open(endpoint.key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_bytes(32))
    node = node_pid or ancestor_running("flower-supernode") or os.getppid()
    roots = [code_root(), *filter(None, [env.get("PYTHONPATH")])]
    env = {**env, "PYTHONPATH": os.pathsep.join(roots)}
    argv = [sys.executable, "-m", _MODULE, "--node-dir", str(endpoint.node_dir)]
    argv += ["--watch-pid", str(node), "--cpu-threads", str(cpu_threads)]
    with open(endpoint.log, "ab") as log:
        proc = subprocess.Popen(
            argv,
            cwd=endpoint.node_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    endpoint.pidfile.write_text(f"{proc.pid}\n")
    return proc


def _tail(path: Path, lines: int = 12) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
