"""What the launcher says went wrong: a fixable problem (one line) or an interruption."""

from __future__ import annotations


class LaunchError(ValueError):
    """A problem the user can fix; the message says what to do. Printed as one line."""


class Interrupted(BaseException):
    """SIGTERM/SIGHUP, turned into an exception so `finally` blocks tear the stack down."""
