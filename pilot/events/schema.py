"""The run's event kinds, one entry each: the fields it carries and what it means.

Every event has ``kind``, ``t`` (simulated epoch seconds UTC, the trace's time axis) and, when
the live ServerApp emits it, ``wall`` (time.time()). ``make_event`` checks an event against
its kind before it is written anywhere, so the live log, the what-if simulator's events and
the documentation (docs/EVENTS.md, generated: ``python -m pilot.events.schema``) cannot drift.

A field spec is ``name:type``; a leading ``?`` makes the field optional, a trailing ``?`` lets
it be null. Types: str, int, num (int or float), bool, list, dict, any.
"""

from __future__ import annotations

import math
import numbers
import sys
from dataclasses import dataclass
from typing import Any

COMMON = ("kind", "t", "wall")


@dataclass(frozen=True)
class Field:
    name: str
    type: str
    required: bool
    nullable: bool

    @classmethod
    def parse(cls, spec: str) -> Field:
        name, _, typ = spec.partition(":")
        return cls(name.lstrip("?"), typ.rstrip("?"), not name.startswith("?"), typ.endswith("?"))

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.nullable or self.type == "any"
        return _CHECKS[self.type](value)


_CHECKS = {
    "str": lambda v: isinstance(v, str),
    "int": lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool),
    "num": lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "list": lambda v: isinstance(v, list | tuple),
    "dict": lambda v: isinstance(v, dict),
    "any": lambda v: True,
}


@dataclass(frozen=True)
class Kind:
    name: str
    fields: tuple[Field, ...]
    doc: str

    def field(self, name: str) -> Field | None:
        return next((f for f in self.fields if f.name == name), None)


def _kind(name: str, specs: str, doc: str) -> Kind:
    return Kind(name, tuple(Field.parse(s) for s in specs.split()), doc)


KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        _kind(
            "run_start",
            "policy:str threshold:num ?run:str ?preset:str ?trace:any ?sites:str ?sim_start:num?"
            " ?speedup:num ?resumed:bool ?round:int ?global_step:int ?outer:str"
            " ?transfer_dtype:str ?update_dtype:str ?forecaster:str ?simulated:bool ?tick_s:num",
            "the run (or a resumed run) begins; the simulator's replay sets simulated, forecaster",
        ),
        _kind(
            "mode",
            "mode:str train:list provision:list ?reasons:dict",
            "the decision changed: PAUSE | LOCAL | FEDERATED, the sites to train and to provision",
        ),
        _kind("provision_decided", "site:str reason:str", "the policy wants the site up"),
        _kind(
            "provision_started",
            "site:str ?reason:str",
            "the site draws power (idle_kw) from here on",
        ),
        _kind(
            "provision_complete",
            "site:str ?node_id:int ?gpus:int ?device:str",
            "ready: its SuperNode answered, it can train",
        ),
        _kind("deprovision", "site:str reason:str", "its power draw stops here"),
        _kind(
            "round_start",
            "round:int sites:list deadline_t:num ?global_step:int ?mode:str",
            "a round opens for these sites, to end at deadline_t (sim)",
        ),
        _kind(
            "join",
            "site:str round:int ?deadline_t:num ?resumed:bool",
            "a site enters a running round (resumed: it paused warm in it, goes on from its"
            " own weights)",
        ),
        _kind(
            "leave",
            "site:str round:int reason:str ?warm:bool",
            "a site asked to stop stepping (warm: it stays provisioned and idle)",
        ),
        _kind(
            "lease_extended",
            "site:str round:int rank:int chunks:int rows:int",
            "more data leased to a site mid-round",
        ),
        _kind(
            "train_interval",
            "site:str start:num end:num ?energy_j:num? ?round:int ?tokens:int ?steps:int"
            " ?loss:num? ?curve:list ?stopped_by:str ?cropped_tokens:int ?costs:dict",
            "a site trained over [start, end) (sim); curve: its per-step losses, binned;"
            " energy_j: measured joules or null; cropped_tokens: read but cut by packing;"
            " costs (first span of a reply): its fixed cost in wall seconds, start (TRAIN sent"
            " -> order in the trainer), weights_in (-> first step), warmup (the first step's"
            " excess), save (waiting for the last inner state to reach disk), weights_out"
            " (last step -> reply received)",
        ),
        _kind(
            "round_end",
            "round:int sites:list tokens:int loss:num? ?dropped:list ?committed:dict"
            " ?cropped_tokens:int",
            "every reply of the round is in (committed: the row ranges it made permanent)",
        ),
        _kind(
            "aggregate",
            "round:int loss:num tokens:int global_step:int sites:list ?weights:dict"
            " ?committed_rows:int ?total_rows:int",
            "the round's replies averaged into the global model; loss: the work-weighted"
            " round-mean train loss (not the averaged model's loss)",
        ),
        _kind(
            "validation",
            "round:int model_t:num global_step:int tokens:int bpb:num? eval_tokens:int"
            " seconds:num device:str ?error:str",
            "the global model's val bits per byte (null if it failed), measured off the loop",
        ),
        _kind(
            "fault",
            "error:str ?site:str ?round:int ?released_chunks:any",
            "something went wrong and was handled (a dropped site, a failed node, a bad reply)",
        ),
        _kind(
            "run_end",
            "reason:str ?global_step:int ?tokens:int ?round:int",
            "the run stops (trace_end, num_iterations, a stop, a failure)",
        ),
    )
}
EVENT_KINDS = tuple(KINDS)


