"""Run reports from an events stream: files written, numbers consistent with the ledger, figure non-trivial."""

import json

import numpy as np
import pytest
from test_carbon import LinearTrace, Site, Sites

from pilot.analysis import figure, report
from pilot.energy.accounting import Interval
from pilot.energy.carbon import Ledger
from pilot.events import reader

T0 = 1_767_225_600.0  # 2026-01-01 00:00 UTC


SITES = Sites([Site("ca", "CAISO_NORTH", 2.024, 0.468), Site("tx", "SPP_TX", 2.024, 0.468)], 100.0)


def _trace():
    ts = T0 + np.arange(0, 6 * 3600 + 1, 300.0)
    x = (ts - T0) / 3600
    return LinearTrace(
        ts,
        CAISO_NORTH=150 - 100 * np.sin(np.pi * x / 6),
        SPP_TX=120 - 60 * np.sin(np.pi * (x - 1) / 4),
    )


def _events():
    h = 3600.0
    ev = [{"kind": "run_start", "t": T0, "run": "demo", "policy": "forecast", "threshold": 100.0}]
    for site, p0, p1 in (("ca", 0.8 * h, 5.0 * h), ("tx", 1.5 * h, 4.0 * h)):
        ev += [
            {"kind": "provision_decided", "t": T0 + p0, "site": site, "reason": "forecast"},
            {"kind": "provision_started", "t": T0 + p0, "site": site},
            {"kind": "provision_complete", "t": T0 + p0 + 240, "site": site},
        ]
        for r, (a, b) in enumerate([(p0 + 240, (p0 + p1) / 2), ((p0 + p1) / 2, p1 - 600)]):
            ev.append(
                {
                    "kind": "train_interval",
                    "t": T0 + b,
                    "site": site,
                    "round": r,
                    "start": T0 + a,
                    "end": T0 + b,
                    "tokens": 1000,
                    "loss": 5.0 - r - (site == "tx") * 0.2,
                    "energy_j": None,
                }
            )
        ev.append({"kind": "deprovision", "t": T0 + p1, "site": site, "reason": "window closed"})
    ev += [
        {
            "kind": "aggregate",
            "t": T0 + (2 + r) * h,
            "round": r,
            "loss": 5.0 - 0.5 * r,
            "tokens": 2000,
        }
        for r in range(3)
    ]
    ev += [
        {"kind": "mode", "t": T0, "mode": "PAUSE"},
        {"kind": "mode", "t": T0 + 1.1 * h, "mode": "LOCAL"},
        {"kind": "mode", "t": T0 + 1.6 * h, "mode": "FEDERATED"},
        {"kind": "mode", "t": T0 + 3.9 * h, "mode": "LOCAL"},
        {"kind": "mode", "t": T0 + 4.9 * h, "mode": "PAUSE"},
        {"kind": "fault", "t": T0 + 2.5 * h, "site": "tx", "error": "reply dropped: NaN"},
        {"kind": "run_end", "t": T0 + 6 * h, "reason": "done"},
    ]
    return sorted(ev, key=lambda e: e["t"])


def _write(run_dir, events):
    (run_dir / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))


