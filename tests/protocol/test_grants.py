"""Grants share the global staleness budget among engines (protocol/grants.py), worked by hand."""

from tidal.protocol.grants import GrantTable, grant_key


def test_free_budget_goes_to_engines_a_group_at_a_time_in_turn():
    t = GrantTable(group_size=4)
    for name in ("a", "b", "c"):
        t.heard(name, 1, started=0, in_flight=0, capacity=8, now=0.0)
    # budget 20 = 5 groups: a, b, c get one each, then a and b a second (ties broken by id)
    assert t.allocate(20) == {"a/1": 8, "b/1": 8, "c/1": 4}
    assert t.used() == 20
    # capacity 8 caps each at finished + 8: c may have one more group, a and b none
    assert t.allocate(100) == {"a/1": 8, "b/1": 8, "c/1": 8}


def test_grants_never_shrink_and_never_exceed_the_budget_together():
    t = GrantTable(group_size=2)
    t.heard("a", 1, started=0, in_flight=0, capacity=100, now=0.0)
    t.heard("b", 1, started=0, in_flight=0, capacity=100, now=0.0)
    before = t.allocate(10)
    assert sum(before.values()) == 10
    after = t.allocate(4)  # the budget fell (a trainer restored from an older checkpoint)
    assert after == before


def test_a_restarted_engine_returns_its_lost_episodes_and_keeps_the_finished_ones_counted():
    t = GrantTable(group_size=2)
    t.heard("a", 1, started=0, in_flight=0, capacity=10, now=0.0)
    assert t.allocate(10) == {"a/1": 10}
    t.heard("a", 1, started=10, in_flight=4, capacity=10, now=1.0)  # 6 finished, 4 running
    t.heard("a", 2, started=0, in_flight=0, capacity=10, now=2.0)  # restarted: epoch 2
    assert t.retired == 6 and t.lost == 4
    assert t.allocate(10) == {"a/2": 4}  # 10 - 6 finished before the restart
    t.heard("a", 1, started=10, in_flight=4, capacity=10, now=3.0)  # a late heartbeat of epoch 1
    assert grant_key("a", 1) not in t.grants()


def test_a_silent_engine_expires_and_its_unused_grant_returns():
    t = GrantTable(group_size=2, gone_after_s=5.0)
    t.heard("a", 1, started=0, in_flight=0, capacity=10, now=0.0)
    t.heard("b", 1, started=0, in_flight=0, capacity=10, now=0.0)
    assert t.allocate(12) == {"a/1": 6, "b/1": 6}
    t.heard("a", 1, started=2, in_flight=2, capacity=10, now=1.0)
    t.heard("b", 1, started=6, in_flight=0, capacity=10, now=9.0)
    assert t.expire(now=9.0) == ["a/1"]
    assert (t.retired, t.lost) == (0, 2)
    assert t.allocate(12) == {"b/1": 12}


def test_a_new_incarnation_starts_at_what_it_reports_having_started():
    t = GrantTable(group_size=2)
    t.heard("a", 1, started=8, in_flight=2, capacity=4, now=0.0)  # a trainer restarted under a running engine
    assert t.allocate(6) == {"a/1": 8}  # over budget already: nothing more until the budget catches up
    assert t.allocate(12) == {"a/1": 10}  # finished 6 + capacity 4
