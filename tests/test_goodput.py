"""Goodput accounting over in-memory events and replies (pure): ready time, training time net
of warm-up, and each reply's fixed cost split into its parts."""

import pytest

from pilot.analysis.goodput import summary
from pilot.flower.messages import TrainReport
from pilot.flower.replies import fixed_costs, interval_events


def _report(**kw) -> TrainReport:
    base = dict(site="a", tokens=256, steps=2, loss=5.0, energy_j=None, cropped_tokens=0,
                consumed={}, intervals=[(110.0, 150.0)], stopped_by="deadline", start_step=0,
                end_step=2, received_at=103.0, save_wait_s=1.0, warmup_s=2.0)  # fmt: skip
    return TrainReport(**{**base, **kw})


def test_a_replys_fixed_cost_is_split_into_start_weights_in_warmup_save_and_weights_out():
    costs = fixed_costs(_report(), sent_wall=100.0, received_wall=152.5)
    assert costs == {
        "start": 3.0,  # sent -> order in the trainer
        "weights_in": 6.0,  # 103 -> first step at 110, less 1 s waiting for the save
        "warmup": 2.0,
        "save": 1.0,
        "weights_out": 2.5,  # last step 150 -> reply 152.5
    }
    assert fixed_costs(_report(intervals=[], steps=0), 100.0, 152.5) is None


def test_costs_ride_on_the_first_span_of_a_reply_only():
    rep = _report(intervals=[(110.0, 120.0), (130.0, 150.0)])
    events = interval_events("a", 1, rep, float, fixed_costs(rep, 100.0, 151.0))
    assert "costs" in events[0] and "costs" not in events[1]


def _events(warmup: float) -> list[dict]:
    costs = {"start": 1.0, "weights_in": 0.5, "warmup": warmup, "save": 0.0, "weights_out": 0.5}
    return [
        {"kind": "run_start", "t": 0.0, "wall": 0.0},
        {"kind": "provision_complete", "t": 1000.0, "wall": 10.0, "site": "a"},
        {
            "kind": "train_interval",
            "t": 1900.0,
            "wall": 19.0,
            "site": "a",
            "start": 1000.0,
            "end": 1900.0,
            "costs": costs,
        },  # fmt: skip
        {
            "kind": "train_interval",
            "t": 2000.0,
            "wall": 20.0,
            "site": "a",
            "start": 1900.0,
            "end": 2000.0,
        },  # fmt: skip
        {"kind": "deprovision", "t": 2000.0, "wall": 20.0, "site": "a"},
        {"kind": "provision_complete", "t": 3000.0, "wall": 30.0, "site": "a"},
        {"kind": "run_end", "t": 4000.0, "wall": 40.0},
    ]


def test_goodput_is_training_net_of_warmup_over_ready_time_per_site():
    g = summary(_events(warmup=0.0))["goodput"]
    a = g["sites"]["a"]
    # ready 1000..2000 and 3000..4000 (open until the run's end), trained 1000 s of it
    assert a["ready_hours"] == pytest.approx(2000 / 3600)
    assert a["goodput"] == pytest.approx(0.5)
    assert g["total"]["goodput"] == pytest.approx(0.5) and a["replies"] == 1
    # 2 wall s of warm-up at 100x (from the events' t/wall) are 200 sim s of cost, not training
    warm = summary(_events(warmup=2.0))["goodput"]["sites"]["a"]
    assert warm["goodput"] == pytest.approx(0.4)
    assert warm["mean_cost_s"]["warmup"] == 2.0 and warm["mean_cost_s"]["start"] == 1.0


def test_a_reply_with_an_implausible_cost_field_is_refused():
    from types import SimpleNamespace

    from flwr.app import ArrayRecord

    from pilot.flower.messages import MessageError

    good = _report().to_record(ArrayRecord())
    assert TrainReport.from_message(SimpleNamespace(content=good)) == _report()
    bad = _report(save_wait_s=-1.0).to_record(ArrayRecord())
    with pytest.raises(MessageError, match="save_wait_s"):
        TrainReport.from_message(SimpleNamespace(content=bad))
