"""The Redis schema against a real Valkey server; reconnect with backoff; URL redaction; the
wall <-> simulated clock built from what the simulation publishes."""

import threading
import time
import uuid

import pytest
import redis

from pilot.energy.clock import Clock
from pilot.infra import signals as S
from pilot.infra.procs import free_port
from pilot.infra.signals import Signals, connect, redact
from pilot.infra.valkey import EmbeddedValkey


@pytest.fixture
def sig(redis_url):
    s = Signals(connect(redis_url), f"t-{uuid.uuid4().hex[:8]}")
    yield s
    s.clear()


def test_redact_masks_the_password(redis_url):
    assert "***@" in redact(redis_url)
    password = redis_url.split(":")[2].split("@")[0]
    assert password and password not in redact(redis_url)
    assert redact("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_embedded_valkey_requires_the_password_and_frees_its_port():
    with EmbeddedValkey() as server:
        port = server.port
        assert redis.Redis.from_url(server.url).ping()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=port, retry=None).ping()
        wrong = server.url.replace(server.password, "wrong")
        t = time.monotonic()
        with pytest.raises(ValueError, match="rejected the password") as e:
            connect(wrong)
        assert time.monotonic() - t < 2 and "wrong" not in str(e.value)
    with EmbeddedValkey(port=port) as again:  # the port is free again
        assert redis.Redis.from_url(again.url).ping()


def test_unreachable_redis_error_names_the_redacted_url():
    url = f"redis://:topsecret@127.0.0.1:{free_port()}/0"
    t = time.monotonic()
    with pytest.raises(ConnectionError) as e:
        connect(url, retries=2, backoff=0.05)
    assert "topsecret" not in str(e.value) and "***@127.0.0.1" in str(e.value)
    assert time.monotonic() - t < 10


def test_client_survives_a_server_restart_by_retrying_with_backoff():
    port = free_port()
    server = EmbeddedValkey(port=port, password="pw-restart").start()
    sig = Signals(connect(server.url, retries=20, backoff=0.05, max_backoff=0.5), "restart")
    sig.set_power("a", 100.0)
    server.stop()
    holder: list[EmbeddedValkey] = []
    restarted = threading.Timer(
        0.5, lambda: holder.append(EmbeddedValkey(port=port, password="pw-restart").start())
    )
    restarted.start()
    try:
        sig.set_power("a", 250.0)  # fails over the restart, then succeeds on a retry
        assert sig.power("a") == 250.0
    finally:
        restarted.join()
        for s in holder:
            s.stop()


def test_meta_and_tick_roundtrip_with_types(sig):
    sig.publish_meta(
        sim_start=1000.0,
        wall_start=50.0,
        speedup=60,
        status="running",
        sites=["a", "b"],
        regions={"a": "X", "b": "Y"},
        threshold=100.0,
    )
    sig.publish_tick(
        1060.0,
        {
            "a": {"mci": 80.5, "curtailed": True, "power_w": 2024.0},
            "b": {"mci": 300.0, "curtailed": False, "power_w": 0.0},
        },
        forecasts={"a": [(1060.0, 80.5), (4660.0, 120.0)]},
        wall=51.0,
    )
    m = sig.meta()
    assert m["sites"] == ["a", "b"] and m["regions"]["b"] == "Y" and m["status"] == "running"
    assert m["speedup"] == 60.0 and m["sim_time"] == 1060.0 and m["wall_time"] == 51.0
    assert sig.site("a") == {"time": 1060.0, "mci": 80.5, "curtailed": True, "power_w": 2024.0}
    assert sig.site("b")["curtailed"] is False and sig.site("zzz") is None
    assert sig.forecast("a") == [(1060.0, 80.5), (4660.0, 120.0)] and sig.forecast("b") == []
    _, entries = sig.wait_signals("0", block_ms=None)
    assert [(e["site"], e["curtailed"]) for e in entries] == [("a", True), ("b", False)]


def test_wait_signals_blocks_until_a_tick_arrives(sig):
    last, _ = sig.wait_signals("$", block_ms=None)
    threading.Timer(
        0.3, lambda: sig.publish_tick(5.0, {"a": {"mci": 1.0, "curtailed": True, "power_w": 0}})
    ).start()
    t = time.monotonic()
    last2, entries = sig.wait_signals(last, block_ms=5000)
    assert 0.2 < time.monotonic() - t < 4 and entries[0]["time"] == 5.0 and last2 != last
    assert sig.wait_signals(last2, block_ms=50)[1] == []


