"""protocol/channels/trajectories.py over real sockets on loopback (tcp and ipc), in one process.

The multi-process SIGKILL test is test_kill_restart.py; these pin down each rule on its own.
"""

import asyncio

import msgspec
import numpy as np
import pytest
import zmq
import zmq.asyncio
from _actors import make_trajectory
from tidal.protocol.channels import DedupState, TrajectoryReceiver, TrajectorySender
from tidal.protocol.channels.frames import (
    Ack,
    Data,
    decode_envelope,
    encode_frame,
    trajectory_frames,
    trajectory_from_frames,
)
from tidal.protocol.messages import PACKED_FIELDS, Trajectory, Turn


@pytest.fixture(params=["tcp", "ipc"])
def endpoint(request, tmp_path):
    return "tcp://127.0.0.1:0" if request.param == "tcp" else f"ipc://{tmp_path}/rx.sock"


async def _drain(rx: TrajectoryReceiver, n: int, timeout: float = 10.0) -> list:
    async with asyncio.timeout(timeout):
        return [await rx.recv() for _ in range(n)]


async def test_two_engines_each_trajectory_once_in_order(endpoint):
    async with TrajectoryReceiver(endpoint, auto_commit=True) as rx:
        async with (
            TrajectorySender(rx.endpoint, "e0", window=16) as tx0,
            TrajectorySender(rx.endpoint, "e1", window=16) as tx1,
        ):
            async def produce(tx, n):
                return [await tx.send(make_trajectory(f"{tx.engine_id}-{i}")) for i in range(n)]

            consumer = asyncio.create_task(_drain(rx, 300))
            seqs = await asyncio.gather(produce(tx0, 150), produce(tx1, 150))
            got = await consumer
            assert await tx0.flush(5) and await tx1.flush(5)
    assert seqs == [list(range(1, 151))] * 2
    for engine in ("e0", "e1"):
        mine = [d for d in got if d.engine_id == engine]
        assert [d.seq for d in mine] == list(range(1, 151))
        assert [d.traj.id for d in mine] == [f"{engine}-{i}" for i in range(150)]
    assert (rx.stats.delivered, rx.stats.committed, rx.stats.duplicates, rx.stats.rejected) == (300, 300, 0, 0)
    assert (tx0.stats.sent, tx0.stats.acked, tx0.unacked) == (150, 150, 0)


async def test_window_back_pressure_until_commit():
    async with TrajectoryReceiver("tcp://127.0.0.1:0", capacity=4) as rx:
        async with TrajectorySender(rx.endpoint, "e0", window=8) as tx:
            for i in range(8):
                await tx.send(make_trajectory(f"t{i}"))
            ninth = asyncio.create_task(tx.send(make_trajectory("t8")))
            async with asyncio.timeout(5):
                while rx.queued < 4:
                    await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)
            assert not ninth.done()  # the window is full: the engine waits
            assert tx.unacked == 8
            assert rx.queued == 4  # the receiver read no more than its capacity
            got = await _drain(rx, 8)
            assert not ninth.done()  # delivered is not committed: still no room
            rx.commit(got[:3])
            assert await asyncio.wait_for(ninth, 5) == 9
            assert tx.unacked == 6  # 8 - 3 committed + the ninth
            assert not await tx.flush(timeout=0.2)
            rx.commit(got[3:] + await _drain(rx, 1))
            assert await tx.flush(timeout=5)


async def test_full_window_reopens_once_an_eighth_is_committed():
    async with TrajectoryReceiver("tcp://127.0.0.1:0") as rx:
        async with TrajectorySender(rx.endpoint, "e0", window=16) as tx:
            for i in range(16):
                await tx.send(make_trajectory(f"t{i}"))
            blocked = asyncio.create_task(tx.send(make_trajectory("t16")))
            got = await _drain(rx, 16)
            rx.commit(got[:1])
            async with asyncio.timeout(5):
                while tx.unacked > 15:
                    await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)
            assert not blocked.done()  # one free slot of 16: not yet reopened
            rx.commit(got[1:2])
            assert await asyncio.wait_for(blocked, 5) == 17
            assert tx.unacked == 15
            rx.commit(got[2:] + await _drain(rx, 1))
            assert await tx.flush(timeout=5)


async def test_commit_while_the_reader_waits_for_room_is_acked_at_once():
    async with TrajectoryReceiver("tcp://127.0.0.1:0", capacity=2) as rx:
        async with TrajectorySender(rx.endpoint, "e0", window=8) as tx:
            for i in range(6):
                await tx.send(make_trajectory(f"t{i}"))
            held = await _drain(rx, 2)
            async with asyncio.timeout(5):
                while rx.queued < 2:  # the reader refilled the queue and waits for room again
                    await asyncio.sleep(0.01)
            rx.commit(held)
            async with asyncio.timeout(5):
                while tx.unacked > 4:
                    await asyncio.sleep(0.01)
            assert rx.queued == 2
            rx.commit(await _drain(rx, 4))
            assert await tx.flush(timeout=5)


