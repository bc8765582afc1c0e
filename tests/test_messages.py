"""A TRAIN report is checked whole before its weights are averaged: work that does not add
up, steps the order did not allow, or a loss that is not a number are refused."""

import math

import pytest

from pilot.flower.messages import MessageError, TrainReport

TOKENS_PER_STEP = 128


def _report(**change) -> TrainReport:
    fields = dict(
        site="texas", tokens=3 * TOKENS_PER_STEP, steps=3, loss=5.5, energy_j=None,
        cropped_tokens=0, consumed={"0:0": 16}, intervals=[(0.0, 1.0)], stopped_by="deadline",
        start_step=10, end_step=13,
    )  # fmt: skip
    return TrainReport(**{**fields, **change})


def test_a_report_whose_work_adds_up_passes():
    _report().check("texas", order_step=10, tokens_per_step=TOKENS_PER_STEP, max_steps=5)
    no_step = _report(tokens=0, steps=0, loss=None, end_step=10)
    no_step.check("texas", order_step=10, tokens_per_step=TOKENS_PER_STEP, max_steps=5)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"site": "ohio"}, "claims site 'ohio'"),
        ({"tokens": 30 * TOKENS_PER_STEP}, "implausible metrics"),  # 10x the averaging weight
        ({"tokens": 3 * TOKENS_PER_STEP + 1}, "implausible metrics"),
        ({"steps": -1, "tokens": -TOKENS_PER_STEP}, "implausible metrics"),
        ({"steps": 6, "tokens": 6 * TOKENS_PER_STEP, "end_step": 16}, "the order allowed 5"),
        ({"start_step": 0, "end_step": 3}, "do not follow the order's step 10"),
        ({"end_step": 20}, "do not follow"),
        ({"loss": math.nan}, "implausible loss nan"),
        ({"loss": None}, "implausible loss None"),
        ({"energy_j": -1.0}, "implausible energy"),
    ],
)
def test_a_report_that_does_not_add_up_is_refused_with_the_reason(change, message):
    with pytest.raises(MessageError, match=message):
        _report(**change).check(
            "texas", order_step=10, tokens_per_step=TOKENS_PER_STEP, max_steps=5
        )