def test_signals_stream_is_bounded(sig, monkeypatch):
    monkeypatch.setattr(S, "SIGNALS_MAXLEN", 100)
    for i in range(1000):
        sig.publish_tick(float(i), {"a": {"mci": 1.0, "curtailed": True, "power_w": 0}})
    assert sig.r.xlen(sig.key("signals")) < 300


def test_power_reports_numbers_or_model_states_with_optional_ttl(sig):
    assert sig.power("a") is None
    sig.set_power("a", 1234.5)
    assert sig.power("a") == 1234.5
    sig.set_power("a", "idle")
    assert sig.power("a") == "idle"
    with pytest.raises(ValueError):
        sig.set_power("a", "boost")
    with pytest.raises(ValueError):
        sig.set_power("a", -1.0)
    sig.set_power("b", 10.0, ttl_s=0.2)
    time.sleep(0.4)
    assert sig.power("b") is None


def test_stop_requests_rounds_logs_and_events(sig):
    sig.request_stop("a", "window closed", ttl_s=60)
    assert sig.stop_reason("a") == "window closed" and sig.stop_reason("b") is None
    assert 0 < sig.r.ttl(sig.key("stop:a")) <= 60
    sig.clear_stop("a")
    assert sig.stop_reason("a") is None
    assert not sig.round_ended(3)
    sig.end_round(3)
    assert sig.round_ended(3)
    sig.log_step("a", step=1, loss=3.5, lr=0.02)
    assert sig.logs("a")[0]["loss"] == 3.5
    sig.event("provision", site="a", delay_s=240, sites=["a"])
    ev = sig.events()
    assert ev[-1]["kind"] == "provision" and ev[-1]["sites"] == ["a"] and ev[-1]["delay_s"] == 240


def test_lease_request_reaches_the_server_and_its_reply_the_requester(sig):
    got = {}
    t = threading.Thread(
        target=lambda: got.update(a=sig.request_lease("texas", 3, 1, 2, timeout_s=10))
    )
    t.start()
    deadline = time.time() + 10
    reqs = []
    while not reqs and time.time() < deadline:
        reqs = sig.lease_requests()
        time.sleep(0.05)
    assert [{k: v for k, v in r.items() if k != "id"} for r in reqs] == [
        {"site": "texas", "round": 3, "rank": 1, "world": 2}
    ]
    sig.r.rpush(sig.key("lease:requests"), "not json")
    assert sig.lease_requests() == ["not json"]  # returned raw, for the caller to report
    sig.reply_lease(reqs[0]["id"], {"site": "texas", "chunks": [[0, 1, 30]], "start_rows": {}})
    t.join(10)
    assert got["a"] == {"site": "texas", "chunks": [[0, 1, 30]], "start_rows": {}}
    assert sig.request_lease("texas", 3, 0, 1, timeout_s=0.2) is None  # nobody answers


def test_run_names_are_validated(redis_url):
    with pytest.raises(ValueError, match="run name"):
        Signals(connect(redis_url), "bad name:*")


def test_clock_maps_wall_to_sim_from_published_meta(sig):
    sig.publish_meta(sim_start=1000.0, wall_start=500.0, speedup=60.0)
    c = Clock.from_meta(sig.meta())
    assert c.sim_now(wall=510.0) == 1600.0 and c.wall_at(1600.0) == 510.0
    assert c.to_sim(2.0) == 120.0 and c.to_wall(600.0) == 10.0
    sig.publish_tick(2000.0, {}, wall=520.0)  # the latest tick re-anchors (absorbs drift)
    c = Clock.from_meta(sig.meta())
    assert c.sim_now(wall=521.0) == 2060.0
    unpaced = Clock(2000.0, 520.0, 0.0)
    assert unpaced.sim_now(wall=9999.0) == 2000.0 and unpaced.to_wall(600.0) == 0.0
    with pytest.raises(ValueError):
        unpaced.to_sim(1.0)


def test_a_new_simulation_drops_the_previous_ones_signals_but_keeps_site_reports(sig):
    sig.publish_meta(status="finished")
    sig.publish_tick(1.0, {"a": {"mci": 1.0, "curtailed": True, "power_w": 0}}, {"a": [(1.0, 1.0)]})
    sig.set_power("a", "train")
    sig.reset_published(["a"])
    assert sig.meta() == {} and sig.site("a") is None and sig.forecast("a") == []
    assert sig.wait_signals("0", block_ms=None)[1] == [] and sig.power("a") == "train"
