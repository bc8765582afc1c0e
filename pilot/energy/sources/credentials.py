"""Provider credentials, from the environment only: ``NAME`` itself, or a file named by
``NAME_FILE`` (a mounted secret). Never from config files or argv, which get copied and
logged; values are returned, never printed."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from pilot.energy.sources.base import SourceError


def secret(name: str, env: Mapping[str, str] | None = None) -> str | None:
    env = os.environ if env is None else env
    if env.get(name):
        return env[name]
    path = env.get(f"{name}_FILE")
    if not path:
        return None
    try:
        value = Path(path).read_text().strip()
    except OSError as exc:
        raise SourceError(f"{name}_FILE: cannot read {path} ({exc.strerror})") from None
    if not value:
        raise SourceError(f"{name}_FILE: {path} is empty")
    return value


def require(names: list[str], provider: str, env: Mapping[str, str] | None = None) -> list[str]:
    """The values of ``names``, or one SourceError naming every missing variable."""
    values = [secret(n, env) for n in names]
    missing = [n for n, v in zip(names, values, strict=True) if v is None]
    if missing:
        raise SourceError(
            f"{provider} needs {' and '.join(missing)} in the environment "
            f"(or {', '.join(n + '_FILE' for n in missing)} naming a file that holds it)"
        )
    return [v for v in values if v is not None]
