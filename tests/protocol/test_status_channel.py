"""protocol/channels/status.py over real sockets: late joiners, restarts, heartbeats, bad frames."""

import asyncio

import msgspec
import pytest
import zmq
import zmq.asyncio
from tidal.protocol.channels import StatusPublisher, StatusSubscriber
from tidal.protocol.messages import DiskWeights, Pause, Resume, TrainerStatus, WeightsPublished, encode


@pytest.fixture(params=["tcp", "ipc"])
def endpoint(request, tmp_path):
    return "tcp://127.0.0.1:0" if request.param == "tcp" else f"ipc://{tmp_path}/status.sock"


async def _recv(sub: StatusSubscriber, timeout: float = 5.0):
    return await asyncio.wait_for(sub.recv(), timeout)


async def test_late_joiner_learns_the_current_state_at_once(endpoint):
    weights = WeightsPublished(version=3, source=DiskWeights("/ckpt/v3"), checksum="abc")
    # heartbeat_s is an hour: only the re-send on subscription can reach the late joiner in time.
    async with StatusPublisher(endpoint, heartbeat_s=3600) as pub:
        await pub.publish(TrainerStatus(version=2, consumed=64))
        await pub.publish(TrainerStatus(version=3, consumed=96))
        await pub.publish(weights)
        await pub.publish(Pause())
        async with StatusSubscriber(pub.endpoint) as sub:
            got = [await _recv(sub) for _ in range(3)]
            assert sorted(type(m).__name__ for m in got) == ["Pause", "TrainerStatus", "WeightsPublished"]
            assert sub.latest_status == TrainerStatus(version=3, consumed=96)  # the latest, not history
            assert sub.latest_weights == weights
            assert sub.latest_control == Pause()
            await pub.publish(Resume())
            assert await _recv(sub) == Resume()
            assert pub.stats.subscriptions >= 1


async def test_heartbeats_repeat_state_but_recv_sees_only_changes():
    async with StatusPublisher("tcp://127.0.0.1:0", heartbeat_s=0.02) as pub:
        async with StatusSubscriber(pub.endpoint) as sub:
            await pub.publish(TrainerStatus(version=1, consumed=8))
            assert await _recv(sub) == TrainerStatus(version=1, consumed=8)
            await asyncio.sleep(0.3)
            assert sub.stats.received > sub.stats.changes == 1  # heartbeats arrived, nothing changed
            with pytest.raises(TimeoutError):
                await _recv(sub, timeout=0.1)
            heard = sub.last_heard
            await asyncio.sleep(0.1)
            assert sub.last_heard > heard  # liveness from heartbeats


async def test_publisher_restart_and_subscriber_restart(endpoint):
    async with StatusPublisher(endpoint, heartbeat_s=3600) as pub:
        bound = pub.endpoint
        async with StatusSubscriber(bound) as sub:
            await pub.publish(TrainerStatus(version=1, consumed=8))
            assert (await _recv(sub)).version == 1
            await pub.__aexit__(None, None, None)
            # A new trainer incarnation on the same endpoint: the subscriber reconnects by itself,
            # its subscription reaches the new XPUB, which sends what it has.
            async with StatusPublisher(bound, heartbeat_s=3600) as pub2:
                await pub2.publish(TrainerStatus(version=5, consumed=40))
                assert (await _recv(sub)).version == 5
                async with StatusSubscriber(bound) as sub2:  # a restarted engine
                    assert (await _recv(sub2)).version == 5


async def test_slow_reader_keeps_the_latest_and_counts_drops():
    async with StatusPublisher("tcp://127.0.0.1:0", heartbeat_s=3600) as pub:
        async with StatusSubscriber(pub.endpoint, capacity=4) as sub:
            await pub.publish(TrainerStatus(version=0, consumed=0))
            await _recv(sub)
            for v in range(1, 11):
                await pub.publish(TrainerStatus(version=v, consumed=v))
            async with asyncio.timeout(5):
                while sub.latest_status.version != 10:
                    await asyncio.sleep(0.01)
            assert sub.stats.dropped == 6
            assert [(await _recv(sub)).version for _ in range(4)] == [7, 8, 9, 10]


async def test_bad_frames_are_counted_and_good_ones_still_arrive():
    ctx = zmq.asyncio.Context.instance()
    pub = ctx.socket(zmq.PUB)
    pub.linger = 0
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    try:
        async with StatusSubscriber(f"tcp://127.0.0.1:{port}") as sub:
            async with asyncio.timeout(5):
                while sub.latest_status is None:  # the slow-joiner window of a plain PUB
                    await pub.send(encode(TrainerStatus(version=4, consumed=1)))
                    await asyncio.sleep(0.05)
            assert (await _recv(sub)).version == 4
            before = sub.stats.rejected
            good = encode(TrainerStatus(version=5, consumed=2))
            wrong_version = msgspec.msgpack.encode({"type": "status", "version": 5, "consumed": 2, "schema_version": 9})
            for frame in [b"\xc1", good[:-2], wrong_version, good]:
                await pub.send(frame)
            assert (await _recv(sub)).version == 5
            assert sub.stats.rejected - before == 3
            assert "schema_version 9" in sub.stats.last_error
    finally:
        pub.close(linger=0)
