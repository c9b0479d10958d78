"""Admission (engine/admission.py) and task drawing (engine/tasks.py): pure, worked by hand."""

import pytest
from tidal.engine.admission import Admission
from tidal.engine.config import RolloutConfig, TaskConfig
from tidal.engine.tasks import TaskSource
from tidal.protocol.grants import grant_key
from tidal.protocol.messages import TrainerStatus


def _admission(**kw) -> Admission:
    a = Admission("e", 7, group_size=4, max_concurrent=kw.pop("max_concurrent", 100), **kw)
    a.status_fresh = True
    return a


def _status(version=0, grant=0, **kw) -> TrainerStatus:
    return TrainerStatus(version=version, consumed=0, batch_size=8, max_staleness=1,
                         grants={grant_key("e", 7): grant}, **kw)


def test_nothing_starts_without_a_status_or_a_grant():
    a = _admission()
    assert a.blocked() == "no_trainer"
    a.status = TrainerStatus(version=0, consumed=0, batch_size=8)
    assert a.blocked() == "staleness"  # the trainer has not granted this incarnation anything


def test_groups_start_within_the_grant_and_discards_hand_admission_back():
    a = _admission()
    a.status = _status(grant=8)
    for _ in range(2):
        assert a.blocked() is None
        a.start_group()
    assert a.blocked() == "staleness"  # 8 started = the grant
    a.finish(4, discarded=4)  # a group discarded (zero variance): its 4 come back
    assert a.blocked() is None
    a.finish(4)
    a.start_group()
    assert (a.started, a.in_flight, a.allowance()) == (12, 4, 12)


def test_concurrency_pause_spool_and_trainer_silence_block_in_turn():
    a = _admission(max_concurrent=4)
    a.status = _status(grant=100)
    a.start_group()
    assert a.blocked() == "concurrency"
    a.finish(4)
    a.spool_full = True
    assert a.blocked() == "spool_full"
    a.spool_full, a.status_fresh = False, False
    assert a.blocked() == "no_trainer"
    a.status_fresh, a.paused = True, True
    assert a.blocked() == "paused"
    a.paused, a.draining = False, True
    assert a.blocked() == "draining"


@pytest.mark.parametrize(("sync", "served", "blocked"), [
    (False, 4, None), (False, 3, "weights"), (True, 5, None), (True, 4, "weights")])
def test_servers_behind_the_trainer_by_more_than_the_staleness_bound_block(sync, served, blocked):
    a = _admission(sync=sync)
    a.status = _status(version=5, grant=100)  # max_staleness 1
    a.served_version = served
    assert a.blocked() == blocked


def test_the_budget_counts_from_the_served_version_while_the_servers_catch_up():
    # trainer at 5, s = 1, B = 8: the trainer's budget is (5 + 1 + 1) * 8 = 56. With 48 started and the
    # servers still at 4, a group started now would be sampled by version 4 and may be trained at 6:
    # staleness 2, dropped. It waits until the servers serve 5.
    a = _admission()
    a.status = _status(version=5, grant=56)
    for _ in range(12):
        a.start_group()
    a.served_version = 4
    assert a.blocked() == "weights"
    a.served_version = 5
    assert a.blocked() is None
    a.started = 40  # far from the budget's edge, a lagging server does not stop admission
    a.served_version = 4
    assert a.blocked() is None


def test_a_lagging_server_holds_back_the_ungranted_budget_before_the_engine_grant():
    # trainer at 4, s = 8, B = 8: budget (4 + 1 + 8) * 8 = 104; the servers serve 0, so 4 batches (32)
    # wait for them. The trainer granted this engine 40 (about what it can run): the 64 granted to nobody
    # hold the reserve, and the engine, far from the served bound (1 + 8) * 8 = 72, goes on.
    a = _admission()
    a.status = TrainerStatus(version=4, consumed=32, batch_size=8, max_staleness=8, grants={a.key: 40})
    a.served_version = 0
    for _ in range(10):
        assert a.blocked() is None
        a.start_group()
    assert a.blocked() == "staleness"  # 40 started: the grant, not the servers, stops it
    a.status = TrainerStatus(version=4, consumed=32, batch_size=8, max_staleness=8, grants={a.key: 80, "f/1": 20})
    for _ in range(3):  # 4 ungranted: 28 of the reserve come out of the grant, so 52 may start
        assert a.blocked() is None
        a.start_group()
    assert a.started == 52 and a.blocked() == "weights"


