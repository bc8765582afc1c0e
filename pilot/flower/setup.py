"""What the control loop needs before its first tick and after its last: the run's clock from
the energy simulation, the provisioner, the server state (checkpoint or fresh) and the
run-end report (built in a child process: the live loop imports no analysis code)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from nanochat.paths import resolve
from pilot.control.aggregate import OuterOptimizer
from pilot.control.data_ledger import DataLedger
from pilot.control.run_config import RunConfig, RunConfigError, runtime_api_address
from pilot.control.server_state import CheckpointMismatch, ServerState
from pilot.energy.clock import Clock

log = logging.getLogger(__name__)

REPORT_TIMEOUT_S = 300.0  # wall seconds the run-end report may take
META_WAIT_MS = 2000  # block on the signals stream while the energy simulation starts


def wait_clock(sig: Any) -> tuple[Clock, str]:
    """The run's clock from the energy simulation's meta, and the signals stream position;
    blocks until the meta is published."""
    last = "$"
    while True:
        meta = sig.meta()
        if "speedup" in meta and ("sim_time" in meta or "sim_start" in meta):
            return Clock.from_meta(meta), last
        log.info("waiting for the energy simulation to publish %s", sig.key("meta"))
        last, _ = sig.wait_signals("$", block_ms=META_WAIT_MS)


def make_provisioner(cfg: RunConfig, sites: Any, to_wall: Any) -> Any:
    from pilot.provisioner import make_provisioner as make

    return make(
        cfg.provisioner,
        sites=sites.sites,
        superlink=cfg.superlink or runtime_api_address(),
        state_dir=cfg.run_dir / "nodes",
        log_dir=cfg.run_dir / "logs",
        to_wall=to_wall,
        stop_timeout_s=cfg.node_stop_timeout_s,
        root_certificates=cfg.root_certificates,
        auth_keys_dir=cfg.supernode_auth_keys,
        namespace=cfg.k8s_namespace,
        kubeconfig=cfg.k8s_kubeconfig,
        on_launch=_start_trainer,
    )


def _start_trainer(node_dir: Path, node_pid: int, env: Any, cpu_threads: int) -> None:
    """A new local SuperNode's persistent trainer, started beside it: torch imports while
    the node registers, so its first TRAIN finds the trainer ready."""
    from pilot.flower.trainer.relay import start_soon

    start_soon(node_dir, cpu_threads, node_pid, env=env)


def load_state(cfg: RunConfig) -> tuple[ServerState, bool]:
    """The run's state from its newest checkpoint (True), else a fresh one (False)."""
    from nanochat.dataset import chunk_table

    outer = OuterOptimizer(cfg.outer, cfg.outer_lr, cfg.outer_momentum)
    try:
        loaded = ServerState.load(cfg.run_dir / "checkpoint", cfg.train, outer)
    except CheckpointMismatch as e:
        raise RunConfigError(str(e)) from None
    if loaded is not None:
        return loaded[0], True
    ledger = DataLedger(chunk_table(resolve(cfg.data_dir)))
    return ServerState.fresh(cfg.train, outer, ledger), False


def write_report(run_dir: Path) -> None:
    """The run's report, built by ``python -m pilot.analysis.report --after-run`` in a child
    process; its lines go to this log. Never raises: the run's own error wins."""
    import pilot

    root = str(Path(pilot.__file__).resolve().parents[1])  # this pilot, wherever Flower put it
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    argv = [sys.executable, "-m", "pilot.analysis.report", str(run_dir), "--after-run"]
    try:
        out = subprocess.run(
            argv,
            env={**os.environ, "PYTHONPATH": path},
            capture_output=True,
            text=True,
            timeout=REPORT_TIMEOUT_S,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("report not written (%s): rebuild it with %s", e, " ".join(argv[1:-1]))
        return
    for line in out.stdout.splitlines():
        log.info("%s", line)
    for line in out.stderr.strip().splitlines()[-3:]:  # a crash's last words
        log.warning("report: %s", line)
