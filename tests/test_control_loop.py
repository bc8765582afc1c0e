"""The control loop, fast: the real ElasticStrategy ticked by the test over an in-memory Grid
(tests/memgrid.py, the real message codec), real Signals in a real Valkey, the ``none``
provisioner and a tiny model. Each scenario takes a second or two of wall time; the slow
real-process tests (test_flower_app.py) stay as the end-to-end proof."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity
from memgrid import FakeSite, MemGrid
from sitesets import PRESET_HEAD, two_sites

from pilot.control.run_config import load_run_config
from pilot.flower.loop import ElasticStrategy
from pilot.infra.signals import Signals, connect
from pilot.provisioner.none import NoneProvisioner

SPEEDUP = 1500.0  # simulated seconds per wall second
HIGH, LOW = 300.0, 40.0
T0 = 1_717_200_000.0

SITES = two_sites("forecast")  # ours: stops stepping once MCI is above (held warm)

PRESET = (
    PRESET_HEAD
    + """round_min_s = 600        # FEDERATED: 0.4 s wall
round_max_s = 900        # LOCAL: 0.6 s wall
join_min_s = 60
reply_grace_s = 1        # wall
poll_s = 0.02
chunks_per_assignment = 1
wandb = "disabled"
node_restarts = 2        # a crash loop: restarted at once, after 0.05 s, then released
node_restart_backoff_s = 0.05
node_failed_cooldown_s = 600

