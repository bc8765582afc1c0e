"""Parity benchmark pieces: rounds from a schedule (both join rules), exact token budgets,
and a short run of bench/parity.py that is deterministic for a seed."""

import subprocess
import sys
from pathlib import Path

import pytest

from pilot.analysis.schedule import continuous, plan_rounds, steps_for

REPO = Path(__file__).resolve().parents[1]
RULES = {"round_min_s": 20.0, "round_max_s": 60.0, "join_min_s": 5.0}


def _summary(rounds):
    return [(r.start, r.end, {s: w.seconds for s, w in r.work.items()}) for r in rounds]


def test_a_joiner_starts_from_the_opening_model_and_shortens_the_round_under_the_live_rule():
    spans = {"a": [(0.0, 100.0)], "b": [(30.0, 100.0)]}
    rounds = plan_rounds(spans, join_rule="stale", **RULES)
    # LOCAL round of 60 s, turned FEDERATED by b's join at 30: it ends at 30 + 20
    assert _summary(rounds)[:2] == [
        (0.0, 50.0, {"a": 50.0, "b": 20.0}),
        (50.0, 70.0, {"a": 20.0, "b": 20.0}),
    ]


def test_a_join_closes_the_round_and_opens_a_new_one_under_the_close_rule():
    spans = {"a": [(0.0, 100.0)], "b": [(30.0, 100.0)]}
    rounds = plan_rounds(spans, join_rule="close", **RULES)
    assert _summary(rounds)[:2] == [(0.0, 30.0, {"a": 30.0}), (30.0, 50.0, {"a": 20.0, "b": 20.0})]


def test_a_site_leaving_keeps_its_partial_work_and_a_late_ready_site_waits_for_the_next_round():
    spans = {"a": [(0.0, 58.0)], "b": [(57.0, 90.0)]}
    rounds = plan_rounds(spans, join_rule="stale", **RULES)
    assert _summary(rounds) == [(0.0, 58.0, {"a": 58.0}), (58.0, 90.0, {"b": 32.0})]


def test_steps_split_the_exact_budget_in_proportion_to_training_seconds():
    rounds = plan_rounds(continuous(["a", "b", "c"], 0.0, 100.0), **RULES)
    rounds = steps_for(rounds, 61)
    assert sum(w.steps for r in rounds for w in r.work.values()) == 61
    assert len(rounds) == 5 and all(set(r.work) == {"a", "b", "c"} for r in rounds)
    with pytest.raises(ValueError, match="trains no site"):
        steps_for([], 10)


def test_a_short_parity_run_is_deterministic_for_a_seed(demo_data, tokenizer_dir, tmp_path):
    argv = [
        sys.executable, str(REPO / "bench" / "parity.py"),
        "--data-dir", str(demo_data), "--tokenizer-dir", str(tokenizer_dir),
        "--steps", "12", "--depth", "1", "--seq-len", "64", "--batch", "2",
        "--total-batch", "128", "--eval-tokens", "512", "--evals", "1",
        "--join-rule", "stale", "--plot", str(tmp_path / "parity.png"),
    ]  # fmt: skip
    lines = []
    for _ in range(2):
        out = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert out.returncode == 0, out.stdout + out.stderr
        lines.append(out.stdout.strip().splitlines()[-1])
    assert lines[0] == lines[1] and lines[0].startswith("bpb_central="), lines
    assert (tmp_path / "parity.png").stat().st_size > 0
