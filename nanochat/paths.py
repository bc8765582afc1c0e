"""Where relative data, tokenizer and run paths live: torch-free, so launchers import it cheaply."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def curtail_home() -> Path:
    """Root for relative data/tokenizer/run paths: $CURTAIL_HOME or ~/.cache/curtail-llm."""
    return Path(os.environ.get("CURTAIL_HOME", Path.home() / ".cache" / "curtail-llm"))


def resolve(path: str | os.PathLike, base: Path | None = None) -> Path:
    """Absolute paths stay as they are; relative ones live under ``base`` (curtail_home())."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else (curtail_home() if base is None else base) / p


def atomic_write(
    path: Path, write: Callable[[IO[bytes]], Any], *, mode: int = 0o644, fsync: bool = False
) -> None:
    """Write ``path`` through ``write(file)`` into a temporary sibling, then rename it over:
    a reader sees the old file or the whole new one, never a torn write (``mode`` is set
    before any byte lands, so a secret file is never world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        write(f)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str, *, mode: int = 0o644) -> None:
    atomic_write(path, lambda f: f.write(text.encode()), mode=mode)
