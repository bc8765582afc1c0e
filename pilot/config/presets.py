"""Presets: the bundled ``configs/<name>.toml`` files with a [launch] table, or a TOML path.

One lookup for the launcher and the ServerApp; a relative path resolves against the caller's
``base`` (the launcher's working directory, the ServerApp's app directory)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from pilot.config.paths import CONFIGS, resolve


class PresetError(ValueError):
    """A preset that does not exist or is not a preset; the message says what to pass."""


def presets() -> list[str]:
    return sorted(p.stem for p in CONFIGS.glob("*.toml") if is_preset(p))


def is_preset(path: Path) -> bool:
    """A preset has a [launch] table; other TOML files in configs/ are site sets."""
    try:
        return "launch" in tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return False


def find_preset(name: str, base: Path) -> Path:
    """A preset by name (configs/<name>.toml) or by path (ending in .toml, or absolute)."""
    if name.endswith(".toml") or Path(name).expanduser().is_absolute():
        path = resolve(name, base)
        if not path.is_file():
            raise PresetError(
                f"preset file not found: {path} — pass an existing TOML or one of"
                f" {', '.join(presets())}"
            )
        return path
    path = CONFIGS / f"{name}.toml"
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or not is_preset(path):
        raise PresetError(
            f"unknown preset {name!r}: choose one of"
            f" {', '.join(presets()) or '(none found)'} (files in {CONFIGS})"
        )
    return path
