"""The policy's decision arrays as the events a live run emits.

pilot.control.batch.simulate_batch decides per site and tick (provision? train?); the
simulator turns each run of True ticks into the provisioning cycle or training interval a live
run would log (schema: pilot/events/schema.py), so the carbon ledger can fold them as it folds
a real run's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pilot.events.schema import make_event

# At one instant: close before open, so a release and a re-provision keep their order.
_ORDER = {
    "run_start": 0,
    "mode": 1,
    "train_interval": 2,
    "deprovision": 3,
    "provision_decided": 4,
    "provision_started": 5,
    "provision_complete": 6,
    "run_end": 9,
}


def _edges(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tick indices where a boolean row turns on, and where it turns off (len(x): still on)."""
    d = np.diff(np.concatenate([[False], x, [False]]).astype(np.int8))
    return np.flatnonzero(d == 1), np.flatnonzero(d == -1)


def site_events(
    site: str,
    provision: np.ndarray,
    train: np.ndarray,
    bounds: np.ndarray,
    delay: float,
    reason: str,
) -> list[dict[str, Any]]:
    """One site's provisioning cycles and training intervals. `bounds[k]` is tick k's time and
    `bounds[-1]` the end of the simulation (an edge there: still on when it ends); the site is
    ready `delay` seconds after it was asked to provision."""
    events = []
    on, off = _edges(provision)
    for a, b in zip(on, off, strict=True):
        t0, t1 = float(bounds[a]), float(bounds[b])
        events.append(make_event("provision_decided", t0, site=site, reason=reason))
        events.append(make_event("provision_started", t0, site=site))
        if t0 + delay < t1:
            events.append(make_event("provision_complete", t0 + delay, site=site))
        why = "released" if b < len(provision) else "end of simulation"
        events.append(make_event("deprovision", t1, site=site, reason=why))
    on, off = _edges(train)
    for a, b in zip(on, off, strict=True):
        t0, t1 = float(bounds[a]), float(bounds[b])
        events.append(make_event("train_interval", t1, site=site, start=t0, end=t1, energy_j=None))
    return events


def mode_events(
    names: Sequence[str], provision: np.ndarray, train: np.ndarray, ticks: np.ndarray
) -> list[dict[str, Any]]:
    """A `mode` event at every tick where the number of training sites changes (sites x ticks
    arrays), naming the sites that train and the sites provisioned."""
    from pilot.control.policy import Mode

    n_train = train.sum(axis=0)
    labels = np.array(names)
    return [
        make_event(
            "mode",
            float(ticks[k]),
            mode=str(Mode.of(int(n_train[k]))),
            train=labels[train[:, k]].tolist(),
            provision=labels[provision[:, k]].tolist(),
        )
        for k in np.flatnonzero(np.diff(np.concatenate([[-1], n_train])) != 0)
    ]


def ordered(events: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The events in time order, closes before opens at one instant."""
    return sorted(events, key=lambda e: (e["t"], _ORDER.get(e["kind"], 7)))