[train]
depth = 2
vocab_size = 1024
sequence_len = 64
device_batch_size = 2
total_batch_size = 128
num_iterations = 100000
eval_tokens = 0          # no background validation: the loop alone
seed = 3
"""
)


class Loop:
    """One ElasticStrategy and what it emitted, ticked by hand."""

    def __init__(self, tmp: Path, redis_url: str, data: Path, tok: Path, run: str):
        (tmp / "sites.toml").write_text(SITES)
        preset = tmp / "preset.toml"
        runs = tmp / "runs"
        preset.write_text(
            PRESET.format(sites=tmp / "sites.toml", data=data, tok=tok, runs=runs, run=run)
        )
        self.sig = Signals(connect(redis_url), run)
        self.cfg = load_run_config({"preset": str(preset)})
        self.grid = MemGrid(self.sig)
        self.mci = {"alpha": HIGH, "beta": HIGH}
        self.events: list[dict] = []
        self.cursor = 0  # events before it were matched (or passed over) already
        self.strat: ElasticStrategy | None = None
        # the energy simulation's part: a tick every 50 ms wall with the scripted MCI
        self.publisher = Signals(connect(redis_url), run)
        self.halt = threading.Event()
        self.ticker = threading.Thread(target=self._publish_ticks, daemon=True)

    def begin(self, provisioner: NoneProvisioner | None = None) -> ElasticStrategy:
        self.strat = ElasticStrategy(self.grid, self.cfg, self.sig, provisioner)
        self.strat.events.observers.append(self.events.append)
        self.strat.start()
        return self.strat

    def _publish_ticks(self) -> None:
        while not self.halt.wait(0.05):
            t = T0 + (time.time() - self.wall0) * SPEEDUP
            mci = dict(self.mci)
            states = {s: {"mci": v, "curtailed": v < 100.0, "power_w": 0.0} for s, v in mci.items()}
            fc = {s: [(t, v), (t + 600.0, v)] for s, v in mci.items()}
            self.publisher.publish_tick(t, states, fc)

    def until(self, what: str, pred: Callable[[dict], bool], timeout: float = 10.0) -> dict:
        """The first event after the previous match that satisfies ``pred``, ticking the loop
        until it is emitted."""
        assert self.strat is not None
        deadline = time.time() + timeout
        while True:
            for i in range(self.cursor, len(self.events)):
                if pred(self.events[i]):
                    self.cursor = i + 1
                    return self.events[i]
            if time.time() > deadline:
                break
            self.strat.tick()
        kinds = [(e["kind"], e.get("site"), e.get("round")) for e in self.events[-30:]]
        raise AssertionError(f"no {what} within {timeout} s; last events: {kinds}")

    def close(self) -> None:
        self.halt.set()
        self.ticker.join(5)
        if self.strat is not None:
            self.strat.validation.close()
            self.strat.shutdown("test")


def _is(kind: str, **fields) -> Callable[[dict], bool]:
    def pred(ev: dict) -> bool:
        return ev["kind"] == kind and all(
            (v(ev.get(k)) if callable(v) else ev.get(k) == v) for k, v in fields.items()
        )

    return pred


@pytest.fixture()
def loop(tmp_path, redis_url, demo_data, tokenizer_dir, request, monkeypatch):
    # the run-end report (a child process, ~1.5 s) is the slow tests' to check
    monkeypatch.setattr("pilot.flower.setup.write_report", lambda run_dir: None)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    run = f"loop-{request.node.name[:40]}"
    lp = Loop(tmp_path, redis_url, demo_data, tokenizer_dir, run)
    lp.sig.clear()
    lp.wall0 = time.time()
    lp.sig.publish_meta(sim_start=T0, wall_start=lp.wall0, speedup=SPEEDUP, status="running")
    lp.ticker.start()
    threads = torch.get_num_threads()
    yield lp
    lp.close()
    lp.sig.clear()
    torch.set_num_threads(threads)


def _start_alpha(loop: Loop) -> dict:
    loop.grid.connect(FakeSite("alpha"))
    loop.grid.connect(FakeSite("beta"))
    loop.begin()
    loop.until("PAUSE", _is("mode", mode="PAUSE"))
    loop.mci["alpha"] = LOW
    return loop.until("alpha's LOCAL round", _is("round_start", sites=["alpha"]))


def test_a_site_whose_window_opens_joins_the_running_round_and_is_averaged(loop):
    r1 = _start_alpha(loop)
    loop.mci["beta"] = LOW
    join = loop.until("beta's join", _is("join", site="beta"))
    assert join["round"] == r1["round"] and join["deadline_t"] <= r1["deadline_t"]
    agg = loop.until("the aggregate", _is("aggregate", round=r1["round"]))
    assert agg["sites"] == ["alpha", "beta"] and set(agg["weights"]) == {"alpha", "beta"}
    # the global model moved by the work-weighted mean of the two sites' updates
    assert agg["global_step"] > 0 and agg["committed_rows"] > 0


def test_a_site_whose_window_closes_leaves_mid_round_and_its_partial_work_counts(loop):
    r1 = _start_alpha(loop)
    loop.mci["beta"] = LOW
    r2 = loop.until("a federated round", _is("round_start", sites=["alpha", "beta"]))
    loop.mci["alpha"] = HIGH
    leave = loop.until("alpha's leave", _is("leave", site="alpha"))
    assert leave["round"] == r2["round"] > r1["round"]
    part = loop.until("alpha's partial work", _is("train_interval", site="alpha"))
    assert part["stopped_by"] == "stop" and part["end"] < r2["deadline_t"]
    agg = loop.until("the aggregate", _is("aggregate", round=r2["round"]))
    assert "alpha" in agg["sites"] and agg["weights"]["alpha"] > 0


@pytest.mark.parametrize("bad", ["nan", "shape", "tokens"])
def test_a_bad_reply_is_dropped_its_data_released_and_the_rest_averaged(loop, bad):
    _start_alpha(loop)
    loop.mci["beta"] = LOW
    r = loop.until("a federated round", _is("round_start", sites=["alpha", "beta"]))
    beta = next(s for s in loop.grid.nodes.values() if s.name == "beta")
    beta.bad = bad
    fault = loop.until("beta's bad reply", _is("fault", site="beta", round=r["round"]))
    assert "bad reply dropped" in fault["error"] and fault["released_chunks"]
    end = loop.until("the round's end", _is("round_end", round=r["round"]))
    assert end["dropped"] == ["beta"] and list(end["committed"]) != []
    agg = loop.until("the aggregate", _is("aggregate", round=r["round"]))
    assert agg["sites"] == ["alpha"]
    assert all(torch.isfinite(v).all() for v in loop.strat.state.model.weights.values())


def test_a_dead_node_is_dropped_at_once_and_its_new_node_trains_the_next_round(loop):
    r1 = _start_alpha(loop)
    loop.grid.disconnect("alpha")
    fault = loop.until("alpha's drop", _is("fault", site="alpha", round=r1["round"]))
    assert fault["error"] == "node disconnected"
    end = loop.until("the round without alpha", _is("round_end", round=r1["round"]))
    assert end["dropped"] == ["alpha"] and end["committed"] == {}
    loop.grid.connect(FakeSite("alpha"))  # the provisioner's (or the pod's) new node
    r2 = loop.until("alpha's next round", _is("round_start", sites=["alpha"]))
    assert r2["round"] > r1["round"]
    loop.until("its aggregate", _is("aggregate", round=r2["round"]))


def test_a_restarted_server_resumes_from_its_checkpoint(loop):
    r1 = _start_alpha(loop)
    agg = loop.until("the first aggregate", _is("aggregate", round=r1["round"]))
    first = loop.strat
    weights = {k: v.clone() for k, v in first.state.model.weights.items()}
    # the ServerApp dies (no shutdown): a new one on the same run dir picks the run up
    second = loop.begin()
    start = loop.events[-1]
    assert start["kind"] == "run_start" and start["resumed"] is True
    assert second.state.global_step == agg["global_step"] == start["global_step"]
    assert second.state.round_n == start["round"] > r1["round"]
    assert all(torch.equal(weights[k], second.state.model.weights[k]) for k in weights)
    r2 = loop.until("a round after the restart", _is("round_start", sites=["alpha"]))
    assert r2["round"] > r1["round"]
    first.validation.close()


def test_a_site_stopped_by_its_own_drain_is_not_resumed_and_its_work_counts(loop):
    # a pod's preStop hook sets the stop key itself (kubectl scale to 0): the server did not
    # pause the site, so it must not send it a resume its dying node would never answer
    r1 = _start_alpha(loop)
    loop.sig.request_stop("alpha", "drained by its pod", ttl_s=60)
    part = loop.until("alpha's drained work", _is("train_interval", site="alpha"))
    assert part["stopped_by"] == "stop" and part["round"] == r1["round"]
    agg = loop.until("the aggregate", _is("aggregate", round=r1["round"]))
    assert agg["sites"] == ["alpha"] and agg["weights"]["alpha"] > 0
    between = loop.events[loop.events.index(part) : loop.events.index(agg)]
    assert not [e for e in between if e["kind"] == "join"], between


class CrashLoop(NoneProvisioner):
    """Hand-started nodes, except that ``site``'s node dies as soon as it is started."""

    def __init__(self, site: str, sites: list[str]):
        super().__init__(sites)
        self.site, self.starts = site, []

    def start(self, site: str) -> None:
        if site == self.site:
            self.starts.append(time.time())

    def status(self) -> dict[str, str]:
        out = super().status()
        if self.starts:
            out[self.site] = "failed:exit 1"
        return out


def test_a_crash_looping_node_is_restarted_with_backoff_then_released_for_a_cooldown(loop):
    prov = CrashLoop("alpha", ["alpha", "beta"])
    loop.grid.connect(FakeSite("beta"))
    loop.begin(prov)
    loop.mci["alpha"] = LOW
    loop.until("alpha's provisioning", _is("provision_started", site="alpha"))
    faults = [loop.until(f"death {i}", _is("fault", site="alpha")) for i in range(3)]
    assert "restarting it in 0 s" in faults[0]["error"]
    assert "restart budget spent" in faults[2]["error"]
    out = loop.until("alpha released", _is("deprovision", site="alpha"))
    assert out["reason"] == "failed: restart budget spent"
    assert len(prov.starts) == 3  # provisioned, restarted at once, restarted after the backoff
    assert prov.starts[2] - prov.starts[1] >= 0.05
    # cooling down: the policy still wants alpha, but it is not started again
    until = time.time() + 1.0
    while time.time() < until:
        loop.strat.tick()
    assert len(prov.starts) == 3
    assert not [e for e in loop.events[loop.cursor :] if e["kind"] == "provision_started"]
