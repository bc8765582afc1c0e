"""Model quality and data efficiency of a run, from its events (for pilot.analysis.report).

Two different numbers, named for what they are: the round-mean train loss (``aggregate``
events: the work-weighted mean of the sites' per-step training losses over a round, nats per
token) and the global model's validation bits per byte after each aggregation
(``validation`` events: nanochat.train.val_bpb on the held-out shard, the torchrun
baseline's measurement). Cropped tokens (``round_end``) are what the loader's BOS-aligned
packing read but cut off.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def summary(events: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """{"val_bpb": {"per_round": [...], "final", "eval_tokens"} | None,
    "data": {"trained_tokens", "cropped_tokens", "cropped_share"}}."""
    vals = [e for e in events if e["kind"] == "validation" and e.get("bpb") is not None]
    per_round = [
        {k: e.get(k) for k in ("round", "global_step", "tokens", "bpb", "seconds")} for e in vals
    ]
    val = (
        {
            "per_round": per_round,
            "final": per_round[-1]["bpb"],
            "eval_tokens": vals[-1].get("eval_tokens"),
        }
        if vals
        else None
    )
    ends = [e for e in events if e["kind"] == "round_end"]
    trained = sum(int(e.get("tokens") or 0) for e in ends)
    cropped = sum(int(e.get("cropped_tokens") or 0) for e in ends)
    share = cropped / (trained + cropped) if trained + cropped else 0.0
    return {
        "val_bpb": val,
        "data": {"trained_tokens": trained, "cropped_tokens": cropped, "cropped_share": share},
    }


def caption(q: dict[str, Any]) -> str:
    """One line under the run's closing table: the final model quality."""
    val = q.get("val_bpb")
    if not val:
        return "global model val bpb: not measured"
    last = val["per_round"][-1]
    return (
        f"global model val bpb {val['final']:.4f} (round {last['round']}, "
        f"step {last['global_step']}, {val['eval_tokens']:,} held-out tokens)"
    )


def markdown(q: dict[str, Any]) -> list[str]:
    """The report's model-quality section: per-round val bpb and the data efficiency."""
    d = q["data"]
    lines = [
        f"- cropped by the loader's packing: {d['cropped_tokens']:,} tokens read, not trained "
        f"on ({d['cropped_share']:.1%} of {d['trained_tokens'] + d['cropped_tokens']:,} read)",
        f"- {caption(q)}",
    ]
    val = q.get("val_bpb")
    if not val:
        return lines
    lines += ["", "| round | global step | tokens | val bpb |", "|---|---|---|---|"]
    lines += [
        f"| {r['round']} | {r['global_step']} | {r['tokens']:,} | {r['bpb']:.4f} |"
        for r in val["per_round"]
    ]
    return lines
