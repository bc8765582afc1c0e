"""Carbon ledger on hand-computable traces: every expected number below is worked out by hand."""

import json

import numpy as np
import pytest

from pilot.config import sites
from pilot.energy import accounting
from pilot.energy.accounting import Interval
from pilot.energy.carbon import Ledger
from pilot.energy.traces import Trace


def LinearTrace(times, **regions) -> Trace:
    """A real trace from hand-picked points (linear in between): numbers stay hand-computable."""
    return Trace(times, list(regions), [regions[r] for r in regions])


def Site(name, region, train_kw, idle_kw) -> sites.Site:
    return sites.Site(
        name, region, gpus=[], train_kw=train_kw, idle_kw=idle_kw, provision_delay_s=0
    )


def Sites(site_list, threshold) -> sites.SitesConfig:
    return sites.SitesConfig(site_list, threshold=threshold)


A = Site("a", "A", train_kw=2.0, idle_kw=0.5)


def test_constant_mci_energy_and_emissions_are_power_times_time():
    tr = LinearTrace([0, 7200], A=[200, 200])
    ivs = [Interval("a", 0, 3600, "train"), Interval("a", 3600, 5400, "idle")]
    assert accounting.energy_kwh(ivs, A) == pytest.approx(2.0 + 0.25)
    assert accounting.emissions_kg(ivs, tr, "A", A) == pytest.approx(2.25 * 200 / 1000)


def test_linear_ramp_is_integrated_exactly_by_the_midpoint_grid():
    # MCI = t/10 g/kWh; 1 kW over [0, 3600] -> mean MCI 180 -> 0.18 kg.
    tr = LinearTrace([0, 3600], A=[0, 360])
    s = Site("a", "A", 1.0, 0.0)
    assert accounting.emissions_kg([Interval("a", 0, 3600, "train")], tr, "A", s) == pytest.approx(
        0.18, rel=1e-12
    )


def test_interpolation_between_trace_points():
    # points 10 minutes apart, MCI = t g/kWh; [100, 160) at 1 kW -> mean 130 g/kWh over 1/60 h.
    tr = LinearTrace([0, 600], A=[0, 600])
    s = Site("a", "A", 1.0, 0.0)
    got = accounting.emissions_kg([Interval("a", 100, 160, "train")], tr, "A", s)
    assert got == pytest.approx(130 / 60 / 1000, rel=1e-12)


def test_partial_grid_cells_at_both_interval_edges_count_only_their_length():
    tr = LinearTrace([0, 600], A=[100, 100])
    s = Site("a", "A", 1.0, 0.0)
    iv = [Interval("a", 30, 90, "train")]  # half of two 60 s cells
    assert accounting.energy_kwh(iv, s) == pytest.approx(60 / 3600)
    assert accounting.emissions_kg(iv, tr, "A", s) == pytest.approx(100 * 60 / 3600 / 1000)
    idx, lo, hi = accounting.cells(np.array([30.0]), np.array([90.0]), 60)
    assert lo.tolist() == [30, 60] and hi.tolist() == [60, 90]


def test_step_change_on_the_grid_is_exact_and_splits_the_curtailed_share():
    # 100 until 1 h, up to 500 within one minute, 500 until 2 h.
    tr = LinearTrace([0, 3600, 3660, 7200], A=[100, 100, 500, 500])
    s = Site("a", "A", 1.0, 0.0)
    ivs = [Interval("a", 0, 7200, "train")]
    g_s = 100 * 3600 + 300 * 60 + 500 * 3540  # g·s per kW·h/3600
    assert accounting.emissions_kg(ivs, tr, "A", s) == pytest.approx(g_s / 3600 / 1000, rel=1e-12)
    assert accounting.curtailed_energy_share(ivs, tr, "A", s, threshold=200) == pytest.approx(0.5)


