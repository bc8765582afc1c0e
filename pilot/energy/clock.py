"""One mapping between wall time and simulated (trace) time.

The energy simulation publishes in ``meta`` the anchor of its latest tick (``sim_time`` and the
``wall_time`` at which it was simulated) and its ``speedup``: simulated seconds per wall
second. Policy durations are simulated seconds; waits and deadlines are wall seconds.
``speedup == 0`` means "as fast as possible": there is no fixed rate, so simulated time is
whatever the simulation last published and wall durations of simulated spans are zero.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Clock:
    sim_start: float  # simulated epoch seconds at the anchor
    wall_start: float  # wall epoch seconds at the anchor
    speedup: float = 1.0  # simulated seconds per wall second; 0 = unpaced

    def __post_init__(self) -> None:
        if self.speedup < 0:
            raise ValueError(f"speedup must be >= 0, got {self.speedup}")

    @property
    def paced(self) -> bool:
        return self.speedup > 0

    def sim_now(self, wall: float | None = None) -> float:
        if not self.paced:
            return self.sim_start
        wall = time.time() if wall is None else wall
        return self.sim_start + (wall - self.wall_start) * self.speedup

    def wall_at(self, sim_t: float) -> float:
        """Wall instant at which simulated instant ``sim_t`` is (or was) reached."""
        if not self.paced:
            return self.wall_start
        return self.wall_start + (sim_t - self.sim_start) / self.speedup

    def to_sim(self, wall_seconds: float) -> float:
        if not self.paced:
            raise ValueError("an unpaced simulation (speedup 0) has no wall->sim rate")
        return wall_seconds * self.speedup

    def to_wall(self, sim_seconds: float) -> float:
        return sim_seconds / self.speedup if self.paced else 0.0

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Clock:
        """From the energy simulation's ``meta`` hash (strings or numbers).

        Anchors at the latest tick (sim_time, wall_time) when published, else at the start
        (sim_start, wall_start): the latest anchor absorbs any pacing drift."""
        speedup = float(meta["speedup"])
        if "sim_time" in meta and "wall_time" in meta:
            return cls(float(meta["sim_time"]), float(meta["wall_time"]), speedup)
        return cls(float(meta["sim_start"]), float(meta["wall_start"]), speedup)
