"""The intake state machine: staleness drops, whole groups, bounded buffer, dedup, snapshot/restore."""

import asyncio

import pytest
from tidal.protocol.config import load_config
from tidal.protocol.errors import ConfigError
from tidal.protocol.messages import Trajectory, Turn
from tidal.trainer.config import IntakeConfig
from tidal.trainer.intake import Intake


def traj(tid: str, group: str, version: int, n_gen: int = 3) -> Trajectory:
    return Trajectory.build(
        id=tid, group_id=group, env_id="test", task_seed=0,
        tokens=list(range(2 + n_gen)), loss_mask=[0, 0] + [1] * n_gen,
        behav_logp=[0, 0] + [-0.5] * n_gen, versions=[-1, -1] + [version] * n_gen,
        turns=[Turn(2, 2 + n_gen, 1.0)], reward=1.0,
    )


def test_stale_dropped_on_arrival_and_counted():
    intake = Intake(IntakeConfig(batch_size=2, max_staleness=1, group_size=1))
    # trained version 5: staleness 5-3 = 2 > 1 is dropped; 5-4 = 1 is kept
    assert intake.offer(traj("a", "ga", 3), version=5) == "stale"
    assert intake.offer(traj("b", "gb", 4), version=5) == "buffered"
    assert intake.counters["stale_dropped"] == 1
    assert intake.take_batch(5) is None  # one ready, B = 2
    assert intake.offer(traj("c", "gc", 5), version=5) == "buffered"
    batch = intake.take_batch(5)
    assert batch.ids == ["b", "c"] and batch.staleness == [1, 0]


def test_buffered_ones_age_out_when_the_batch_forms():
    intake = Intake(IntakeConfig(batch_size=2, max_staleness=0, group_size=1))
    intake.offer(traj("a", "ga", 2), version=2)
    intake.offer(traj("b", "gb", 2), version=2)
    assert intake.take_batch(3) is None  # both are now 1 step stale
    assert intake.counters["stale_dropped"] == 2 and intake.size == 0


def test_groups_kept_whole_and_incomplete_groups_wait():
    intake = Intake(IntakeConfig(batch_size=4, group_size=2, max_staleness=4))
    intake.offer(traj("a1", "A", 0), 0)
    intake.offer(traj("b1", "B", 0), 0)
    intake.offer(traj("c1", "C", 0), 0)
    intake.offer(traj("b2", "B", 0), 0)
    assert intake.take_batch(0) is None  # only B is complete
    intake.offer(traj("c2", "C", 0), 0)
    batch = intake.take_batch(0)
    assert sorted(batch.ids) == ["b1", "b2", "c1", "c2"]
    assert intake.size == 1  # a1 still waits for its partner


def test_a_dropped_member_still_completes_its_group():
    intake = Intake(IntakeConfig(batch_size=2, group_size=2, max_staleness=0))
    intake.offer(traj("a1", "A", 3), 3)
    intake.offer(traj("a2", "A", 1), 3)  # stale: A is complete with one member
    intake.offer(traj("b1", "B", 3), 3)
    intake.offer(traj("b2", "B", 3), 3)
    assert intake.take_batch(3).ids == ["a1"]  # oldest first; B (2) does not fit beside it
    assert intake.take_batch(3).ids == ["b1", "b2"]


def test_full_buffer_releases_oldest_incomplete_group_instead_of_deadlocking():
    intake = Intake(IntakeConfig(batch_size=2, group_size=2, capacity=3, max_staleness=0))
    for i, group in enumerate("ABC"):
        intake.offer(traj(f"{group}1", group, 0), 0)
        assert intake.full == (i == 2)
    batch = intake.take_batch(0)
    assert batch.ids == ["A1", "B1"] and intake.counters["partial_groups"] == 2


def test_duplicates_are_dropped_by_id():
    intake = Intake(IntakeConfig(batch_size=1, group_size=1))
    assert intake.offer(traj("a", "ga", 0), 0) == "buffered"
    assert intake.offer(traj("a", "ga", 0), 0) == "duplicate"
    assert intake.take_batch(0).ids == ["a"]
    assert intake.offer(traj("a", "ga", 0), 0) == "duplicate"  # even after use


