"""A site paused warm mid-round and resumed in the same round: its two partial replies become
one (in-memory replies, no Flower), and it reads on where it stopped."""

import torch

from pilot.control.data_ledger import Assignment, DataLedger
from pilot.control.leases import unread_rest
from pilot.control.rounds import Participant, Reply, Round


def reply(tokens: int, steps: int, loss: float, consumed: dict, w: float, stopped_by: str):
    return Reply("texas", {"w": torch.full((2,), w)}, tokens, steps, loss, consumed, stopped_by)


def test_a_resumed_reply_counts_both_parts_with_the_later_weights():
    before = reply(100, 2, 6.0, {"0:0": 30, "0:1": 5}, 1.0, "stop")
    after = reply(300, 6, 5.0, {"0:1": 20, "0:2": 7}, 2.0, "deadline")
    both = before.then(after)
    assert (both.tokens, both.steps, both.stopped_by) == (400, 8, "deadline")
    assert both.loss == (6.0 * 100 + 5.0 * 300) / 400
    assert both.consumed == {"0:0": 30, "0:1": 20, "0:2": 7}
    assert torch.equal(both.state["w"], after.state["w"])


def test_a_paused_site_resumes_with_the_unread_rest_of_its_lease():
    ledger = DataLedger([(0, 0, 30), (0, 1, 30), (0, 2, 30)])
    lease = ledger.assign("texas", max_chunks=3)
    r = Round(n=1, start_wall=0.0, deadline_wall=100.0, base_step=0)
    r.participants["texas"] = Participant("texas", 1, "m", 100.0, lease, False, 0.0)
    paused = reply(100, 2, 6.0, {"0:0": 30, "0:1": 12}, 1.0, "stop")
    r.replies["texas"] = paused
    assert r.paused() == set()  # stopped, but not by the server's warm pause: it has left
    r.warm.add("texas")  # the server stopped it warm
    assert r.paused() == {"texas"} and r.pending() == []
    rest = unread_rest(r, paused)
    assert rest.chunks == [(0, 1, 30), (0, 2, 30)]
    assert rest.start_rows == {"0:1": 12, "0:2": 0}
    # the lease still covers both parts: the merged reply commits as one
    merged = paused.then(reply(50, 1, 5.5, {"0:1": 30, "0:2": 4}, 2.0, "deadline"))
    assert ledger.commit("texas", merged.consumed) == 30 + 30 + 4
    assert ledger.committed() == {"0:0": 30, "0:1": 30, "0:2": 4}


def test_a_site_stopped_by_its_deadline_is_not_paused():
    r = Round(n=1, start_wall=0.0, deadline_wall=100.0, base_step=0)
    r.participants["texas"] = Participant("texas", 1, "m", 100.0, Assignment("texas"), False, 0)
    r.replies["texas"] = reply(10, 1, 6.0, {}, 1.0, "deadline")
    assert r.paused() == set()
