"""The ServerApp's carried state, named once and checkpointed as one thing: the global model
(weights and outer optimizer), the data ledger, the step/token/round counters and each site's
measured read rate. ``save`` after every round; ``load`` on a restart."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pilot.control.aggregate import OuterOptimizer
from pilot.control.data_ledger import DataLedger
from pilot.control.global_model import GlobalModel
from pilot.control.rounds import Reply

log = logging.getLogger(__name__)
CHECKPOINTS_KEPT = 2


class CheckpointMismatch(ValueError):
    """The run's checkpoint was trained with another [train] config."""


@dataclass
class ServerState:
    model: GlobalModel
    ledger: DataLedger
    global_step: int = 0
    tokens: int = 0
    round_n: int = 0  # the last round opened (a restart opens the next one)
    rates: dict[str, float] = field(default_factory=dict)  # site -> rows read per wall s

    @classmethod
    def fresh(cls, train: dict, outer: OuterOptimizer, ledger: DataLedger) -> ServerState:
        """A new run: the model initialised from the [train] seed, nothing trained yet."""
        from nanochat.train import TrainConfig, build_model

        model, _ = build_model(TrainConfig.from_dict(train))  # the baseline's seeded init
        weights = {k: v.detach() for k, v in model.state_dict().items()}
        return cls(GlobalModel(weights, outer), ledger)

    def apply(self, replies: list[Reply], base_step: int) -> float | None:
        """Average the replies that trained (work-weighted by tokens) into the global model
        through the outer optimizer; returns the round-mean train loss (None: nothing
        trained). Every reply's rows are committed to the data ledger, trained on or not."""
        worked = [rep for rep in replies if rep.tokens > 0]
        if not worked:
            return None
        self.model.apply(worked)
        self.global_step = base_step + max(rep.steps for rep in worked)
        tokens = sum(rep.tokens for rep in worked)
        self.tokens += tokens
        return sum(rep.loss * rep.tokens for rep in worked) / tokens

    def save(self, directory: Path, meta: dict[str, Any]) -> None:
        """One checkpoint (weights, outer optimizer, everything else in its meta), the newest
        ``CHECKPOINTS_KEPT`` kept. ``meta`` adds what others own (run, config, carbon)."""
        from nanochat import checkpoint

        meta = {
            **meta,
            "step": self.global_step,
            "round": self.round_n,
            "tokens": self.tokens,
            "data_ledger": self.ledger.to_dict(),
            "rates": dict(self.rates),
            "rng": checkpoint.rng_state(),
            "wall": time.time(),
        }
        checkpoint.save(
            directory,
            self.model.weights,
            [self.model.outer.state_dict()],
            meta,
            keep=CHECKPOINTS_KEPT,
        )

    @classmethod
    def load(
        cls, directory: Path, train: dict, outer: OuterOptimizer
    ) -> tuple[ServerState, dict[str, Any]] | None:
        """The newest checkpoint in ``directory`` and its meta; None when there is none. The
        round in flight when the previous server died is lost: the state opens the next."""
        from nanochat import checkpoint

        path = checkpoint.latest(directory)
        if path is None:
            return None
        model, optim, meta = checkpoint.load(path)
        if meta.get("train_config") != train:
            raise CheckpointMismatch(
                f"checkpoint {path} was trained with another [train] config; "
                "resume with the same preset or use a new run name"
            )
        outer.load_state_dict(optim[0])
        checkpoint.set_rng_state(meta["rng"])
        weights = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in model.items()}
        state = cls(
            model=GlobalModel(weights, outer),
            ledger=DataLedger.from_dict(meta["data_ledger"]),
            global_step=int(meta["step"]),
            tokens=int(meta["tokens"]),
            round_n=int(meta["round"]) + 1,
            rates={k: float(v) for k, v in meta.get("rates", {}).items()},
        )
        log.info(
            "resumed %s: round %d, step %d, %d tokens",
            path,
            meta["round"],
            state.global_step,
            state.tokens,
        )
        return state, meta
