"""WeightSync's handling of distributed notices, against scripted SGLang servers (which join any group at
once): when the servers join, which notices are acted on, and what a failure leaves. The real broadcast,
with the trainer's publisher and `tidal serve`, is in tests/trainer/test_publish.py."""

import asyncio
import json

from tidal.engine.backends import SGLangBackend, SGLangConfig
from tidal.engine.weights import WeightSync
from tidal.protocol.messages import DiskWeights, DistributedWeights, WeightsPublished

from tests.engine.backends.fake_sglang import FakeSGLang

NAMES, DTYPES, SHAPES = ["a", "b", "c"], ["float32"] * 3, [[2], [3], [4]]


def notice(version: int, *, group_id: str = "g1", pending: bool = True, buckets=(2, 1), **src) -> WeightsPublished:
    fields = dict(master_address="127.0.0.1", master_port=29500, group_name="tidal_weights", world_size=2,
                  backend="gloo", names=NAMES, dtypes=DTYPES, shapes=SHAPES, buckets=list(buckets),
                  group_id=group_id, pending=pending) | src
    return WeightsPublished(version=version, source=DistributedWeights(**fields))


async def applied(sync: WeightSync, n: int) -> None:
    async with asyncio.timeout(30):
        while sync.updates + sync.failures < n:
            await asyncio.sleep(0.01)


class Engine:
    """A WeightSync over an SGLangBackend of one scripted server, running."""

    def __init__(self, server: FakeSGLang):
        self.backend = SGLangBackend(SGLangConfig(urls=[server.url], health_interval_s=60.0))
        self.served: list = []
        self.sync = WeightSync(self.backend, self.served.append)

    async def __aenter__(self) -> "Engine":
        await self.backend.start()
        self.task = asyncio.create_task(self.sync.run())
        return self

    async def __aexit__(self, *exc) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.backend.close()


async def test_servers_join_each_new_group_once_and_receive_in_the_trainers_buckets():
    async with FakeSGLang() as s, Engine(s) as e:
        e.sync.offer(notice(1))
        await applied(e.sync, 1)
        e.sync.offer(notice(2, buckets=()))  # same group: no join; no buckets given: one of everything
        await applied(e.sync, 2)
        e.sync.offer(notice(3, group_id="g2"))  # the trainer formed a new group: leave, join again
        await applied(e.sync, 3)
    assert e.served == [1, 2, 3] and e.sync.failures == 0
    assert [p for p, _ in s.bodies if "group" in p] == [
        "/destroy_weights_update_group", "/init_weights_update_group",  # joining leaves any stale group first
        "/destroy_weights_update_group",  # g1 left
        "/destroy_weights_update_group", "/init_weights_update_group"]
    assert [r["names"] for r in s.requests("/update_weights_from_distributed")] == [
        ["a", "b"], ["c"], ["a", "b", "c"], ["a", "b"], ["c"]]
    assert s.requests("/init_weights_update_group")[0] == {
        "master_address": "127.0.0.1", "master_port": 29500, "rank_offset": 1, "world_size": 2,
        "group_name": "tidal_weights", "backend": "gloo"}


async def test_a_closed_notice_is_not_acted_on_and_a_served_version_is_received_again():
    async with FakeSGLang(version="4") as s, Engine(s) as e:
        await e.sync.probe()
        e.sync.offer(notice(4, pending=False))  # a late subscriber's copy of a broadcast that is over
        await asyncio.sleep(0.1)
        assert not s.requests("/init_weights_update_group") and e.sync.updates == 0
        e.sync.offer(notice(4))  # a restored trainer re-broadcasts what is served: it waits for receivers
        await applied(e.sync, 1)
        assert len(s.requests("/update_weights_from_distributed")) == 2


async def test_a_malformed_notice_is_a_counted_failure_and_nothing_is_received():
    async with FakeSGLang() as s, Engine(s) as e:
        e.sync.offer(notice(1, buckets=(2, 2)))
        await applied(e.sync, 1)
        assert e.sync.failures == 1 and "buckets [2, 2] do not cut its 3 tensors" in e.sync.last_error
        e.sync.offer(notice(2, dtypes=["float32"]))
        await applied(e.sync, 2)
        assert "3 names, 1 dtypes and 3 shapes" in e.sync.last_error
        assert not s.requests("/init_weights_update_group") and not s.requests("/update_weights_from_distributed")


async def test_a_failed_bucket_leaves_the_group_and_the_next_notice_joins_again():
    async with FakeSGLang() as s, Engine(s) as e:
        e.sync.offer(notice(1))
        await applied(e.sync, 1)
        s.failing = {"/update_weights_from_distributed"}
        e.sync.offer(notice(2))
        await applied(e.sync, 2)
        assert e.sync.failures == 1 and "version 2" in e.sync.last_error
        s.failing = set()
        e.sync.offer(notice(3))  # same group id, but the servers left it: they join again
        await applied(e.sync, 3)
    assert e.served[-1] == 3 and e.sync.updates == 2
    assert len(s.requests("/init_weights_update_group")) == 2


async def test_a_failed_disk_update_is_tried_again_until_it_lands_and_a_newer_notice_replaces_it():
    """One lost call (a pause refused, a connection reset) must not leave the servers behind for good:
    the trainer publishes again only after new data, which admission withholds from servers too far behind."""
    async with FakeSGLang() as s, Engine(s) as e:
        s.failing = {"/pause_generation"}
        e.sync.offer(WeightsPublished(version=1, source=DiskWeights(path="/w/1")))
        await applied(e.sync, 2)  # the failure and its first retry
        assert e.sync.updates == 0 and e.sync.retries >= 1 and "version 1" in e.sync.last_error
        s.failing = set()
        async with asyncio.timeout(30):
            while e.sync.updates < 1:
                await asyncio.sleep(0.01)
        assert e.served[-1] == 1 and s.version == "1"
        s.failing = {"/update_weights_from_disk"}
        e.sync.offer(WeightsPublished(version=2, source=DiskWeights(path="/w/2")))
        async with asyncio.timeout(30):
            while e.sync.failures < 3:
                await asyncio.sleep(0.01)
        s.failing = set()
        e.sync.offer(WeightsPublished(version=3, source=DiskWeights(path="/w/3")))  # supersedes 2's retries
        async with asyncio.timeout(30):
            while e.sync.updates < 2:
                await asyncio.sleep(0.01)
        await asyncio.sleep(1.5)  # past 2's next retry time: it must not come back
    loads = [json.loads(body)["model_path"] for path, body in s.bodies if path == "/update_weights_from_disk"]
    assert loads[-1] == "/w/3" and e.served[-1] == 3 and e.sync.updates == 2
