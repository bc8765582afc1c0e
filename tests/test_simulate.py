"""What-if simulator: exact power model on a hand-made window, replay agreement, policy ranking."""

import json
import time
from pathlib import Path

import numpy as np
import pytest

from pilot.analysis import compare, replay, simulate
from pilot.config.sites import Site, SitesConfig
from pilot.energy.carbon import Ledger
from pilot.energy.synthetic import synthetic
from pilot.energy.traces import Trace, load_trace, save_wide_csv

KW, IDLE, DELAY = 2.024, 0.468, 240.0
REGIONS = {"california": "CAISO_NORTH", "texas": "SPP_TX", "australia": "NEM_SA"}


def paper_sites(threshold: float = 100.0) -> SitesConfig:
    """The published setup: 3 sites, 2.024/0.468 kW, 240 s provisioning, 600 s release; the
    forecast policy's min_window_s as in configs/sites.toml."""
    sites = [Site(n, r, [0, 1, 2, 3], KW, IDLE, DELAY) for n, r in REGIONS.items()]
    return SitesConfig(
        sites, threshold=threshold, release_delay_s=600.0, min_window_s=480.0, horizon_s=3600.0
    )


def one_window_trace() -> Trace:
    """One site, 300 g/kWh except a dip to 50 from 02:05 to 05:00 (5-minute points).

    Linear interpolation crosses 100 at exactly 7440 s going down and 18060 s going up, and
    MCI < 100 on the 60 s tick grid from 7500 s to 18000 s inclusive.
    """
    t = np.arange(0, 8 * 3600 + 1, 300.0)
    v = np.where((t >= 7500) & (t <= 18000), 50.0, 300.0)
    return Trace(t, ["R"], v[None, :])


def one_site(delay: float = DELAY) -> SitesConfig:
    return SitesConfig(
        [Site("a", "R", [0], KW, IDLE, delay)],
        threshold=100.0,
        release_delay_s=600.0,
        min_window_s=900.0,
        horizon_s=3600.0,
    )


def spans(events, kind_on, kind_off, site="a"):
    on = [e["t"] for e in events if e["kind"] == kind_on and e.get("site") == site]
    off = [e["t"] for e in events if e["kind"] == kind_off and e.get("site") == site]
    return list(zip(on, off, strict=True))


def trains(events, site="a"):
    return [
        (e["start"], e["end"])
        for e in events
        if e["kind"] == "train_interval" and e["site"] == site
    ]


def test_prototype_provisions_at_the_window_trains_after_the_delay_and_holds_for_the_release():
    doc, ev = simulate.simulate(one_window_trace(), one_site(), "prototype")
    assert spans(ev, "provision_started", "deprovision") == [(7500.0, 18660.0)]
    assert trains(ev) == [(7740.0, 18660.0)]  # ready 240 s later; released 600 s after 18060
    s = doc["sites"]["a"]
    assert s["train_hours"] == pytest.approx(10920 / 3600)
    assert s["provisioned_hours"] == pytest.approx(11160 / 3600)
    assert s["energy_kwh"] == pytest.approx(KW * 10920 / 3600 + IDLE * 240 / 3600)
    assert doc["total"]["provisioning_energy_wasted_kwh"] == pytest.approx(IDLE * 240 / 3600)
    # in window on the grid until 18060 s (the 18000-18060 cell's midpoint has MCI 75)
    assert s["in_window_train_hours"] == pytest.approx((18060 - 7740) / 3600)
    # MCI is 50 over the flat part; the two ramps are exact on the 60 s grid
    g_s = 50 * (18000 - 7740) + (50 + 300) / 2 * 300 + 300 * (18660 - 18300)
    assert s["emissions_kg"] == pytest.approx(
        KW * g_s / 3600 / 1000 + IDLE * 50 * 240 / 3600 / 1000, rel=1e-9
    )


