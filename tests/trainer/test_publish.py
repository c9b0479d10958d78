"""Weight publishing against the CPU reference server (`tidal serve`): disk and gloo broadcast.

Each test publishes the tiny model with its output head negated, so greedy decoding must change
(argmax becomes argmin), then checks the served tokens changed and the server's weight_version.
"""

import asyncio

import aiohttp
import msgspec
import pytest
from safetensors.torch import load_file
from tidal.engine.reference.launch import ReferenceServer
from tidal.protocol.messages import DiskWeights, DistributedWeights
from tidal.trainer.config import DiskPublish, DistributedPublish
from tidal.trainer.publish import DiskPublisher, DistributedPublisher, PublishError

pytestmark = pytest.mark.slow

PROMPT = [40, 41, 42, 43, 44]


def flipped(model_dir) -> dict:
    tensors = load_file(f"{model_dir}/model.safetensors")
    tensors["lm_head.weight"] = -tensors["lm_head.weight"]
    return tensors


async def greedy(http: aiohttp.ClientSession, url: str) -> tuple[list[int], str]:
    body = {"input_ids": PROMPT, "sampling_params": {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}}
    async with http.post(f"{url}/generate", json=body) as resp:
        assert resp.status == 200, await resp.text()
        out = await resp.json()
    async with http.get(f"{url}/model_info") as resp:
        info = await resp.json()
    return out["output_ids"], info["weight_version"]


async def test_disk_publish_then_update_weights_from_disk_changes_outputs(tmp_path, tiny_model_dir):
    publisher = DiskPublisher(DiskPublish(dir=str(tmp_path / "weights"), keep_last=2), str(tiny_model_dir))
    tensors = flipped(tiny_model_dir)
    async with ReferenceServer(tiny_model_dir) as srv, aiohttp.ClientSession() as http:
        before, _ = await greedy(http, srv.url)
        notice = await publisher.publish(7, tensors)
        assert isinstance(notice.source, DiskWeights) and notice.version == 7
        assert notice.nbytes == publisher.last_bytes > sum(t.numel() * 4 for t in tensors.values())  # + header
        assert notice.checksum.startswith("sha256:")
        req = {"model_path": notice.source.path, "weight_version": str(notice.version)}
        async with http.post(f"{srv.url}/update_weights_from_disk", json=req) as resp:
            assert resp.status == 200, await resp.text()
        after, version = await greedy(http, srv.url)
    assert version == "7"
    assert after != before
    for v in (8, 9):  # keep_last = 2
        await publisher.publish(v, tensors)
    assert sorted(p.name for p in (tmp_path / "weights").iterdir()) == ["v00000008", "v00000009"]


async def test_gloo_broadcast_publish_changes_served_outputs(tiny_model_dir):
    tensors = flipped(tiny_model_dir)
    async with ReferenceServer(tiny_model_dir) as srv, aiohttp.ClientSession() as http:
        before, _ = await greedy(http, srv.url)
        cfg = DistributedPublish(servers=[srv.url], group_name="tidal_test", bucket_mb=0.1, timeout_s=60)
        publisher = DistributedPublisher(cfg)
        await publisher.start()
        try:
            assert publisher.port > 0 and len(publisher._buckets(tensors)) > 1  # several buckets of <= 0.1 MiB
            notice = await publisher.publish(3, tensors)
            after, version = await greedy(http, srv.url)
            assert isinstance(notice.source, DistributedWeights)
            assert notice.source.names == list(tensors) and notice.source.world_size == 2
            assert notice.nbytes == sum(t.numel() * t.element_size() for t in tensors.values())
            assert version == "3" and after != before
            # a second publish over the same group, as flat buckets, restores the original outputs
            publisher.cfg = msgspec.structs.replace(cfg, flatten=True)
            await publisher.publish(4, load_file(f"{tiny_model_dir}/model.safetensors"))
            again, version = await greedy(http, srv.url)
            assert version == "4" and again == before
            # the server restarts (same URL, no group): that publish fails naming it, the next re-forms
            await asyncio.to_thread(srv.restart)
            with pytest.raises(PublishError, match=f"publishing version 5 to {srv.url} failed"):
                await publisher.publish(5, tensors)
            await publisher.publish(6, tensors)
            after_restart, version = await greedy(http, srv.url)
            assert version == "6" and after_restart == after
        finally:
            await publisher.close()
        async with http.post(f"{srv.url}/destroy_weights_update_group", json={"group_name": "tidal_test"}) as resp:
            assert resp.status == 400  # close() already left the group on the server