def test_grid_resolution_kink_off_grid_uses_midpoint_rule_and_fine_grid_converges():
    # Triangle peaking at 90 s: exact integral 8100; the 60 s midpoint grid samples 30, 90, 30.
    tr = LinearTrace([0, 90, 180], A=[0, 90, 0])
    s = Site("a", "A", 3.6, 0.0)  # 3.6 kW makes kg = integral[g·s] / 1e6
    ivs = [Interval("a", 0, 180, "train")]
    assert accounting.emissions_kg(ivs, tr, "A", s, grid_s=60) == pytest.approx(9000 / 1e6)
    assert accounting.emissions_kg(ivs, tr, "A", s, grid_s=1) == pytest.approx(8100 / 1e6)
    with pytest.raises(ValueError, match="grid_s"):
        accounting.emissions_kg(ivs, tr, "A", s, grid_s=300)


def test_overlapping_train_and_idle_count_once_with_train_winning():
    ivs = [
        Interval("a", 0, 3600, "idle"),
        Interval("a", 600, 1800, "train"),
        Interval("a", 600, 1800, "train"),
    ]
    norm = accounting.normalize(ivs)
    assert [(iv.start, iv.end, iv.state) for iv in norm] == [
        (0, 600, "idle"),
        (600, 1800, "train"),
        (1800, 3600, "idle"),
    ]
    assert accounting.energy_kwh(ivs, A) == pytest.approx(2.0 * 1200 / 3600 + 0.5 * 2400 / 3600)


def test_measured_energy_overrides_the_power_model_on_its_span():
    s = Site("a", "A", 2.0, 0.5)
    tr = LinearTrace([0, 3600], A=[100, 100])
    led = Ledger()
    led.add_train("a", 0, 3600)
    led.add_measured("a", 0, 1800, joules=0.9e6)  # 0.25 kWh instead of the model's 1 kWh
    r = led.summary(tr, Sites([s], 150.0))
    assert r["sites"]["a"]["energy_kwh"] == pytest.approx(0.25 + 1.0)
    assert r["sites"]["a"]["emissions_kg"] == pytest.approx(1.25 * 100 / 1000)
    with pytest.raises(ValueError, match="overlaps"):
        led.add_measured("a", 900, 2000, joules=1.0)


def test_baselines_same_compute_back_to_back_per_region_and_continuous_federated():
    tr = LinearTrace([0, 86400], A=[100, 100], B=[300, 300])
    a, b = Site("a", "A", 2.0, 0.5), Site("b", "B", 1.0, 0.2)
    led = Ledger()
    led.add_train("a", 0, 3600)
    led.add_train("b", 0, 1800)
    r = led.summary(tr, Sites([a, b], 200.0))
    assert r["total"]["train_hours"] == pytest.approx(1.5)
    assert r["total"]["wall_hours"] == pytest.approx(1.0)
    base = r["baselines"]
    assert base["single_site:A"] == pytest.approx(
        {"energy_kwh": 3.0, "emissions_kg": 0.3, "wall_hours": 1.5}
    )
    assert base["single_site:B"] == pytest.approx(
        {"energy_kwh": 1.5, "emissions_kg": 0.45, "wall_hours": 1.5}
    )
    assert base["continuous_federated"] == pytest.approx(
        {"energy_kwh": 3.0, "emissions_kg": 0.5, "wall_hours": 1.0}
    )


def test_single_site_baseline_past_the_trace_end_wraps_by_whole_days():
    tr = LinearTrace([0, 43200, 43260, 86400], A=[100, 100, 300, 300])
    s = Site("a", "A", 1.0, 0.0)
    b = accounting.baselines(tr, [s], 0, 3600, train_hours=30)["single_site:A"]
    g_s = 100 * 43200 + 200 * 60 + 300 * 43140 + 100 * 6 * 3600  # hours 24-30 replay hours 0-6
    assert b["emissions_kg"] == pytest.approx(g_s / 3600 / 1000, rel=1e-12)
    assert b["trace_wrapped_hours"] == pytest.approx(6.0)