def test_oracle_trains_exactly_while_curtailed_with_no_provisioning_energy():
    doc, ev = simulate.simulate(one_window_trace(), one_site(), "oracle")
    assert trains(ev) == [(7500.0, 18060.0)]
    assert doc["total"]["provisioning_energy_wasted_kwh"] == 0.0
    assert doc["sites"]["a"]["curtailed_energy_share"] == pytest.approx(1.0)


def test_forecast_policy_is_ready_when_the_window_opens():
    doc, ev = simulate.simulate(one_window_trace(), one_site(), "forecast", forecaster="perfect")
    ((p0, _),) = spans(ev, "provision_started", "deprovision")
    ((t0, t1),) = trains(ev)
    assert (t0, t1) == (7500.0, 18060.0)  # like the oracle: no release hold past the end
    assert p0 == t0 - DELAY  # booted as late as possible
    assert doc["total"]["provisioning_energy_wasted_kwh"] == pytest.approx(IDLE * DELAY / 3600)
    assert (
        doc["total"]["in_window_train_hours"]
        >= simulate.simulate(one_window_trace(), one_site(), "prototype")[0]["total"][
            "in_window_train_hours"
        ]
        + DELAY / 3600
        - 1e-9
    )


def test_a_site_never_trains_before_its_provisioning_delay_has_passed():
    _, ev = simulate.simulate(
        synthetic(list(REGIONS.values()), 48, seed=3), paper_sites(), "prototype"
    )
    for site in REGIONS:
        for p0, p1 in spans(ev, "provision_started", "deprovision", site):
            inside = [(a, b) for a, b in trains(ev, site) if p0 <= a < p1]
            assert all(a >= p0 + DELAY for a, _ in inside)
            assert all(b <= p1 for _, b in inside)


def test_simulated_events_replayed_from_jsonl_give_the_same_numbers(tmp_path):
    trace, sites = synthetic(list(REGIONS.values()), 48, seed=1), paper_sites()
    doc, ev = simulate.simulate(trace, sites, "forecast")
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in ev))
    back = replay.replay([json.loads(x) for x in path.read_text().splitlines()], trace, sites)
    assert back["total"] == pytest.approx(doc["total"], rel=1e-12)


def test_live_ledger_with_measured_energy_and_a_restart_agrees_with_the_replay_within_1pct():
    """The live path: the ServerApp folds events as they come (with a checkpoint/restore in the
    middle) and clients report NVML joules within ±0.8% of the power model; the simulator
    replays the recorded events through the power model alone."""
    trace, sites = synthetic(list(REGIONS.values()), 48, seed=2), paper_sites()
    _, ev = simulate.simulate(trace, sites, "forecast")
    rng = np.random.default_rng(0)
    recorded = []
    for e in ev:  # what a real run records: reported intervals carry measured joules
        e = dict(e)
        if e["kind"] == "train_interval":
            e["energy_j"] = KW * 1000 * (e["end"] - e["start"]) * (1 + rng.uniform(-0.008, 0.008))
        recorded.append(e)
    live = Ledger()
    for i, e in enumerate(recorded):
        live.observe(e)
        if i == len(recorded) // 2:  # the server restarts from its checkpoint
            live = Ledger.from_dict(json.loads(json.dumps(live.to_dict())))
    t0, t1 = recorded[0]["t"], recorded[-1]["t"]
    got = live.summary(trace, sites, start=t0, end=t1)["total"]
    want = replay.replay(recorded, trace, sites)["total"]
    for k in ("energy_kwh", "emissions_kg"):
        assert got[k] == pytest.approx(want[k], rel=0.01)
    assert got["train_hours"] == pytest.approx(want["train_hours"], rel=1e-12)


