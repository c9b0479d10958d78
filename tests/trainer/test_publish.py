"""Weight publishing against the CPU reference server (`tidal serve`): disk and gloo broadcast.

Most tests publish the tiny model with its output head negated, so greedy decoding must change
(argmax becomes argmin), then check the served tokens changed and the server's weight_version. One
goes the whole loop with a trained learner: publish, serve, and the served log-probabilities of the
server's own samples are the learner's.
"""

import asyncio
import hashlib
from pathlib import Path

import aiohttp
import msgspec
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tidal.engine.reference.launch import ReferenceServer
from tidal.protocol.config import load_config
from tidal.protocol.messages import DiskWeights, DistributedWeights, Trajectory, Turn
from tidal.trainer.config import DiskPublish, DistributedPublish
from tidal.trainer.learner import Learner, LearnerConfig
from tidal.trainer.publish import DiskPublisher, DistributedPublisher, PublishError

from tests.trainer.test_learner import batch_of

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


def test_write_publishes_synchronously(tmp_path, tiny_model_dir):
    # DiskPublisher.write is publish without an event loop (scripts, a checkpoint converter, tests)
    publisher = DiskPublisher(DiskPublish(dir=str(tmp_path / "weights"), keep_last=1), str(tiny_model_dir))
    tensors = flipped(tiny_model_dir)
    notice = publisher.write(3, tensors)
    path = Path(notice.source.path)
    assert notice.version == 3 and path == (tmp_path / "weights" / "v00000003").resolve()
    assert (path / "config.json").exists() and notice.nbytes == (path / "model.safetensors").stat().st_size
    assert notice.checksum == "sha256:" + hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
    torch.testing.assert_close(load_file(path / "model.safetensors")["lm_head.weight"], tensors["lm_head.weight"],
                               rtol=0, atol=0)
    publisher.write(4, tensors)
    assert [p.name for p in (tmp_path / "weights").iterdir()] == ["v00000004"]  # keep_last = 1


async def served_sample(http: aiohttp.ClientSession, url: str, temperature: float) -> tuple[list[int], list[float], str]:
    """12 tokens sampled after PROMPT at `temperature` (full vocabulary), their logprobs, the weight version."""
    body = {"input_ids": PROMPT, "return_logprob": True,
            "sampling_params": {"temperature": temperature, "top_p": 1.0, "top_k": -1, "max_new_tokens": 12,
                                "ignore_eos": True}}
    async with http.post(f"{url}/generate", json=body) as resp:
        assert resp.status == 200, await resp.text()
        out = await resp.json()
    async with http.get(f"{url}/model_info") as resp:
        version = (await resp.json())["weight_version"]
    return out["output_ids"], [lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]], version


async def test_publish_serve_and_the_learner_scores_the_served_tokens_as_the_server_did(tmp_path, tiny_model_dir):
    # The loop the trainer's importance weights rest on: the learner trains a step and publishes it
    # (DiskPublisher), the server loads it (/update_weights_from_disk) and samples; the mu it returns
    # must be the learner's own log-probability of those tokens (Learner.logprobs, packed as a step
    # packs them, at the trajectory's temperature), so pi_prox / mu is 1 on fresh data.
    overrides = [f"model.path={tiny_model_dir}", "optim.lr=1e-2", "advantage.type=grpo"]
    learner = Learner(load_config(LearnerConfig, overrides=overrides))
    learner.train_step(batch_of(4, seed=11))
    publisher = DiskPublisher(DiskPublish(dir=str(tmp_path / "weights")), str(tiny_model_dir))
    notice = await publisher.publish(learner.version, dict(learner.named_weights()))
    temperature = 0.8
    async with ReferenceServer(tiny_model_dir) as srv, aiohttp.ClientSession() as http:
        req = {"model_path": notice.source.path, "weight_version": str(notice.version)}
        async with http.post(f"{srv.url}/update_weights_from_disk", json=req) as resp:
            assert resp.status == 200, await resp.text()
        ids, mu, version = await served_sample(http, srv.url, temperature)
    assert version == "1" and len(ids) == len(mu) == 12
    n = len(PROMPT) + len(ids)
    mask = np.r_[np.zeros(len(PROMPT)), np.ones(len(ids))].astype(np.uint8)
    traj = Trajectory.build(
        id="served-0", group_id="g", env_id="test", task_seed=0, tokens=PROMPT + ids, loss_mask=mask,
        behav_logp=np.r_[np.zeros(len(PROMPT)), mu], versions=np.where(mask == 1, 1, -1),
        turns=[Turn(len(PROMPT), n, 0.0)], reward=0.0,
        sampling={"temperature": temperature, "top_p": 1.0, "top_k": -1},
    )
    got = learner.logprobs([traj])[0][mask == 1]
    np.testing.assert_allclose(got, mu, atol=1e-5, rtol=0)
    # the comparison has teeth: the base weights (what the server held before) score them otherwise
    base = Learner(load_config(LearnerConfig, overrides=overrides)).logprobs([traj])[0][mask == 1]
    assert np.abs(base - np.asarray(mu)).max() > 1e-3
