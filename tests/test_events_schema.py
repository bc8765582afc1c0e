"""The event schema: every emitted event is checked against its kind, the emitters in the code
use only declared fields, and docs/EVENTS.md is the schema's own rendering."""

import ast
from pathlib import Path

import pytest

from pilot.events.schema import KINDS, EventError, make_event, markdown

REPO = Path(__file__).resolve().parents[1]


def test_a_well_formed_event_passes_with_its_fields_in_order():
    ev = make_event("leave", 10, site="texas", round=3, reason="window closed", warm=True)
    assert list(ev) == ["kind", "t", "site", "round", "reason", "warm"] and ev["t"] == 10.0


@pytest.mark.parametrize(
    ("kind", "fields", "message"),
    [
        ("lunch", {}, "unknown event kind 'lunch'"),
        ("leave", {"site": "texas", "round": 3}, "missing field 'reason'"),
        ("leave", {"site": "texas", "round": "3", "reason": "x"}, "round='3' is not a int"),
        ("leave", {"site": "texas", "round": 3, "reason": "x", "mood": 1}, "unknown field"),
        ("round_end", {"round": 1, "sites": [], "tokens": True, "loss": None}, "not a int"),
        ("deprovision", {"site": None, "reason": "x"}, "site=None is not a str"),
    ],
)
def test_a_malformed_event_is_refused_naming_the_field(kind, fields, message):
    with pytest.raises(EventError, match=message):
        make_event(kind, 0.0, **fields)


def test_a_non_finite_time_is_refused():
    with pytest.raises(EventError, match="finite"):
        make_event("run_end", float("nan"), reason="x")


def test_nullable_fields_take_null_and_optional_ones_may_be_absent():
    make_event("round_end", 1.0, round=1, sites=["a"], tokens=0, loss=None)
    make_event("train_interval", 1.0, site="a", start=0.0, end=1.0, energy_j=None)


def _emit_calls() -> list[tuple[str, int, str, list[str]]]:
    calls = []
    for path in sorted((REPO / "pilot").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("emit", "make_event")
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                names = [kw.arg for kw in node.keywords if kw.arg]
                calls.append((path.name, node.lineno, node.args[0].value, names))
    return calls


def test_every_emitter_in_the_code_uses_a_declared_kind_and_declared_fields():
    calls = _emit_calls()
    assert len(calls) >= 20, calls  # the live loop's and the validation thread's emitters
    for where, line, kind, names in calls:
        assert kind in KINDS, f"{where}:{line}: kind {kind!r} is not in the schema"
        declared = {f.name for f in KINDS[kind].fields} | {"wall"}
        assert set(names) <= declared, f"{where}:{line}: {set(names) - declared} undeclared"
    emitted = {kind for _, _, kind, _ in calls}
    assert emitted == set(KINDS), f"schema kinds nothing emits: {set(KINDS) - emitted}"


def test_the_events_doc_is_generated_from_the_schema():
    doc = (REPO / "docs" / "EVENTS.md").read_text()
    assert doc == markdown(), "docs/EVENTS.md is stale: python -m pilot.events.schema > it"
