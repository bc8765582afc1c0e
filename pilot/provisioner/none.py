"""Provisioner for SuperNodes started by hand (README's multi-terminal deployment).

Nothing is started or stopped: a site is ready whenever its node is connected. The ServerApp
still sends a leaving site its stop request and simply stops giving it work."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pilot.provisioner.base import Provisioner


class NoneProvisioner(Provisioner):
    def __init__(self, sites: Iterable[Any] = (), **_: Any):
        self._sites = [getattr(s, "name", s) for s in sites]

    def start(self, site: str) -> None:
        """Nothing to do: the operator runs the SuperNode."""

    def stop(self, site: str, drain: bool = True) -> None:
        """Nothing to do: the operator decides when the SuperNode goes."""

    def status(self) -> dict[str, str]:
        return dict.fromkeys(self._sites, "external")
