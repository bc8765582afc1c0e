"""Child processes of the launcher: started in their own process groups, torn down together.

Flower detaches some of its own helpers (the SuperLink starts `flower-superexec` in a new
session; SuperExecs start ServerApps/ClientApps), so killing the process groups we started is
not enough. The launcher therefore makes itself a *child subreaper* (Linux): every orphaned
descendant is re-parented to us instead of init, so "all descendants of this process" stays a
complete list of what must be stopped, and we can reap them so nothing is left as a zombie.

`ProcessSet.close()` stops **every** descendant of the calling process, so use it in a process
that exists to run the stack (the launcher), not inside a long-lived host such as pytest.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>


class RunStopped(BaseException):
    """The run was stopped from outside (``flwr stop`` arrives as SIGINT from Flower's
    heartbeat thread; SIGTERM from whoever ends the process). A BaseException, so no
    ``except Exception`` in the control loop swallows it."""


class ChildExited(RuntimeError):
    """A long-running child stopped while the stack still needed it."""

    def __init__(self, name: str, returncode: int, log: Path | None):
        where = f" (log: {log})" if log else ""
        super().__init__(f"{name} exited with code {returncode}{where}")
        self.name, self.returncode, self.log = name, returncode, log


def become_subreaper() -> bool:
    """Adopt orphaned descendants (Linux only). Returns False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of a process from /proc, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name is in parentheses and may contain spaces: parse after the last ')'.
    fields = raw[raw.rfind(")") + 2 :].split()
    return fields[0], int(fields[1])


def descendants(root: int) -> list[int]:
    """All live or zombie descendants of `root` (breadth-first, parents before children)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            if st is not None:
                children.setdefault(st[1], []).append(int(entry.name))
    out, frontier = [], [root]
    while frontier:
        nxt = []
        for pid in frontier:
            for child in children.get(pid, []):
                out.append(child)
                nxt.append(child)
        frontier = nxt
    return out


def command_line(pid: int) -> list[str]:
    """The process's argv from /proc ([] if it is gone or not ours to read)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def ancestor_running(program: str, pid: int | None = None) -> int | None:
    """The nearest ancestor of ``pid`` (default: this process) whose argv names ``program``
    (as a word of its command line, e.g. ``flower-supernode``), or None."""
    st = _stat(os.getpid() if pid is None else pid)
    while st is not None and st[1] > 1:
        parent = st[1]
        if any(Path(a).name == program for a in command_line(parent)[:2]):
            return parent
        st = _stat(parent)
    return None


def alive(pid: int) -> bool:
    """True if the process exists and is not a zombie."""
    st = _stat(pid)
    return st is not None and st[0] != "Z"


def _signal(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _reap(pids: Iterable[int], owned: Mapping[int, subprocess.Popen]) -> None:
    """Collect exit statuses of our own (or adopted) children so no zombie stays behind.

    Children we started are polled through their Popen, which keeps their return codes."""
    for pid in pids:
        if pid in owned:
            owned[pid].poll()
            continue
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log: Path | None
    critical: bool  # the stack cannot go on without it
    may_finish: bool  # a clean exit (code 0) is its normal end, not a failure


class ProcessSet:
    """Start named children (each a new session = its own process group) and stop them all."""

    def __init__(self, log_dir: Path | None = None):
        self.log_dir = log_dir
        self.children: list[Child] = []
        self.subreaper = become_subreaper()

    def start(
        self,
        name: str,
        argv: list[str],
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        critical: bool = True,
        may_finish: bool = False,
        capture: bool = False,
    ) -> subprocess.Popen:
        """Start `argv`; its output goes to `<log_dir>/<name>.log` (or a pipe with `capture`)."""
        log = None
        if capture:
            out = subprocess.PIPE
        elif self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            log = self.log_dir / f"{name}.log"
            out = log.open("ab")
        else:
            out = subprocess.DEVNULL
        try:
            proc = subprocess.Popen(
                argv,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                # Own session: a terminal Ctrl-C reaches only the launcher, which then stops
                # the children in order instead of all of them dying at once mid-write.
                start_new_session=True,
            )
        finally:
            if log is not None:
                out.close()
        self.children.append(Child(name, proc, log, critical, may_finish))
        return proc

    def check(self) -> None:
        """Raise ChildExited if a critical child has stopped (or failed, if it may finish)."""
        for child in self.children:
            rc = child.proc.poll()
            if child.critical and rc is not None and not (child.may_finish and rc == 0):
                raise ChildExited(child.name, rc, child.log)

    def stop(self, child: Child, timeout: float) -> None:
        """SIGTERM the child's process group and subtree, SIGKILL what is left after `timeout`."""
        pid = child.proc.pid
        tree = [pid, *descendants(pid)] if alive(pid) else descendants(pid)
        try:
            os.killpg(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
        _signal(tree, signal.SIGTERM)
        self._wait_gone(tree, timeout)
        stubborn = [p for p in tree if alive(p)]
        _signal(stubborn, signal.SIGKILL)
        self._wait_gone(stubborn, timeout)

    def close(self, timeout: float = 10.0) -> list[int]:
        """Stop children newest first, then sweep every remaining descendant of this process.

        Returns the pids that had to be SIGKILLed in the final sweep (empty when every child
        shut down on SIGTERM)."""
        for child in reversed(self.children):
            if child.proc.poll() is None or descendants(child.proc.pid):
                self.stop(child, timeout)
        # Orphans adopted by us (e.g. a detached superexec whose parent is gone).
        leftovers = [p for p in descendants(os.getpid()) if alive(p)]
        _signal(leftovers, signal.SIGTERM)
        self._wait_gone(leftovers, timeout)
        killed = [p for p in leftovers if alive(p)]
        _signal(killed, signal.SIGKILL)
        self._wait_gone(killed, timeout)
        _reap(descendants(os.getpid()), self._owned())
        return killed

    def _owned(self) -> dict[int, subprocess.Popen]:
        return {c.proc.pid: c.proc for c in self.children}

    def _wait_gone(self, pids: list[int], timeout: float) -> None:
        """Wait until none of `pids` is alive, reaping the ones that are our children."""
        deadline = time.monotonic() + timeout
        owned = self._owned()
        while True:
            _reap(pids, owned)
            if not any(alive(p) for p in pids) or time.monotonic() >= deadline:
                return
            time.sleep(0.05)


def free_port() -> int:
    """A loopback TCP port free now (a racer can still take it: bind, and retry on failure)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