class EventError(ValueError):
    """An event that does not match its kind's schema (a bug in the emitter)."""


def check(ev: dict[str, Any]) -> dict[str, Any]:
    """``ev`` if it matches its kind's schema; else EventError naming the kind and field."""
    kind = KINDS.get(ev.get("kind", ""))
    if kind is None:
        raise EventError(f"unknown event kind {ev.get('kind')!r}: one of {', '.join(KINDS)}")
    t = ev.get("t")
    if not _CHECKS["num"](t) or not math.isfinite(t):
        raise EventError(f"{kind.name}: t must be a finite number of sim seconds, got {t!r}")
    for f in kind.fields:
        if f.name not in ev:
            if f.required:
                raise EventError(f"{kind.name}: missing field {f.name!r}")
        elif not f.accepts(ev[f.name]):
            raise EventError(f"{kind.name}: {f.name}={ev[f.name]!r} is not a {f.type}")
    extra = set(ev) - set(COMMON) - {f.name for f in kind.fields}
    if extra:
        raise EventError(f"{kind.name}: unknown field(s) {sorted(extra)}: add them to the schema")
    return ev


def make_event(kind: str, t: float, **fields: Any) -> dict[str, Any]:
    """A checked event dict: ``kind`` and ``t`` first, then the fields in the order given."""
    return check({"kind": kind, "t": float(t), **fields})


def markdown() -> str:
    """docs/EVENTS.md: the kinds and their fields, generated from this module."""
    lines = [
        "# Run events",
        "",
        "Generated from `pilot/events/schema.py` (`python -m pilot.events.schema >"
        " docs/EVENTS.md`); a test fails when the two differ.",
        "",
        "Every event has `kind`, `t` (simulated epoch seconds UTC) and, when the live ServerApp"
        " emits it, `wall` (wall-clock epoch seconds). They are written to"
        " `RUN_DIR/events.jsonl`, one JSON object a line, and to the Redis `events` stream."
        " `field?` is optional; `type?` may be null.",
        "",
        "| kind | fields | meaning |",
        "|---|---|---|",
    ]
    for k in KINDS.values():
        fields = ", ".join(
            f"`{f.name}{'' if f.required else '?'}`: {f.type}{'?' if f.nullable else ''}"
            for f in k.fields
        )
        lines.append(f"| `{k.name}` | {fields} | {k.doc} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(markdown())
