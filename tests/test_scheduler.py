"""The round scheduler on plain values: leaves, joins, the FEDERATED deadline, the end signal,
silent sites and the close, as functions of wall time, the decision and the fleet."""

from pilot.control.aggregate import State
from pilot.control.data_ledger import Assignment
from pilot.control.rounds import Participant, Reply, Round
from pilot.control.scheduler import Timing, end_round, may_refill, plan_round, round_length

T = Timing(round_min=10.0, round_max=30.0, join_min=2.0, reply_grace=1.0)


def _round(*sites: str, deadline: float = 130.0) -> Round:
    r = Round(n=4, start_wall=100.0, deadline_wall=deadline, base_step=7)
    for s in sites:
        r.participants[s] = Participant(s, 1, f"m-{s}", deadline, Assignment(s), False, 100.0)
    return r


def _reply(site: str, stopped_by: str = "") -> Reply:
    empty: State = {}
    return Reply(site, empty, 10, 1, 3.0, {}, stopped_by)


def _plan(r: Round, now: float, train, provision=(), ready=(), leaving=(), ending=False):
    return plan_round(r, now, set(train), set(provision), {}, set(ready), set(leaving), ending, T)


def test_a_federated_round_of_several_sites_syncs_after_round_min_a_local_one_after_max():
    assert round_length(True, 2, T) == 10.0
    assert round_length(True, 1, T) == 30.0 and round_length(False, 3, T) == 30.0


def test_a_site_no_longer_trained_leaves_warm_while_still_wanted_provisioned():
    r = _round("alpha", "beta")
    plan = _plan(r, 105.0, train={"beta"}, provision={"alpha", "beta"}, ready={"beta"})
    assert plan.leaves == [("alpha", "window closed", True)] and plan.joiners == []
    plan = _plan(r, 105.0, train={"beta"}, provision={"beta"}, ready={"beta"})
    assert plan.leaves == [("alpha", "window closed", False)]
    # a site already leaving is not asked twice
    assert _plan(r, 105.0, train={"beta"}, ready={"beta"}, leaving={"alpha"}).leaves == []


def test_a_joiner_turns_a_local_round_federated_and_shortens_its_deadline():
    r = _round("alpha")
    plan = _plan(r, 105.0, train={"alpha", "beta"}, ready={"alpha", "beta"})
    assert plan.joiners == ["beta"] and plan.deadline_wall == 115.0
    # too little time left to be worth a start-up: no join, the deadline stands
    late = _plan(r, 128.5, train={"alpha", "beta"}, ready={"alpha", "beta"})
    assert late.joiners == [] and late.deadline_wall == 130.0


def test_a_joiner_whose_only_partner_leaves_keeps_the_local_deadline():
    r = _round("alpha")
    plan = _plan(r, 105.0, train={"beta"}, provision={"alpha"}, ready={"beta"})
    assert plan.leaves == [("alpha", "window closed", True)]
    assert plan.joiners == ["beta"] and plan.deadline_wall == 130.0


def test_only_a_site_paused_warm_by_the_server_resumes_in_its_round():
    r = _round("alpha", "beta")
    r.replies["alpha"] = _reply("alpha", stopped_by="stop")
    assert _plan(r, 105.0, train={"alpha", "beta"}, ready={"alpha", "beta"}).joiners == []
    r.warm.add("alpha")
    assert _plan(r, 105.0, train={"alpha", "beta"}, ready={"alpha", "beta"}).joiners == ["alpha"]


def test_the_run_ending_ends_the_round_now():
    r = _round("alpha")
    assert _plan(r, 105.0, train={"alpha"}, ready={"alpha"}, ending=True).deadline_wall == 105.0


def test_a_shortened_round_signals_its_end_drops_the_silent_and_closes():
    r = _round("alpha", "beta", deadline=130.0)
    r.deadline_wall = 115.0  # shortened by a join: the TRAINs say 130
    end = end_round(r, 115.5, provisioned={"alpha", "beta"}, t=T)
    assert end.signal_end and end.overdue == [] and not end.close
    r.end_signalled = True
    r.replies["alpha"] = _reply("alpha")
    end = end_round(r, 116.5, provisioned={"alpha", "beta"}, t=T)
    assert not end.signal_end and end.overdue == ["beta"] and end.close


def test_a_round_whose_only_participant_paused_warm_waits_for_its_deadline():
    r = _round("alpha")
    r.replies["alpha"] = _reply("alpha", stopped_by="stop")
    r.warm.add("alpha")
    assert not end_round(r, 110.0, provisioned={"alpha"}, t=T).close
    assert end_round(r, 110.0, provisioned=set(), t=T).close  # released: nothing to wait for
    assert end_round(r, 130.0, provisioned={"alpha"}, t=T).close


def test_a_lease_refill_is_served_only_in_the_live_round_to_a_site_still_training():
    r = _round("alpha")
    assert may_refill(r, 4, "alpha", 120.0, leaving=False)
    assert not may_refill(r, 3, "alpha", 120.0, leaving=False)  # an old round's rank
    assert not may_refill(r, 4, "alpha", 131.0, leaving=False)  # past the deadline
    assert not may_refill(r, 4, "alpha", 120.0, leaving=True)
    assert not may_refill(None, 4, "alpha", 120.0, leaving=False)
