"""Local SuperNodes as subprocesses: one ``flower-supernode`` per provisioned site.

Resources come from the sites config: the site's GPU list becomes ``CUDA_VISIBLE_DEVICES``
(empty = CPU only), its ``port`` (or a free one) the SuperNode's Runtime API port. Each node
gets a state dir (inner optimizer state; its own FLWR_HOME, so concurrent FAB installs never
race) and a log file. The site's power model is applied by the energy simulation to the
state word (train/idle) the ClientApp publishes. ``provision_delay_s`` (simulated seconds,
converted to wall seconds with the run's speed-up) is the site's start-up time: the process
starts at once, so its real boot counts toward the delay, and the site reports
``provisioning`` until the delay has passed (the ServerApp trains a site only once its node
is connected and its provisioning is over). A sped-up replay therefore models a boot no
shorter than the real one on this machine.

Nodes run in their own sessions and outlive the ServerApp on purpose: a restarted ServerApp
adopts the live node of a site from its pid file instead of starting a second one.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pilot.infra.procs import alive, descendants, free_port
from pilot.provisioner.base import Provisioner

log = logging.getLogger(__name__)


@dataclass
class _Node:
    state: str  # running | stopping | stopped (running before ready_at reads "provisioning")
    ready_at: float = 0.0  # time.monotonic() when the modelled provisioning delay is over
    proc: subprocess.Popen | None = None
    pid: int | None = None
    port: int | None = None
    stopper: threading.Thread | None = None


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


class SubprocessProvisioner(Provisioner):
    def __init__(
        self,
        sites: Iterable[Any],
        superlink: str,
        state_dir: str | Path,
        log_dir: str | Path,
        to_wall: Callable[[float], float] = float,
        env: Mapping[str, str] | None = None,
        executable: str = "flower-supernode",
        stop_timeout_s: float = 10.0,
        root_certificates: str | Path = "",
        auth_keys_dir: str | Path = "",
        on_launch: Callable[[Path, int, Mapping[str, str], int], None] | None = None,
        **_: Any,
    ):
        self.sites = {s.name: s for s in sites}
        self.superlink = superlink
        self.state_dir, self.log_dir = Path(state_dir), Path(log_dir)
        self.to_wall = to_wall
        self.env = dict(os.environ if env is None else env)
        self.executable = executable
        self.stop_timeout_s = stop_timeout_s
        # TLS: nodes verify the SuperLink with this CA; node auth: each signs with <site>.key.
        self.root_certificates = str(root_certificates)
        self.auth_keys_dir = Path(auth_keys_dir) if auth_keys_dir else None
        # on_launch(node dir, node pid, node env, cpu threads): what starts beside a new node
        # (the site's persistent trainer), so it is ready by the node's first order
        self.on_launch = on_launch
        if self.auth_keys_dir is not None:
            missing = [s for s in self.sites if not (self.auth_keys_dir / f"{s}.key").is_file()]
            if missing:
                raise ValueError(
                    f"SuperNode auth keys missing in {self.auth_keys_dir} for {missing}: create"
                    " and register them (curtail-llm up --supernode-auth does both)"
                )
        self._nodes: dict[str, _Node] = {}
        self._lock = threading.Lock()
        self._stoppers: list[threading.Thread] = []
        # Every local site shares this machine's cores when it trains on the CPU (a CPU-only
        # site, or a GPU site config run on a box without CUDA); ignored on GPUs.
        self.cpu_threads = max(1, (os.cpu_count() or 1) // max(1, len(self.sites)))

    # -- helpers ------------------------------------------------------------------------------
    def _site(self, name: str) -> Any:
        if name not in self.sites:
            raise ValueError(f"unknown site {name!r}; the sites config has {sorted(self.sites)}")
        return self.sites[name]

    def _node_dir(self, site: str) -> Path:
        return self.state_dir / site

    def _pidfile(self, site: str) -> Path:
        return self._node_dir(site) / "supernode.pid"

    def _marker(self, site: str) -> str:
        return f'site="{site}"'

    def _adopt(self, site: str) -> int | None:
        """pid of a live SuperNode for ``site`` started by an earlier ServerApp, if any."""
        try:
            pid = int(self._pidfile(site).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        cmd = _cmdline(pid)
        is_ours = (
            alive(pid)
            and any(self.executable in a for a in cmd[:2])
            and any(self._marker(site) in a for a in cmd)
        )
        return pid if is_ours else None

    def argv(self, site: str, port: int) -> list[str]:
        node_config = f'{self._marker(site)} state-dir="{self._node_dir(site)}"'
        node_config += f" cpu-threads={self.cpu_threads}"
        if self.root_certificates:
            security = ["--root-certificates", self.root_certificates]
        else:
            security = ["--insecure"]
        if self.auth_keys_dir is not None:
            security += ["--auth-supernode-private-key", str(self.auth_keys_dir / f"{site}.key")]
        return [
            self.executable,
            *security,
            "--superlink",
            self.superlink,
            "--port",
            str(port),
            "--node-config",
            node_config,
        ]

    def _launch(self, site: str, ready_at: float) -> _Node:
        """Start the site's SuperNode (call with the lock held)."""
        s = self._site(site)
        node_dir = self._node_dir(site)
        (node_dir / "flwr-home").mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        port = s.port or free_port()
        env = {
            **self.env,
            "CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in s.gpus),
            "FLWR_HOME": str(node_dir / "flwr-home"),
        }
        with open(self.log_dir / f"supernode-{site}.log", "ab") as log:
            proc = subprocess.Popen(
                self.argv(site, port),
                env=env,
                cwd=node_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._pidfile(site).write_text(f"{proc.pid}\n")
        if self.on_launch is not None:
            try:
                self.on_launch(node_dir, proc.pid, env, self.cpu_threads)
            except Exception as e:  # noqa: BLE001 - the node's first order starts it instead
                log.warning("could not start beside the node of %s: %s", site, e)
        return _Node("running", ready_at=ready_at, proc=proc, pid=proc.pid, port=port)

    def _terminate(self, site: str, node: _Node, drain: bool) -> None:
        """SIGTERM (drain) or SIGKILL the node's process group and subtree; reap; clean up."""
        pid = node.pid
        assert pid is not None
        tree = [pid, *descendants(pid)]
        sig = signal.SIGTERM if drain else signal.SIGKILL
        try:
            os.killpg(pid, sig)  # the node, its SuperExec and running ClientApps
        except (ProcessLookupError, PermissionError):
            pass
        for p in tree:  # anything that left the group
            try:
                os.kill(p, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + self.stop_timeout_s
        while time.monotonic() < deadline:
            if node.proc is not None:
                node.proc.poll()
            if not any(alive(p) for p in tree):
                break
            time.sleep(0.1)
        for p in tree:
            if alive(p):
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if node.proc is not None:
            node.proc.wait()
        with self._lock:
            self._pidfile(site).unlink(missing_ok=True)
            if self._nodes.get(site) is node:
                node.state = "stopped"

    # -- interface ----------------------------------------------------------------------------
    def start(self, site: str) -> None:
        s = self._site(site)
        with self._lock:
            node = self._nodes.get(site)
            stopper = node.stopper if node is not None and node.state == "stopping" else None
        if stopper is not None:  # provisioned again while the old node is still exiting
            stopper.join(self.stop_timeout_s + 5)
        with self._lock:
            node = self._nodes.get(site)
            if node is not None and node.state == "running":
                return
            if node is None:  # first contact: a node of an earlier ServerApp may be up
                pid = self._adopt(site)
                if pid is not None:
                    self._nodes[site] = _Node("running", pid=pid)
                    return
            delay = max(0.0, float(self.to_wall(s.provision_delay_s)))
            self._nodes[site] = self._launch(site, ready_at=time.monotonic() + delay)

    def stop(self, site: str, drain: bool = True) -> None:
        self._site(site)
        with self._lock:
            node = self._nodes.get(site)
            if node is None:
                pid = self._adopt(site)  # started by an earlier ServerApp
                if pid is None:
                    return
                node = self._nodes[site] = _Node("running", pid=pid)
            if node.state in ("stopping", "stopped"):
                return
            node.state = "stopping"
            # Off the control loop: a draining SuperNode may take seconds to exit.
            node.stopper = threading.Thread(
                target=self._terminate, args=(site, node, drain), daemon=True
            )
            node.stopper.start()
            self._stoppers.append(node.stopper)

    def status(self) -> dict[str, str]:
        out = {}
        with self._lock:
            for site, node in self._nodes.items():
                state = node.state
                if state == "running":
                    rc = node.proc.poll() if node.proc is not None else None
                    if rc is not None or (node.pid is not None and not alive(node.pid)):
                        state = f"failed:exit {rc}" if rc is not None else "failed:gone"
                    elif time.monotonic() < node.ready_at:
                        state = "provisioning"
                out[site] = state
        return out

    def close(self) -> None:
        super().close()
        for t in self._stoppers:
            t.join(self.stop_timeout_s + 5)