async def test_checkpointed_consumer_restart_loses_and_repeats_nothing(endpoint):
    rx1 = TrajectoryReceiver(endpoint)
    await rx1.__aenter__()
    async with TrajectorySender(rx1.endpoint, "e0", heartbeat_s=0.05, resend_after_s=30) as tx:
        for i in range(10):
            await tx.send(make_trajectory(f"t{i}"))
        first = await _drain(rx1, 10)
        rx1.commit(first[:4])  # acknowledged: the engine may forget them
        async with asyncio.timeout(5):
            while tx.unacked != 6:
                await asyncio.sleep(0.01)
        # Trajectories 4..7 reach the checkpoint, but the trainer dies before acknowledging them;
        # 8 and 9 were received and never made durable.
        saved = msgspec.msgpack.encode(rx1.dedup_state(including=first[4:8]))
        rx1._tasks[1].cancel()  # the ack task dies first, as under SIGKILL
        await rx1.__aexit__(None, None, None)
        state = msgspec.msgpack.decode(saved, type=DedupState)
        async with TrajectoryReceiver(rx1.endpoint, dedup_state=state, auto_commit=True) as rx2:
            again = await _drain(rx2, 2)
            assert await tx.flush(timeout=5)
            assert [d.traj.id for d in again] == ["t8", "t9"]
            assert rx2.queued == 0
        # The new incarnation's first Ack carried the checkpointed state: 4..7 were acknowledged
        # without travelling again, and only 8 and 9 were resent.
        assert (tx.stats.acked, tx.stats.resent, rx2.stats.duplicates) == (10, 2, 0)


async def test_report_now_reaches_the_trainer_long_before_the_next_heartbeat():
    # an engine out of grant reports its ended episodes at once (the trainer grants on that report), not
    # heartbeat_s later; the receiver says a report came by setting `reported`
    counts = [256, 256, 256]  # started, in flight, capacity
    async with TrajectoryReceiver("tcp://127.0.0.1:0", auto_commit=True) as rx:
        async with TrajectorySender(rx.endpoint, "e0", heartbeat_s=600, report=lambda: tuple(counts)) as tx:
            await tx.send(make_trajectory("t0"))  # connected: a heartbeat is never queued for a trainer not there
            await _drain(rx, 1)
            assert await tx.flush(5)
            for in_flight in (256, 40):
                counts[1] = in_flight
                tx.report_now()
                async with asyncio.timeout(10):
                    while not rx.engines or next(iter(rx.engines.values()))[0].in_flight != in_flight:
                        rx.reported.clear()
                        await rx.reported.wait()
                [(hello, _)] = rx.engines.values()
                assert (hello.started, hello.in_flight, hello.capacity) == (256, in_flight, 256)


async def test_restarted_engine_is_a_new_stream():
    async with TrajectoryReceiver("tcp://127.0.0.1:0", auto_commit=True) as rx:
        consumer = asyncio.create_task(_drain(rx, 2))
        async with TrajectorySender(rx.endpoint, "e0", epoch=1) as tx:
            await tx.send(make_trajectory("old-1"))
            assert await tx.flush(5)
        async with TrajectorySender(rx.endpoint, "e0", epoch=2) as tx:
            assert await tx.send(make_trajectory("new-1")) == 1  # seq starts again
            assert await tx.flush(5)
        got = await consumer
    assert [(d.traj.id, d.epoch, d.seq) for d in got] == [("old-1", 1, 1), ("new-1", 2, 1)]
    assert rx.stats.duplicates == 0


async def test_resend_after_timeout_when_the_trainer_never_saw_it():
    """A scripted trainer drops the first copy (as a broken connection would) and reports seen=0."""
    ctx = zmq.asyncio.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    port = router.bind_to_random_port("tcp://127.0.0.1")
    try:
        async with TrajectorySender(f"tcp://127.0.0.1:{port}", "e0", resend_after_s=0.3, heartbeat_s=0.05) as tx:
            await tx.send(make_trajectory("t0"))
            copies = 0
            async with asyncio.timeout(5):
                while copies < 2:
                    peer, *frames = await router.recv_multipart()
                    env = decode_envelope(frames[0])
                    if isinstance(env, Data):
                        copies += 1
                        assert trajectory_from_frames(*frames[1:]).id == "t0"
                    committed = 1 if copies == 2 else 0
                    await router.send_multipart([peer, encode_frame(Ack(7, tx.epoch, committed, [], committed, []))])
            assert await tx.flush(5)
            assert tx.stats.resent == 1
            # Garbage from the trainer side is counted and ignored.
            await router.send_multipart([peer, b"\xc1garbage"])
            async with asyncio.timeout(5):
                while tx.stats.rejected == 0:
                    await asyncio.sleep(0.01)
            assert "ack" in tx.stats.last_error
    finally:
        router.close(linger=0)