def test_summary_reports_in_window_training_and_idle_energy():
    tr = LinearTrace([0, 3600, 3660, 7200], A=[50, 50, 500, 500])
    led = Ledger()
    led.add_provisioned("a", 0, 7200)
    led.add_train("a", 1800, 5400)
    r = led.summary(tr, Sites([A], 100.0))
    site = r["sites"]["a"]
    assert site["train_hours"] == pytest.approx(1.0)
    assert site["provisioned_hours"] == pytest.approx(2.0)
    assert site["in_window_train_hours"] == pytest.approx(0.5)
    assert site["idle_energy_kwh"] == pytest.approx(0.5 * 1.0)
    assert set(r["total"]) >= {
        "energy_kwh",
        "emissions_kg",
        "train_hours",
        "in_window_train_hours",
        "wall_hours",
        "curtailed_energy_share",
    }
    # in window: idle 1800 s at 0.5 kW + train 1800 s at 2 kW, of 0.5 + 2 kWh
    assert site["curtailed_energy_share"] == pytest.approx((0.25 + 1.0) / 2.5)


def test_rereported_and_extended_spans_never_double_count():
    led = Ledger()
    led.add_train("a", 0, 600)
    led.add_train("a", 0, 600)
    led.add_train("a", 0, 1200)  # a checkpoint mid-interval, then the whole interval
    assert accounting.energy_kwh(led.intervals(), A) == pytest.approx(2.0 * 1200 / 3600)


def test_events_fold_into_the_ledger_and_open_provisioning_closes_at_the_end():
    events = [
        {"kind": "provision_decided", "t": 0, "site": "a"},
        {"kind": "provision_started", "t": 10, "site": "a"},
        {"kind": "provision_complete", "t": 250, "site": "a"},
        {
            "kind": "train_interval",
            "t": 1000,
            "site": "a",
            "start": 250,
            "end": 1000,
            "energy_j": None,
        },
        {"kind": "deprovision", "t": 1600, "site": "a"},
        {"kind": "provision_started", "t": 2000, "site": "a"},
        {"kind": "round_end", "t": 2600, "round": 3},
    ]
    led = Ledger.from_events(events)
    got = [(iv.start, iv.end, iv.state) for iv in led.intervals()]
    assert got == [
        (10, 250, "idle"),
        (250, 1000, "train"),
        (1000, 1600, "idle"),
        (2000, 2600, "idle"),
    ]
    assert led.span() == (0, 2600)


def test_ledger_roundtrips_through_json_for_the_checkpoint():
    led = Ledger()
    led.add_provisioned("a", 0, 100)
    led.add_train("a", 10, 90)
    led.add_measured("a", 10, 50, 1234.0)
    led.provision("b", 500)
    back = Ledger.from_dict(json.loads(json.dumps(led.to_dict())))
    assert back.to_dict() == led.to_dict()
    assert back.intervals(600) == led.intervals(600)


def test_summary_rejects_sites_missing_from_the_config():
    led = Ledger()
    led.add_train("zz", 0, 10)
    with pytest.raises(ValueError, match="zz"):
        led.summary(LinearTrace([0, 100], A=[1, 1]), Sites([A], 100.0))


def test_summary_accounts_only_its_span_and_cuts_measured_joules_in_proportion():
    tr = LinearTrace([0, 7200], A=[100, 100])
    led = Ledger()
    led.add_train("a", 0, 3600)
    led.add_measured("a", 1800, 5400, joules=3.6e6)  # 1 kWh over 1 h, half of it inside
    r = led.summary(tr, Sites([A], 150.0), start=0, end=3600)
    assert r["sites"]["a"]["train_hours"] == pytest.approx(1.0)
    assert r["sites"]["a"]["energy_kwh"] == pytest.approx(2.0 * 0.5 + 0.5)
    assert r["total"]["wall_hours"] == pytest.approx(1.0)
