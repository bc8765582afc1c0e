"""The preStop drain (pilot.k8s.drain) against a real Valkey: an unplanned scale-down of a
training site sets its stop key and waits for the reply; an idle site returns at once."""

from __future__ import annotations

import threading
import time

import pytest

from pilot.infra.signals import Signals, connect
from pilot.k8s.drain import drain


@pytest.fixture
def r(redis_url):
    client = connect(redis_url)
    yield client
    for key in client.scan_iter(match="curtail:drain-*"):
        client.delete(key)


def test_idle_site_returns_at_once_without_a_stop_key(r):
    sig = Signals(r, "drain-idle")
    sig.set_power("texas", "idle")
    t0 = time.monotonic()
    assert drain(r, "texas", 30, busy=lambda: False) == "idle"
    assert time.monotonic() - t0 < 1 and sig.stop_reason("texas") is None


def test_training_site_gets_its_stop_key_and_drain_waits_for_the_reply(r, monkeypatch):
    monkeypatch.setattr("pilot.k8s.drain.SETTLE_S", 0.2)
    sig = Signals(r, "drain-train")
    sig.set_power("texas", "train")
    other = Signals(r, "drain-other")
    other.set_power("texas", "idle")
    clientapp = threading.Event()
    clientapp.set()

    def client_side():  # the ClientApp sees the stop key, sends its partial reply, exits
        while sig.stop_reason("texas") is None:
            time.sleep(0.05)
        time.sleep(0.5)
        sig.set_power("texas", "idle")
        clientapp.clear()

    threading.Thread(target=client_side, daemon=True).start()
    out = drain(r, "texas", 30, busy=clientapp.is_set, poll_s=0.05)
    assert out == "drained ['drain-train']"
    assert sig.stop_reason("texas") == "prestop" and other.stop_reason("texas") is None
    assert not clientapp.is_set()


def test_drain_is_bounded_by_its_budget(r):
    Signals(r, "drain-stuck").set_power("texas", "train")
    t0 = time.monotonic()
    assert drain(r, "texas", 1.0, busy=lambda: True, poll_s=0.05).startswith("grace exhausted")
    assert time.monotonic() - t0 < 3