async def test_cancelled_recv_loses_nothing():
    async with TrajectoryReceiver("tcp://127.0.0.1:0", auto_commit=True) as rx:
        waiting = asyncio.create_task(rx.recv())
        await asyncio.sleep(0.05)
        waiting.cancel()
        async with TrajectorySender(rx.endpoint, "e0") as tx:
            await tx.send(make_trajectory("t0"))
            assert (await _drain(rx, 1))[0].traj.id == "t0"
            assert await tx.flush(5)


async def test_bad_payload_is_rejected_acked_and_the_stream_moves_on():
    ctx = zmq.asyncio.Context.instance()
    async with TrajectoryReceiver("tcp://127.0.0.1:0", auto_commit=True) as rx:
        dealer = ctx.socket(zmq.DEALER)
        dealer.linger = 0
        dealer.connect(rx.endpoint)
        try:
            good = trajectory_frames(make_trajectory("good"))
            await dealer.send_multipart([encode_frame(Data("raw", 1, 1, 1)), *good[:-1], good[-1][:-4]])
            await dealer.send_multipart([encode_frame(Data("raw", 1, 2, 1)), *good])
            got = await _drain(rx, 1)
            assert (got[0].traj.id, got[0].seq) == ("good", 2)
            assert rx.stats.rejected == 1 and "raw/1/1" in rx.stats.last_error
            async with asyncio.timeout(5):  # the bad one is acknowledged: its sender stops resending it
                while msgspec.msgpack.decode(await dealer.recv(), type=Ack).committed != 2:
                    pass
        finally:
            dealer.close(linger=0)


async def test_a_reward_that_disagrees_with_its_turns_is_rejected_counted_and_acknowledged():
    ctx = zmq.asyncio.Context.instance()
    async with TrajectoryReceiver("tcp://127.0.0.1:0", auto_commit=True) as rx:
        dealer = ctx.socket(zmq.DEALER)
        dealer.linger = 0
        dealer.connect(rx.endpoint)
        try:
            head, arrays = trajectory_frames(make_trajectory("split"))  # one turn, reward 1.0
            fields = msgspec.msgpack.decode(head)
            assert fields["reward"] == 1.0 and [t[2] for t in fields["turns"]] == [1.0]
            bad = msgspec.msgpack.encode({**fields, "reward": 3.0})  # as if an env reported a second score
            await dealer.send_multipart([encode_frame(Data("raw", 1, 1, 1)), bad, arrays])
            await dealer.send_multipart([encode_frame(Data("raw", 1, 2, 1)), head, arrays])
            got = await _drain(rx, 1)
            assert (got[0].traj.id, got[0].seq) == ("split", 2)
            assert rx.stats.rejected == 1
            assert "trajectory split: reward 3.0 is not the sum of its 1 turn rewards (1.0)" in rx.stats.last_error
            async with asyncio.timeout(5):  # acknowledged: the sender would stop resending it
                while msgspec.msgpack.decode(await dealer.recv(), type=Ack).committed != 2:
                    pass
        finally:
            dealer.close(linger=0)


async def test_reused_payload_buffers_never_corrupt_large_trajectories():
    """Acknowledged payload buffers are reused for later trajectories: no content may leak across."""
    n = 8192  # ~106 kB per frame

    def big(i: int):
        return Trajectory.build(
            id=f"t{i}", group_id="g", env_id="e", task_seed=i, tokens=[i] * n, loss_mask=[1] * n,
            behav_logp=[-0.5] * n, versions=[i] * n, turns=[Turn(0, n, float(i))], reward=float(i),
        )

    async with TrajectoryReceiver("tcp://127.0.0.1:0", auto_commit=True) as rx:
        async with TrajectorySender(rx.endpoint, "e0", window=4) as tx:
            consumer = asyncio.create_task(_drain(rx, 40))
            for i in range(40):
                await tx.send(big(i))
            got = await consumer
            assert await tx.flush(5)
    for i, d in enumerate(got):
        assert d.traj.id == f"t{i}" and d.traj.reward == i
        assert (d.traj.token_ids() == i).all() and (d.traj.token_versions() == i).all()
    assert tx.stats.resent == 0