def test_report_writes_all_files_and_a_nontrivial_timeline(tmp_path):
    _write(tmp_path, _events())
    rep = report.build(tmp_path, trace=_trace(), sites_config=SITES)
    for name in ("report.md", "report.json", "events.csv", "timeline.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    import matplotlib.image as mpimg

    png = tmp_path / "timeline.png"
    assert png.stat().st_size > 30_000
    img = mpimg.imread(png)
    colours = np.unique((img[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert img.shape[0] > 500 and img.shape[1] > 1000 and len(colours) > 50
    assert rep["ledger_source"] == "events (replayed)"
    assert rep["rounds_aggregated"] == 3 and len(rep["faults"]) == 1
    assert rep["loss"] == {"first": 5.0, "last": 4.0}
    assert rep["mode_hours"]["FEDERATED"] == pytest.approx(2.3)
    md = (tmp_path / "report.md").read_text()
    assert "| TOTAL |" in md and "continuous_federated" in md and "timeline.png" in md
    assert json.loads((tmp_path / "report.json").read_text())["total"] == rep["total"]


def test_report_numbers_equal_the_ledger_summary_of_the_same_events(tmp_path):
    events = _events()
    _write(tmp_path, events)
    rep = report.build(tmp_path, trace=_trace(), sites_config=SITES)
    want = Ledger.from_events(events).summary(_trace(), SITES, start=T0, end=T0 + 6 * 3600)
    assert rep["total"] == pytest.approx(want["total"])
    # ca: provisioned 0.8 h .. 5.0 h, trains 240 s after provisioning until 600 s before release
    assert rep["sites"]["ca"]["train_hours"] == pytest.approx(4.2 - 240 / 3600 - 600 / 3600)
    assert rep["sites"]["ca"]["provisioned_hours"] == pytest.approx(4.2)


def test_live_ledger_file_is_preferred_and_checked_against_the_replay(tmp_path):
    events = _events()
    _write(tmp_path, events)
    live = Ledger.from_events(events)
    live.add_train("ca", T0 + 5.0 * 3600, T0 + 5.01 * 3600)  # the live ledger saw a little more
    (tmp_path / "ledger.json").write_text(json.dumps(live.to_dict()))
    rep = report.build(tmp_path, trace=_trace(), sites_config=SITES)
    assert rep["ledger_source"] == "ledger.json"
    assert 0 < rep["replay_check"]["rel_diff"] < 0.01


def test_events_csv_has_one_row_per_event_with_the_union_of_fields(tmp_path):
    import csv

    events = _events()
    reader.write_events_csv(events, tmp_path / "e.csv")
    rows = list(csv.DictReader(open(tmp_path / "e.csv")))
    assert len(rows) == len(events)
    assert list(rows[0])[:2] == ["t", "kind"] and {"site", "loss", "round", "mode"} <= set(rows[0])


def test_torn_last_line_is_skipped_but_a_bad_middle_line_is_an_error(tmp_path):
    p = tmp_path / "events.jsonl"
    p.write_text('{"kind": "mode", "t": 1, "mode": "PAUSE"}\n{"kind": "mo')
    assert len(reader.load_events(p)) == 1
    p.write_text('{"kind": "mo\n{"kind": "mode", "t": 1}\n')
    with pytest.raises(ValueError, match=":1:"):
        reader.load_events(p)


def test_mode_band_derives_from_training_intervals_when_no_mode_events():
    ivs = [
        Interval("a", 10, 50, "train"),
        Interval("b", 30, 40, "train"),
        Interval("b", 40, 60, "idle"),
    ]
    assert figure.mode_spans([], ivs, 0, 100) == [
        (0, 10, "PAUSE"),
        (10, 30, "LOCAL"),
        (30, 40, "FEDERATED"),
        (40, 50, "LOCAL"),
        (50, 100, "PAUSE"),
    ]


def test_missing_run_dir_is_a_clear_error(tmp_path):
    assert report.main([str(tmp_path / "nope")]) == 2


def test_a_run_going_on_past_the_trace_end_is_accounted_up_to_it(tmp_path):
    events = _events() + [
        {"kind": "provision_started", "t": T0 + 5.5 * 3600, "site": "tx"},
        {"kind": "run_end", "t": T0 + 7 * 3600, "reason": "done"},
    ]
    _write(
        tmp_path, [e for e in events if not (e["kind"] == "run_end" and e["t"] == T0 + 6 * 3600)]
    )
    rep = report.build(tmp_path, trace=_trace(), sites_config=SITES)
    assert rep["outside_trace_hours"] == pytest.approx(1.0)
    assert rep["end"] == T0 + 6 * 3600
    assert rep["sites"]["tx"]["provisioned_hours"] == pytest.approx(2.5 + 0.5)
    assert "outside the trace" in (tmp_path / "report.md").read_text()


def test_loss_curve_bins_steps_in_order_and_is_spread_over_its_interval():
    steps = [10.0 - 0.01 * i for i in range(1000)]
    curve = reader.loss_curve(steps, 64)
    assert len(curve) == 64 and curve == sorted(curve, reverse=True)
    assert sum(curve) / 64 == pytest.approx(sum(steps) / 1000, rel=1e-3)  # bins ~equal in size
    assert reader.loss_curve([3.0, 2.0], 64) == [3.0, 2.0]  # short: every step kept
    ev = {"kind": "train_interval", "t": T0 + 400, "site": "ca", "start": T0, "end": T0 + 400}
    pts = figure.losses([{**ev, "loss": 2.5, "curve": [4.0, 3.0, 2.0, 1.0]}])["ca"]
    assert pts == [(T0 + 50, 4.0), (T0 + 150, 3.0), (T0 + 250, 2.0), (T0 + 350, 1.0)]
    assert figure.losses([{**ev, "loss": 2.5}])["ca"] == [(T0 + 400, 2.5)]  # older events