def test_snapshot_restores_buffer_groups_and_seen_ids():
    cfg = IntakeConfig(batch_size=4, group_size=2, max_staleness=2)
    intake = Intake(cfg)
    intake.offer(traj("a1", "A", 0), 0)
    intake.offer(traj("a2", "A", 0), 0)
    intake.offer(traj("b1", "B", 0), 0)
    intake.offer(traj("c1", "C", 0), 0)
    intake.offer(traj("c2", "C", 0), 3)  # stale at version 3: C complete with c1 alone
    state = intake.snapshot()
    again = Intake(cfg, state)
    assert again.size == intake.size == 4
    assert again.offer(traj("a1", "A", 0), 0) == "duplicate"
    assert again.counters["stale_dropped"] == 1
    again.offer(traj("b2", "B", 0), 0)
    batch = again.take_batch(0)
    assert sorted(batch.ids) == ["a1", "a2", "c1"]  # A then C fit; B (2) would make 5 > 4
    assert again.take_batch(0) is None and again.size == 2


def test_config_rules_name_both_fields():
    with pytest.raises(ConfigError, match="intake.batch_size.*intake.group_size"):
        load_config(IntakeConfig, overrides=["batch_size=6", "group_size=4"])


def short(traj: Trajectory) -> str | None:
    """A stand-in for Learner.reject_reason: fewer than 5 tokens cannot be trained."""
    return f"trajectory {traj.id}: {len(traj)} tokens" if len(traj) < 5 else None


def test_untrainable_trajectories_are_rejected_with_the_reason():
    intake = Intake(IntakeConfig(batch_size=1, group_size=1), check=short)
    assert intake.offer(traj("tiny", "g", 0, n_gen=1), 0) == "rejected"
    assert intake.last_rejection == "group g: trajectory tiny: 3 tokens"
    assert intake.offer(traj("ok", "g", 0), 0) == "buffered"
    assert intake.counters["rejected"] == 1 and intake.take_batch(0).ids == ["ok"]


def test_a_rejected_member_still_completes_its_group():
    intake = Intake(IntakeConfig(batch_size=2, group_size=2), check=short)
    intake.offer(traj("a1", "A", 0), 0)
    assert intake.offer(traj("a2", "A", 0, n_gen=1), 0) == "rejected"
    intake.offer(traj("b1", "B", 0), 0)
    intake.offer(traj("b2", "B", 0), 0)
    assert intake.take_batch(0).ids == ["a1"] and intake.take_batch(0).ids == ["b1", "b2"]


async def test_pump_acknowledges_used_ones_per_step_and_the_rest_at_checkpoint():
    from tidal.protocol.channels import TrajectoryReceiver, TrajectorySender
    from tidal.trainer.intake import IntakePump

    cfg = IntakeConfig(batch_size=2, group_size=2, commit="step")
    async with TrajectoryReceiver("tcp://127.0.0.1:0") as rx, TrajectorySender(rx.endpoint, "e0") as tx:
        intake = Intake(cfg)
        pump = IntakePump(rx, intake, lambda: 0)
        task = asyncio.create_task(pump.run())
        try:
            for t in [traj("a1", "A", 0), traj("b1", "B", 0), traj("a2", "A", 0), traj("a1", "A", 0)]:
                await tx.send(t)  # the last is a duplicate id under a new seq
            batch = await asyncio.wait_for(pump.next_batch(), 10)
            assert batch.ids == ["a1", "a2"]
            async with asyncio.timeout(10):
                while pump.uncommitted < 4:
                    await asyncio.sleep(0.01)
            pump.stepped()  # commit = "step": everything but the buffered b1
            assert pump.uncommitted == 1 and not await tx.flush(timeout=0.5) and tx.unacked == 1
            pump.covered_by_checkpoint(pump.pending())
            assert await tx.flush(timeout=5) and intake.counters["duplicate"] == 1
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def test_every_drop_is_named_once_with_its_reason_and_version():
    """The ledger's other half: each trajectory dropped on arrival or while waiting, by id."""
    intake = Intake(IntakeConfig(batch_size=2, max_staleness=0, group_size=1), check=short)
    assert intake.offer(traj("old", "g1", 1), version=2) == "stale"
    assert intake.offer(traj("tiny", "g2", 2, n_gen=0), version=2) == "rejected"
    intake.offer(traj("aged", "g3", 2), version=2)
    assert intake.take_batch(3) is None  # "aged" is now 1 step stale
    assert intake.take_drops() == [("old", "stale", 2), ("tiny", "rejected", 2), ("aged", "stale", 3)]
    assert intake.take_drops() == []
