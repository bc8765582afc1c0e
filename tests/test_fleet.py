"""The fleet's bookkeeping on plain values: node <-> site mapping, readiness, leaving, and the
state each site is in."""

from pilot.control.fleet import Fleet, RestartBudget, SiteState


def test_a_site_goes_off_provisioning_ready_training_leaving_and_off_again():
    f = Fleet()
    assert f.state("texas", "stopped", training=False) == SiteState.OFF
    f.provision("texas")
    assert f.state("texas", "provisioning", training=False) == SiteState.PROVISIONING
    f.asked(7, "q1", now=0.0)
    assert f.answered("q1") == 7 and f.answered("q1") is None
    f.map(7, "texas", gpus=0, device="cpu")
    # mapped, but the modelled provisioning delay is not over yet
    assert f.ready({"texas": "provisioning"}) == set()
    ready = f.ready({"texas": "running"})
    assert ready == {"texas"} and f.newly_ready(ready) == ["texas"] and f.newly_ready(ready) == []
    assert f.state("texas", "running", training=False) == SiteState.READY
    assert f.state("texas", "running", training=True) == SiteState.TRAINING
    f.leave("texas", "window closed")
    assert f.state("texas", "running", training=True) == SiteState.LEAVING
    assert f.ready({"texas": "running"}) == set() and f.waiting()
    f.left("texas")
    f.deprovision("texas")
    assert f.state("texas", "stopped", training=False) == SiteState.READY  # node still there
    assert f.gone(7) == "texas" and f.state("texas", "stopped", training=False) == SiteState.OFF


def test_a_restarted_node_replaces_the_stale_one_and_the_stale_ones_exit_is_ignored():
    f = Fleet()
    f.map(7, "texas", gpus=1, device="cuda")
    f.map(9, "texas", gpus=1, device="cuda")
    assert f.site_node == {"texas": 9} and f.node_site == {9: "texas"}
    assert f.gone(7) is None and f.site_node == {"texas": 9}
    f.unmap("texas")
    assert f.site_node == {} and f.state("texas", "failed: exit 1", False) == SiteState.FAILED


def test_an_unanswered_or_failed_query_is_asked_again_later():
    f = Fleet(query_retry_s=5.0, query_ttl_s=120.0)
    assert f.to_ask({1, 2}, now=0.0) == [1, 2]
    f.asked(1, "a", now=0.0)
    f.asked(2, "b", now=0.0)
    assert f.to_ask({1, 2}, now=1.0) == []
    f.query_failed_at(2, now=1.0)
    assert f.to_ask({1, 2}, now=3.0) == [] and f.to_ask({1, 2}, now=6.5) == [2]
    f.expire_queries(now=200.0)  # node 1 never answered
    assert f.queries == {} and f.to_ask({1}, now=200.0) == [1]
    assert f.vanished({2}) == []
    f.asked(1, "c", now=200.0)
    assert f.vanished(set()) == [1]


def test_a_dead_node_is_restarted_at_once_then_with_doubling_waits_then_cools_down():
    f = Fleet(budget=RestartBudget(restarts=3, window_s=100.0, backoff_s=2.0, cooldown_s=50.0))
    f.provision("texas")
    f.map(7, "texas", gpus=0, device="cpu")
    assert f.died("texas", now=0.0) == 0.0 and f.restarting("texas")
    assert f.state("texas", "stopped", False) == SiteState.FAILED
    assert f.ready({"texas": "running"}) == set()  # not while its restart is pending
    assert f.restarts_due(0.0) == ["texas"] and not f.restarting("texas")
    assert f.died("texas", now=1.0) == 3.0  # the 2nd death: 2 s
    assert f.restarts_due(2.0) == [] and f.restarts_due(3.0) == ["texas"]
    assert f.died("texas", now=4.0) == 8.0  # the 3rd: 4 s
    assert f.restarts_due(8.0) == ["texas"]
    assert f.died("texas", now=9.0) is None  # one too many: released for the cool-down
    assert not f.may_provision("texas", now=58.0) and f.may_provision("texas", now=59.0)
    assert f.state("texas", "stopped", False, now=30.0) == SiteState.FAILED


def test_deaths_older_than_the_window_do_not_count_against_the_budget():
    f = Fleet(budget=RestartBudget(restarts=1, window_s=10.0))
    f.provision("texas")
    assert f.died("texas", now=0.0) == 0.0
    assert f.died("texas", now=20.0) == 20.0  # the first death has left the window
    assert f.died("texas", now=21.0) is None
