"""A site's inner optimizer state (AdamW/Muon moments) on node-local disk, one file per rank
under the job's state dir, and the rule for when it may serve a round.

DiLoCo keeps inner state between rounds. A trainer keeps it in memory; this copy lets a
restarted trainer (or the per-message path) take it up.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from nanochat.paths import atomic_write
from pilot.flower.trainer.channel import Job

# A site's inner optimizer state (AdamW/Muon moments) is reused for a round at most this many
# rounds after the round it comes from: a site that sat out longer would apply the moments of
# a model the others have moved on from, so it starts them fresh.
INNER_MAX_ROUND_LAG = 4


def is_fresh(saved_round: int, round_n: int) -> bool:
    """The staleness rule: inner state from round ``saved_round`` serves round ``round_n``
    if it is at most INNER_MAX_ROUND_LAG rounds older (and from this run, config and world)."""
    return 0 <= saved_round <= round_n <= saved_round + INNER_MAX_ROUND_LAG


def _path(job: Job, rank: int) -> Path:
    return Path(job.state_dir) / f"inner-rank{rank}.pt"


def restore(optimizers: list, job: Job, rank: int, world: int) -> bool:
    """Load the inner optimizer state saved by this site's previous round, if compatible."""
    path = _path(job, rank)
    if not path.is_file():
        return False
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if (
            saved["run"] != job.run
            or saved["world"] != world
            or saved["train_config"] != json.dumps(job.train_config, sort_keys=True)
            or not is_fresh(int(saved["round"]), job.round)
        ):
            return False
        for opt, sd in zip(optimizers, saved["optim"], strict=True):
            opt.load_state_dict(sd)
        return True
    except (OSError, RuntimeError, KeyError, ValueError):
        return False  # a torn or foreign file: start the inner optimizer fresh


def save(optimizers: list, job: Job, rank: int, world: int) -> None:
    path = _path(job, rank)
    state = {
        "run": job.run,
        "world": world,
        "round": job.round,
        "train_config": json.dumps(job.train_config, sort_keys=True),
        "optim": [o.state_dict() for o in optimizers],
    }
    atomic_write(path, lambda f: torch.save(state, f))
