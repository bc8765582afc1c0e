"""The repository's places (the Flower app directory, bundled configs) and the run's home.

Relative data, tokenizer and run paths resolve under CURTAIL_HOME (nanochat.paths: one rule
for the trainer and the control plane)."""

from __future__ import annotations

from pathlib import Path

from nanochat.paths import curtail_home, resolve

REPO = Path(__file__).resolve().parents[2]  # the Flower app directory (`flwr run .`)
CONFIGS = REPO / "configs"

__all__ = ["CONFIGS", "REPO", "curtail_home", "prepared", "resolve"]


def prepared(data_dir: Path, tok_dir: Path) -> tuple[bool, bool]:
    """(corpus built, tokenizer built) at these directories."""
    from nanochat.dataset import list_shards
    from nanochat.tokenizer import RANKS_FILE

    try:
        data_ok = len(list_shards(data_dir)) >= 2  # >= one training shard + validation
    except ValueError:  # DatasetError: no such directory / no shards
        data_ok = False
    return data_ok, (tok_dir / RANKS_FILE).is_file()
