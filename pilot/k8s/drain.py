"""preStop drain of a SuperNode pod: ``python -m pilot.k8s.drain --site S --grace G``.

A scale-down the ServerApp asked for finds the site idle (the ServerApp already collected
its partial reply) and returns at once. Any other (``kubectl scale``, an eviction, a rollout)
finds the site training: this sets the site's stop key in every run whose ``power:<site>``
reads ``train``, then waits until no run trains there and no ``flwr-clientapp`` process is
left, plus a few seconds for the SuperNode to forward the reply, all capped at ``grace - 10``
seconds so SIGTERM still comes inside the pod's grace period. The SuperNode stays alive
during preStop, which is what lets the partial reply reach the SuperLink.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pilot.infra.signals import Signals, connect

SETTLE_S = 5.0  # after the ClientApp exits: the SuperNode forwards its reply
MARGIN_S = 10.0  # left of the grace period for SIGTERM and a clean exit
REASON = "prestop"


def clientapps_running() -> bool:
    """Whether any ``flwr-clientapp`` process runs in this pod (its PID namespace)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if b"flwr-clientapp" in cmdline.read_bytes():
                return True
        except OSError:
            continue
    return False


def training_runs(r, site: str) -> list[str]:
    """Runs whose ``power:<site>`` says the site trains now."""
    runs = []
    for key in r.scan_iter(match=f"curtail:*:power:{site}", count=500):
        if r.get(key) == "train":
            runs.append(key.split(":")[1])
    return runs


def drain(
    r,
    site: str,
    budget_s: float,
    busy: Callable[[], bool] = clientapps_running,
    poll_s: float = 0.5,
) -> str:
    """Stop the site's training and wait for its reply to leave; returns what happened."""
    deadline = time.monotonic() + budget_s
    runs = training_runs(r, site)
    for run in runs:
        Signals(r, run).request_stop(site, REASON)
    if not runs and not busy():
        return "idle"
    while time.monotonic() < deadline:
        if not training_runs(r, site) and not busy():
            time.sleep(max(0.0, min(SETTLE_S, deadline - time.monotonic())))
            return f"drained {runs}"
        time.sleep(poll_s)
    return f"grace exhausted {runs}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--site", required=True)
    p.add_argument("--grace", type=float, required=True, help="the pod's grace period (s)")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    try:
        outcome = drain(connect(retries=3), args.site, max(0.0, args.grace - MARGIN_S))
    except Exception as exc:  # never block the shutdown on Redis trouble: SIGTERM follows
        outcome = f"failed: {exc}"
    print(f"drain {args.site}: {outcome} after {time.monotonic() - t0:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