def test_max_episodes_ends_admission():
    a = _admission()
    a.status = _status(grant=100)
    a.limit_started = 4
    a.start_group()
    assert a.blocked() == "max_episodes"


def test_task_groups_share_env_and_seed_and_engines_take_disjoint_seeds():
    tasks = [TaskConfig(env="games:GuessTheNumber-v0", seed_start=100)]
    a = TaskSource(tasks, engine_id="a", epoch=1, group_size=3, engines=2, engine_index=0)
    b = TaskSource(tasks, engine_id="b", epoch=1, group_size=3, engines=2, engine_index=1)
    ga = [a.next_group(max_turns=4, version=0) for _ in range(3)]
    gb = [b.next_group(max_turns=4, version=0) for _ in range(3)]
    assert [g[0].seed for g in ga] == [100, 102, 104] and [g[0].seed for g in gb] == [101, 103, 105]
    for g in ga:
        assert {t.seed for t in g} == {g[0].seed} and {t.group_id for t in g} == {g[0].group_id}
        assert [t.index for t in g] == [0, 1, 2]
    ids = [t.episode_id for g in ga + gb for t in g]
    assert len(set(ids)) == len(ids)


def test_horizon_schedule_raises_the_turn_limit_with_the_version():
    r = RolloutConfig(horizon=[(0, 2), (10, 4), (20, 8)])
    assert [r.max_turns_at(v, 99) for v in (0, 9, 10, 25)] == [2, 2, 4, 8]
    assert RolloutConfig().max_turns_at(7, 5) == 5
    with pytest.raises(ValueError, match="versions must increase"):
        RolloutConfig(horizon=[(10, 4), (0, 2)])


def test_no_server_in_rotation_blocks_admission():
    a = _admission()
    a.status = _status(grant=100)
    a.serving = False
    assert a.blocked() == "no_server"
    a.serving = True
    assert a.blocked() is None


def test_a_run_that_discards_half_its_groups_keeps_training_within_the_budget():
    """The engine's admission and the trainer's grant table together (tidal.protocol.grants), with every
    other group discarded by the engine (zero variance, failed episodes): the discards hand their
    admission back once, not twice and not never, so training goes on and the engine's counted episodes
    stay within the staleness budget."""
    from tidal.protocol.grants import GrantTable

    batch, group, staleness = 8, 4, 1
    table = GrantTable(group_size=group)
    a = Admission("e", 7, group_size=group, max_concurrent=64)
    a.status_fresh = True
    version, buffered, discard = 0, 0, False
    for now in range(200):
        table.heard("e", 7, **dict(zip(("started", "in_flight", "capacity"), a.report(), strict=True)), now=now)
        status = TrainerStatus(version=version, consumed=version * batch, batch_size=batch, max_staleness=staleness)
        a.status = TrainerStatus(version=version, consumed=version * batch, batch_size=batch,
                                 max_staleness=staleness, grants=table.allocate(status.budget))
        while a.blocked() is None:
            a.start_group()
        assert a.started - a.discarded <= status.budget  # invariant 3: discards are not counted
        for _ in range(a.in_flight // group):  # every group ends; every other one is discarded
            a.finish(group, discarded=group if discard else 0)
            buffered += 0 if discard else group
            discard = not discard
        while buffered >= batch:  # the trainer steps on what arrived
            buffered -= batch
            version += 1
    assert version >= 50, f"training stalled at version {version}: {a.blocked()}, {a.report()}, {table.grants()}"