BUNDLED = Path(__file__).resolve().parents[1] / "configs" / "traces" / "synthetic-3site.csv"
TRACES = {
    # marginal-emission shape (jumps at window edges, short excursions inside windows): the
    # bundled trace (seed 44) and two other seeds of the generator
    "bundled": None,
    **{f"marginal-{k}": (k, False) for k in (2, 10)},
    # the same model with wind gusts (5-15 min dips, flicker around the threshold)
    **{f"gusty-{k}": (k, True) for k in (1, 2, 3)},
}
MARGINAL = [t for t in TRACES if not t.startswith("gusty")]
OURS = [label for label, name, _ in compare.COMPARE_RUNS if name == "forecast"]


@pytest.fixture(scope="module")
def ranking():
    """Every --compare run (oracle, prototype, ours with each forecaster) on each trace."""
    out = {}
    for name, spec in TRACES.items():
        if spec is None:
            trace = load_trace(BUNDLED)
        else:
            trace = synthetic(list(REGIONS.values()), 48, seed=spec[0], gusts=spec[1])
        out[name] = {
            label: simulate.simulate(trace, paper_sites(), policy, forecaster=fc)[0]["total"]
            for label, policy, fc in compare.COMPARE_RUNS
        }
    return out


@pytest.mark.parametrize("trace", MARGINAL)
def test_ours_without_a_forecast_stays_within_8pct_of_the_oracle(ranking, trace):
    ours, oracle = ranking[trace]["ours: persistence"], ranking[trace]["oracle"]
    assert ours["emissions_kg"] <= 1.08 * oracle["emissions_kg"]
    assert ours["curtailed_energy_share"] >= 0.99
    assert ours["train_hours"] >= 0.97 * oracle["train_hours"]


@pytest.mark.parametrize("trace", MARGINAL)
def test_ours_with_a_noisy_forecast_stays_within_5pct_of_the_oracle(ranking, trace):
    ours, oracle = ranking[trace]["ours: noisy"], ranking[trace]["oracle"]
    assert ours["emissions_kg"] <= 1.05 * oracle["emissions_kg"]
    assert ours["train_hours"] >= 0.99 * oracle["train_hours"]


def test_prototype_rule_emits_at_least_25pct_more_than_the_oracle_on_the_bundled_trace(ranking):
    r = ranking["bundled"]
    assert r["prototype"]["emissions_kg"] >= 1.25 * r["oracle"]["emissions_kg"]


@pytest.mark.parametrize("trace", list(TRACES))
@pytest.mark.parametrize("ours", OURS)
def test_ours_emits_less_and_inside_windows_more_than_the_prototype(ranking, trace, ours):
    r = ranking[trace]
    assert r[ours]["emissions_kg"] < r["prototype"]["emissions_kg"]
    assert r[ours]["curtailed_energy_share"] > r["prototype"]["curtailed_energy_share"]


@pytest.mark.parametrize("trace", MARGINAL)
def test_perfect_foresight_trains_every_window_from_its_first_tick(ranking, trace):
    r = ranking[trace]
    assert r["ours: perfect"]["train_hours"] >= 0.99 * r["oracle"]["train_hours"]


@pytest.mark.parametrize("trace", list(TRACES))
def test_oracle_bounds_every_policy(ranking, trace):
    o = ranking[trace]["oracle"]
    assert o["provisioning_energy_wasted_kwh"] == 0.0
    assert o["curtailed_energy_share"] > 0.98
    # the oracle trains on the ticks that are below the threshold; the ledger's in-window time
    # is finer, so a policy training through a window's edge may count up to a tick more
    slack = o["windows_total"] * 60.0 / 3600
    for label in ("prototype", *OURS):
        assert ranking[trace][label]["in_window_train_hours"] <= o["in_window_train_hours"] + slack


def test_two_days_of_three_sites_replay_well_under_a_second():
    trace, sites = synthetic(list(REGIONS.values()), 48, seed=1), paper_sites()
    # CPU time, best of 3: the test machine is shared, wall time would measure the neighbours.
    best = min(_cpu_seconds(lambda: simulate.simulate(trace, sites, "forecast")) for _ in range(3))
    assert best < 1.0


