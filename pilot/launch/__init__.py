"""`curtail-llm`: the launcher (cli), its live view (view)."""

from pilot.launch.cli import main

__all__ = ["main"]