async def test_overlapping_incarnations_of_one_engine_each_get_their_acks():
    async with TrajectoryReceiver("tcp://127.0.0.1:0", auto_commit=True) as rx:
        consumer = asyncio.create_task(_drain(rx, 40))
        async with (
            TrajectorySender(rx.endpoint, "e0", epoch=1, window=4) as old,
            TrajectorySender(rx.endpoint, "e0", epoch=2, window=4) as new,
        ):
            async def produce(tx):
                for i in range(20):
                    await tx.send(make_trajectory(f"{tx.epoch}-{i}"))
                return await tx.flush(5)

            assert await asyncio.gather(produce(old), produce(new)) == [True, True]
        got = await consumer
    assert sorted(d.traj.id for d in got) == sorted(f"{e}-{i}" for e in (1, 2) for i in range(20))


async def test_receiver_without_state_meets_a_long_running_engine():
    """No checkpoint on the trainer side: the envelope's floor (everything below it is committed)
    sets the watermark, so seqs far from 1 are accepted and the dedup memory stays O(1)."""
    ctx = zmq.asyncio.Context.instance()
    async with TrajectoryReceiver("tcp://127.0.0.1:0", auto_commit=True) as rx:
        dealer = ctx.socket(zmq.DEALER)
        dealer.linger = 0
        dealer.connect(rx.endpoint)
        try:
            payload = trajectory_frames(make_trajectory("late"))
            for seq in (1_000_001, 1_000_002):
                await dealer.send_multipart([encode_frame(Data("old", 5, seq, 1_000_001)), *payload])
            got = await _drain(rx, 2)
            assert [d.seq for d in got] == [1_000_001, 1_000_002]
            mark = rx.dedup_state().streams[0]
            assert (mark.upto, mark.above) == (1_000_002, [])
            await dealer.send_multipart([encode_frame(Data("old", 5, 1_000_000, 1_000_000)), *payload])
            await dealer.send_multipart([encode_frame(Data("old", 5, 1_000_003, 1_000_003)), *payload])
            assert (await _drain(rx, 1))[0].seq == 1_000_003  # 1_000_000 lay below the floor: a duplicate
            assert rx.stats.duplicates == 1
        finally:
            dealer.close(linger=0)


def _big(i: int, n: int = 8192) -> Trajectory:
    rng = np.random.default_rng(i)
    mask = rng.integers(0, 2, n)
    return Trajectory.build(
        id=f"t{i}", group_id="g", env_id="e", task_seed=i, tokens=rng.integers(0, 1 << 32, n, dtype=np.uint32),
        loss_mask=mask, behav_logp=np.where(mask, -rng.random(n), 0), versions=np.where(mask, i, -1),
        turns=[], reward=0.0,
    )


def test_built_arrays_go_as_one_view_of_their_buffer_and_others_as_a_copy():
    traj = _big(0)
    head, arrays = trajectory_frames(traj)
    assert arrays.obj is traj.tokens.obj  # the very buffer Trajectory.build filled: no copy
    assert bytes(arrays) == b"".join(bytes(getattr(traj, f)) for f in PACKED_FIELDS)
    # The same buffer's arrays out of order (logp and versions swapped) must not be sent as laid out.
    swapped = msgspec.structs.replace(
        traj, behav_logp=traj.versions, versions=traj.behav_logp, min_version=-1, max_version=-1
    )
    _, copied = trajectory_frames(swapped)
    assert not isinstance(copied, memoryview)
    assert bytes(copied) == b"".join(bytes(getattr(swapped, f)) for f in PACKED_FIELDS)
    assert trajectory_from_frames(head, arrays) == traj


async def test_large_trajectories_arrive_as_sent_whatever_their_buffers():
    """Built (one buffer, sent as a view), assembled from separate arrays, and decoded-then-forwarded
    trajectories all arrive with exactly the sender's arrays."""
    built = [_big(i) for i in range(3)]
    separate = [
        Trajectory(**{**msgspec.structs.asdict(t), **{f: bytes(getattr(t, f)) for f in PACKED_FIELDS}})
        for t in built
    ]
    async with TrajectoryReceiver("tcp://127.0.0.1:0", auto_commit=True) as rx:
        async with TrajectorySender(rx.endpoint, "e0", window=4) as tx:
            consumer = asyncio.create_task(_drain(rx, 6))
            for t in built + separate:
                await tx.send(t)
            first = await consumer
            assert await tx.flush(5)
            forwarded = asyncio.create_task(_drain(rx, 3))
            for d in first[:3]:  # their arrays are views into received frames
                await tx.send(d.traj)
            got = first + await forwarded
            assert await tx.flush(5)
    for d, t in zip(got, built + separate + built, strict=True):
        assert d.traj == t
        for f in PACKED_FIELDS:
            assert bytes(getattr(d.traj, f)) == bytes(getattr(t, f))
