"""A site's TRAIN reply turned into what the server uses: its energy as ``train_interval``
events (spent whether or not the weights are usable, so accounted first) and a validated
``Reply`` to average. Anything unusable raises; the control loop drops the site's work."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from pilot.control.data_ledger import DataLedger
from pilot.control.rounds import Reply
from pilot.control.updates import decode_update
from pilot.control.wire import record_to_raw
from pilot.events.reader import loss_curve
from pilot.flower.messages import TrainReport

LOSS_CURVE_POINTS = 64  # per-step losses of a reply, binned to this many for the events/figure


def fixed_costs(
    report: TrainReport, sent_wall: float, received_wall: float
) -> dict[str, float] | None:
    """The reply's fixed cost in wall seconds, split as the ``train_interval`` event documents
    it (None: no step ran, so it is all cost and the report counts it as such)."""
    if not report.intervals:
        return None
    first, last = report.intervals[0][0], report.intervals[-1][1]
    got = report.received_at if report.received_at is not None else first
    return {
        "start": max(0.0, got - sent_wall),
        "weights_in": max(0.0, first - got - report.save_wait_s),
        "warmup": report.warmup_s,
        "save": report.save_wait_s,
        "weights_out": max(0.0, received_wall - last),
    }


def interval_events(
    site: str,
    round_n: int,
    report: TrainReport,
    sim_time: Callable[[float], float],
    costs: dict[str, float] | None = None,
) -> list[dict[str, Any]]:
    """One ``train_interval`` event's fields per span of the reply (a site that paused and
    resumed has several), the loss curve and a measured energy shared out by duration, so the
    total is counted once; ``costs`` (``fixed_costs``) go on the first span. ``sim_time`` maps
    a wall time to the run's simulated time."""
    spans = report.intervals
    total_s = sum(e - s for s, e in spans)
    curve = loss_curve(report.losses, LOSS_CURVE_POINTS)
    out, done = [], 0.0  # done: the share of the reply's training time before this span
    for start, end in spans:
        share = (end - start) / total_s if total_s > 0 else 1.0 / len(spans)
        lo, hi = round(done * len(curve)), round((done + share) * len(curve))
        done += share
        out.append(
            {
                "site": site,
                "round": round_n,
                "start": sim_time(start),
                "end": sim_time(end),
                "tokens": report.tokens,
                "steps": report.steps,
                "loss": report.loss if report.steps else None,
                "curve": curve[lo:hi],
                "energy_j": report.energy_j * share if report.energy_j is not None else None,
                "stopped_by": report.stopped_by,
                "cropped_tokens": report.cropped_tokens,
            }
        )
    if out and costs is not None:
        out[0]["costs"] = costs
    return out


def to_reply(
    site: str, report: TrainReport, msg: Any, base: dict, update_dtype: str, ledger: DataLedger
) -> tuple[Reply, int]:
    """The reply's weights decoded and checked against the global model's, its rows against
    the site's lease (its metrics were checked by ``TrainReport.check``); returns the Reply
    and the rows it read that are new to the ledger. Raises ``MessageError``/``ReplyError``/
    ``LedgerError`` (all ValueErrors) on anything unusable."""
    state = decode_update(record_to_raw(msg.content["model"]), base, update_dtype)
    new_rows = ledger.check(site, report.consumed)
    reply = Reply(
        site,
        state,
        report.tokens,
        report.steps,
        report.loss if report.loss is not None else math.nan,
        report.consumed,
        report.stopped_by,
        report.cropped_tokens,
    )
    return reply, new_rows