def _cpu_seconds(f) -> float:
    t = time.process_time()
    f()
    return time.process_time() - t


def test_a_higher_threshold_opens_more_window_hours():
    trace = synthetic(list(REGIONS.values()), 48, seed=1)
    lo = simulate.simulate(trace, paper_sites(), "oracle", threshold=100)[0]["total"]
    hi = simulate.simulate(trace, paper_sites(), "oracle", threshold=150)[0]["total"]
    assert hi["train_hours"] > lo["train_hours"]


def _write_inputs(tmp_path):
    trace = synthetic(list(REGIONS.values()), 24, seed=1)
    save_wide_csv(trace, tmp_path / "trace.csv")
    toml = ["[policy]", 'name = "forecast"', "threshold = 100.0", "release_delay_s = 600"]
    for n, r in REGIONS.items():
        toml += [
            "[[sites]]",
            f'name = "{n}"',
            f'region = "{r}"',
            "gpus = 4",
            f"train_kw = {KW}",
            f"idle_kw = {IDLE}",
            f"provision_delay_s = {DELAY:.0f}",
        ]
    (tmp_path / "sites.toml").write_text("\n".join(toml) + "\n")
    return ["--trace", str(tmp_path / "trace.csv"), "--sites", str(tmp_path / "sites.toml")]


def test_cli_writes_the_json_document_the_figure_and_the_events(tmp_path, capsys):
    args = _write_inputs(tmp_path)
    out = tmp_path / "out"
    rc = simulate.main(
        args
        + [
            "--policy",
            "prototype",
            "--hours",
            "20",
            "--json",
            f"{out}.json",
            "--plot",
            f"{out}.png",
            "--events",
            f"{out}.jsonl",
        ]
    )
    assert rc == 0
    doc = json.loads((tmp_path / "out.json").read_text())
    assert {"policy", "sites", "total", "baselines"} <= set(doc)
    assert doc["policy"]["name"] == "prototype" and doc["total"]["wall_hours"] == pytest.approx(20)
    for s in doc["sites"].values():
        assert {
            "energy_kwh",
            "emissions_kg",
            "train_hours",
            "provisioned_hours",
            "curtailed_energy_share",
        } <= set(s)
    assert {
        "energy_kwh",
        "emissions_kg",
        "train_hours",
        "in_window_train_hours",
        "wall_hours",
        "curtailed_energy_share",
    } <= set(doc["total"])
    assert set(doc["baselines"]) == {f"single_site:{r}" for r in REGIONS.values()} | {
        "continuous_federated"
    }
    for b in doc["baselines"].values():
        assert {"energy_kwh", "emissions_kg", "wall_hours"} <= set(b)
    assert (tmp_path / "out.png").stat().st_size > 30_000
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) > 10


def test_cli_compare_prints_one_row_per_policy(tmp_path, capsys):
    assert simulate.main(_write_inputs(tmp_path) + ["--compare"]) == 0
    out = capsys.readouterr().out
    for name in (
        *("oracle", "prototype", "persistence", "noisy", "perfect"),
        "continuous",
        "windows",
        "wasted",
        "1.000x",  # the oracle's ratio to itself
    ):
        assert name in out


def test_cli_rejects_a_span_past_the_trace_end(tmp_path, capsys):
    assert simulate.main(_write_inputs(tmp_path) + ["--hours", "30"]) == 2
    assert "too short" in capsys.readouterr().err


def test_cli_recorded_forecaster_needs_a_readable_forecasts_file(tmp_path, capsys):
    args = _write_inputs(tmp_path) + ["--policy", "forecast", "--forecaster", "recorded"]
    assert simulate.main(args) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        'error: forecaster "recorded" needs a live run\'s forecasts.csv: pass --forecasts FILE'
        " or set [policy] forecasts in the sites file"
    ]
    assert simulate.main(args + ["--forecasts", str(tmp_path / "nope.csv")]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "nope.csv: cannot read it" in line
