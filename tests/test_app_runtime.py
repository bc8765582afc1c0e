"""The by-hand deployment's pieces, fast: `curtail-llm redis`, the ServerApp's event lines,
one-line configuration errors, the stop handler, and the report written as a run ends.
The whole README section against real processes: tests/test_manual_deployment.py."""

from __future__ import annotations

import logging
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

REPO = Path(__file__).resolve().parents[1]


def test_redis_command_keeps_the_password_in_a_private_file_and_out_of_the_terminal(tmp_path):
    env = {**os.environ, "CURTAIL_HOME": str(tmp_path)}
    env.pop("CURTAIL_REDIS_URL", None)
    cli = [sys.executable, "-m", "pilot.launch", "redis"]
    server = subprocess.Popen(
        cli, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    url_file = tmp_path / "redis.url"
    try:
        deadline = time.monotonic() + 60
        while not url_file.exists():
            assert server.poll() is None and time.monotonic() < deadline, server.stdout.read()
            time.sleep(0.1)
        assert stat.S_IMODE(url_file.stat().st_mode) == 0o600
        url = subprocess.run(
            [*cli, "--url"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
        ).stdout.strip()
        assert redis.Redis.from_url(url).ping()
        password = url.split("@")[0].rsplit(":", 1)[1]
    finally:
        server.send_signal(signal.SIGINT)  # Ctrl-C
        out, _ = server.communicate(timeout=30)
    assert 'export CURTAIL_REDIS_URL="$(curtail-llm redis --url)"' in out
    assert password not in out
    assert not url_file.exists()
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    gone = subprocess.run([*cli, "--url"], cwd=REPO, env=env, capture_output=True, text=True)
    assert gone.returncode == 2 and "start `curtail-llm redis`" in gone.stderr


def test_each_notable_event_is_logged_as_one_line_and_faults_as_warnings(tmp_path, caplog):
    from pilot.events.log import EventLog

    events = EventLog(tmp_path / "events.jsonl", lambda: 1717250400.0)
    with caplog.at_level(logging.INFO, logger="pilot.events.log"):
        events.emit("mode", mode="LOCAL", train=["texas"], provision=["texas"], reasons={})
        events.emit("train_interval", site="texas", round=1, start=0.0, end=1.0)  # not notable
        events.emit("aggregate", round=1, loss=6.25, tokens=512, global_step=40, sites=["texas"])
        events.emit("fault", error="node disconnected", site="texas")
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in lines] == ["INFO", "INFO", "WARNING"]
    assert lines[0][1] == "[06-01 14:00] mode LOCAL train=texas"
    assert lines[1][1].startswith("[06-01 14:00] aggregate round 1 step 40 ")
    assert "6.250" in lines[1][1]
    assert lines[2][1] == "[06-01 14:00] fault error=node disconnected site=texas"


def test_setup_errors_become_one_line_and_flower_logs_no_traceback_for_them(caplog):
    from pilot.flower.app_runtime import (
        ConfigurationError,
        _not_a_configuration_error,
        configuration_errors,
    )

    with caplog.at_level(logging.ERROR), pytest.raises(ConfigurationError) as err:
        with configuration_errors():
            raise ValueError("sites.toml: [[sites]] name 'Tex as' is not a DNS label")
    assert [r.getMessage() for r in caplog.records] == [
        "configuration error: sites.toml: [[sites]] name 'Tex as' is not a DNS label"
    ]
    # Flower's "ServerApp raised an exception" record with our error is dropped, others kept
    flower = logging.LogRecord("flwr", logging.ERROR, "", 0, "raised", (), None)
    assert _not_a_configuration_error(flower)
    flower.exc_info = (ConfigurationError, err.value, None)
    assert not _not_a_configuration_error(flower)


def test_unknown_preset_names_presets_only(monkeypatch, tmp_path):
    from pilot.control.run_config import RunConfigError, load_run_config

    monkeypatch.setenv("CURTAIL_HOME", str(tmp_path))
    with pytest.raises(RunConfigError) as err:
        load_run_config({"preset": "no-such"})
    assert "cpu-demo" in str(err.value) and "paper-d20" in str(err.value)
    assert "cpu-demo-sites" not in str(err.value) and "paper-3site" not in str(err.value)
    with pytest.raises(RunConfigError, match="provisioner 'manual'.*subprocess, none"):
        load_run_config({"preset": "cpu-demo", "provisioner": "manual"})
    assert load_run_config({"preset": "cpu-demo", "provisioner": "none"}).provisioner == "none"


def test_unprepared_corpus_names_the_prepare_command(monkeypatch, tmp_path):
    from pilot.control.run_config import load_run_config
    from pilot.flower.app_runtime import ConfigurationError, check_prepared

    monkeypatch.setenv("CURTAIL_HOME", str(tmp_path))
    with pytest.raises(ConfigurationError, match="curtail-llm prepare --preset cpu-demo"):
        check_prepared(load_run_config({"preset": "cpu-demo"}))


def test_missing_redis_url_says_where_to_export_it(monkeypatch):
    from pilot.flower.app_runtime import ConfigurationError, open_signals

    monkeypatch.delenv("CURTAIL_REDIS_URL", raising=False)
    with pytest.raises(ConfigurationError, match="flower-superlink.*curtail-llm redis"):
        open_signals("r")


def test_a_stop_signal_ends_the_body_then_reaches_flowers_handler():
    from pilot.flower.app_runtime import graceful_stop

    flower: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda n, f: flower.append(n))
    ended = []
    try:
        with graceful_stop():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # interrupted by RunStopped
            finally:
                ended.append(flower == [])  # our shutdown runs before Flower's handler
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert ended == [True] and flower == [signal.SIGTERM]


def test_a_failing_report_is_logged_not_raised(tmp_path, caplog):
    from pilot.analysis.report import write_after_run

    with caplog.at_level(logging.WARNING, logger="pilot.analysis.report"):
        assert write_after_run(tmp_path) is False
    assert "python -m pilot.analysis.report" in caplog.text
