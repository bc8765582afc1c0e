"""The ServerApp process's own concerns around the control loop: readable logs, one-line
configuration errors, and a stop (``flwr stop``, SIGTERM) that still ends the run properly.

Everything the ServerApp logs is what ``flwr run --stream`` shows (Flower mirrors the process's
output to the SuperLink), so the log is kept to our own progress lines: httpx and httpcore log
every HTTP request of the Grid at INFO, which buries them; ``CURTAIL_LOG_HTTP=1`` in the
SuperLink's environment brings those back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Iterator
from types import FrameType
from typing import Any

from pilot.infra.procs import RunStopped

ENV_LOG_HTTP = "CURTAIL_LOG_HTTP"
HTTP_LOGGERS = ("httpx", "httpcore")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

log = logging.getLogger("pilot.flower.server_app")


class ConfigurationError(ValueError):
    """The run cannot start as configured; the message names the fix. Logged as one line."""


def setup_logging() -> None:
    """Our loggers to stderr, once per line. Flower's ``flwr`` logger has its own handler and
    also propagates to the root: filtering it out of ours keeps its lines single."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    handler.addFilter(lambda r: r.name != "flwr" and not r.name.startswith("flwr."))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    if os.environ.get(ENV_LOG_HTTP, "") in ("", "0"):
        for name in HTTP_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
    # Flower logs an exception that ends the ServerApp with its traceback; ours already said
    # what to fix in one line.
    logging.getLogger("flwr").addFilter(_not_a_configuration_error)


def _not_a_configuration_error(record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    return not isinstance(exc, ConfigurationError)


@contextlib.contextmanager
def configuration_errors() -> Iterator[None]:
    """A ValueError raised while the run is being set up (preset, sites file, data, Redis) is a
    user's configuration problem: log it as one line and fail the run (``flwr ls`` shows it
    failed) without a traceback."""
    try:
        yield
    except ConfigurationError as e:
        log.error("configuration error: %s", e)
        raise
    except ValueError as e:
        log.error("configuration error: %s", e)
        raise ConfigurationError(str(e)) from None


def check_prepared(cfg: Any) -> None:
    """Fail before waiting on the energy simulation if the run could never train: the sites
    file must load and the preset's corpus and tokenizer must be built (ClientApps on this
    machine read them from the same CURTAIL_HOME)."""
    from pilot.config.paths import CONFIGS, prepared, resolve
    from pilot.config.sites import load_sites

    load_sites(cfg.sites_file)  # ConfigError names the file and the field
    data, tok = resolve(cfg.data_dir), resolve(cfg.tokenizer_dir)
    data_ok, tok_ok = prepared(data, tok)
    if not (data_ok and tok_ok):
        what, where = ("corpus", data) if not data_ok else ("tokenizer", tok)
        preset = cfg.preset.stem if cfg.preset.parent == CONFIGS else str(cfg.preset)
        raise ConfigurationError(
            f"{what} not built at {where}: run `curtail-llm prepare --preset {preset}` with the"
            " CURTAIL_HOME of the SuperLink and the SuperNodes, then `flwr run` again"
        )


def open_signals(run: str) -> Any:
    """The run's Redis, from CURTAIL_REDIS_URL in the SuperLink's environment (the ServerApp
    inherits it; the `flwr run` terminal's environment never reaches it)."""
    from pilot.infra.signals import ENV_URL, Signals, connect

    if not os.environ.get(ENV_URL):
        raise ConfigurationError(
            f"{ENV_URL} is not set where flower-superlink runs: export it in that terminal"
            " (`curtail-llm redis` prints the line) and restart the SuperLink"
        )
    try:
        return Signals(connect(), run)
    except ConnectionError as e:  # redacted by connect()
        raise ConfigurationError(f"{e}: start Redis or fix {ENV_URL}") from None


@contextlib.contextmanager
def graceful_stop() -> Iterator[None]:
    """Turn the first stop signal into RunStopped in the main thread, so the control loop's
    ``finally`` ends the run (stop keys, run_end, report) while the Grid and Flower's log upload
    still work; then hand the signal to Flower's own handler, which reports the run's status
    and exits. Flower's handler alone would close both first and kill the process 5 s later."""
    received: list[tuple[int, FrameType | None]] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        received.append((signum, frame))
        if len(received) == 1:  # later signals must not cut the shutdown short
            raise RunStopped(signal.Signals(signum).name)

    flower = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS}
    try:
        yield
    except RunStopped as e:
        log.info("run stopped (%s)", e)
    finally:
        for s, handler in flower.items():
            signal.signal(s, handler)
    if received:
        signum, frame = received[0]
        handler = flower[signum]
        if callable(handler):
            handler(signum, frame)
