"""Atomic checkpoints: one file per step holding model + optimizer states + metadata.

A checkpoint is written to a temp file in the same directory, fsynced, and renamed over its
final name (os.replace is atomic on POSIX), so a crash mid-write never leaves a truncated
checkpoint that latest() would pick.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from nanochat.paths import atomic_write

CKPT_RE = re.compile(r"^step_(\d{9})\.pt$")


def save(
    directory: str | Path,
    model_state: dict[str, torch.Tensor],
    optim_states: list[dict],
    meta: dict[str, Any],
    keep: int | None = None,
) -> Path:
    """Write directory/step_{meta['step']:09d}.pt atomically; with keep, delete all but the
    newest `keep` checkpoints afterwards. meta may hold tensors (RNG states) and plain values."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"step_{int(meta['step']):09d}.pt"
    state = {"model": model_state, "optim": optim_states, "meta": meta}
    atomic_write(path, lambda f: torch.save(state, f), fsync=True)
    if keep is not None:
        for old in sorted(p for p in d.iterdir() if CKPT_RE.match(p.name))[:-keep]:
            old.unlink()
    return path


def latest(directory: str | Path) -> Path | None:
    """Newest checkpoint in directory (highest step), or None."""
    d = Path(directory)
    if not d.is_dir():
        return None
    ckpts = sorted(p for p in d.iterdir() if CKPT_RE.match(p.name))
    return ckpts[-1] if ckpts else None


def load(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[dict, list[dict], dict]:
    """(model_state, optim_states, meta) from a checkpoint file, or the latest one of a dir."""
    p = Path(path)
    if p.is_dir():
        found = latest(p)
        if found is None:
            raise FileNotFoundError(f"no checkpoint (step_*.pt) in {p}")
        p = found
    payload = torch.load(p, map_location=map_location, weights_only=True)
    return payload["model"], payload["optim"], payload["meta"]


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
