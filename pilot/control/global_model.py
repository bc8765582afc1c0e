"""The global model the server owns: fp32 master weights, the outer optimizer, and the encoded
copy every TRAIN of one model version shares (encoding ~2 GB at d20 once, not once per site).
``apply`` turns a round's replies into the next version."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from pilot.control.aggregate import OuterOptimizer, State, encode_state, weighted_average
from pilot.control.rounds import Reply

if TYPE_CHECKING:
    from flwr.app import ArrayRecord


@dataclass
class GlobalModel:
    weights: State
    outer: OuterOptimizer
    version: int = 0  # bumped by every apply: the encoded cache's key
    # the buffer the next average is written into (recycled between rounds, not saved)
    scratch: State | None = field(default=None, repr=False)
    _encoded: tuple[int, torch.dtype, ArrayRecord] | None = field(default=None, repr=False)

    def apply(self, worked: Sequence[Reply]) -> None:
        """Average ``worked`` (replies that trained), work-weighted by tokens, into the
        weights through the outer optimizer."""
        avg = weighted_average(
            [rep.state for rep in worked], [float(rep.tokens) for rep in worked], out=self.scratch
        )
        old = self.weights
        self.weights = self.outer.step(old, avg)
        # recycle buffers: the next average goes into whichever state is now free
        self.scratch = old if self.weights is avg else avg
        self.version += 1

    def encoded(self, dtype: torch.dtype) -> ArrayRecord:
        """The weights on the wire, encoded once per version and dtype."""
        if self._encoded is None or self._encoded[:2] != (self.version, dtype):
            self._encoded = (self.version, dtype, encode_state(self.weights, dtype))
        return self._encoded[2]
