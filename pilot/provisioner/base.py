"""The provisioner interface (the package docstring says what each method promises)."""

from __future__ import annotations

from abc import ABC, abstractmethod

KINDS = ("subprocess", "none", "kubernetes")


class Provisioner(ABC):
    @abstractmethod
    def start(self, site: str) -> None: ...

    @abstractmethod
    def stop(self, site: str, drain: bool = True) -> None: ...

    @abstractmethod
    def status(self) -> dict[str, str]: ...

    def close(self) -> None:
        for site, state in self.status().items():
            if state not in ("stopped", "external"):
                self.stop(site, drain=True)
