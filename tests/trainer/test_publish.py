"""Weight publishing against the CPU reference server (`tidal serve`): disk and gloo broadcast.

A distributed publish runs both of its halves for real: the trainer's DistributedPublisher (rank 0,
announce then broadcast) and the engine's WeightSync over the sglang backend, which has the servers
join and receive under its pause policy (tests/trainer/engine_side.py).

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
from tidal.engine.backends import Request, Sampling
from tidal.engine.reference.launch import ReferenceServer
from tidal.protocol.config import load_config
from tidal.protocol.messages import DiskWeights, DistributedWeights, Trajectory, Turn
from tidal.trainer.config import DiskPublish, DistributedPublish
from tidal.trainer.learner import Learner, LearnerConfig
from tidal.trainer.publish import DiskPublisher, DistributedPublisher, PublishError
from transformers import AutoModelForCausalLM

from tests.trainer.engine_side import EngineSide
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
    # The trainer announces and broadcasts; the engine (WeightSync + sglang backend) has the server
    # join and receive each bucket. The trainer never calls the server.
    tensors = flipped(tiny_model_dir)
    async with (
        ReferenceServer(tiny_model_dir) as srv, aiohttp.ClientSession() as http,
        EngineSide([srv.url]) as engine,
    ):
        before, _ = await greedy(http, srv.url)
        cfg = DistributedPublish(server_ranks=1, group_name="tidal_test", bucket_mb=0.1, timeout_s=60)
        publisher = DistributedPublisher(cfg, engine.announce)
        await publisher.start()
        try:
            notice = await publisher.publish(3, tensors)
            await engine.settled(1)
            after, version = await greedy(http, srv.url)
            src = notice.source
            assert isinstance(src, DistributedWeights) and not src.pending
            (announced,) = engine.notices  # announced before the broadcast; the daemon sends the closed one
            assert announced.source == msgspec.structs.replace(src, pending=True)
            assert src.names == list(tensors) and src.world_size == 2 and publisher.port > 0
            assert len(src.buckets) > 1 and sum(src.buckets) == len(tensors)  # several buckets of <= 0.1 MiB
            assert notice.nbytes == sum(t.numel() * t.element_size() for t in tensors.values())
            assert version == "3" and after != before and engine.served[-1] == 3
            # a second publish over the same group, as flat buckets, restores the original outputs
            publisher.cfg = msgspec.structs.replace(cfg, flatten=True)
            again_notice = await publisher.publish(4, load_file(f"{tiny_model_dir}/model.safetensors"))
            await engine.settled(2)
            again, version = await greedy(http, srv.url)
            assert again_notice.source.flatten and again_notice.source.group_id == src.group_id
            assert version == "4" and again == before and engine.sync.updates == 2
            # the server restarts (same URL, not in the group): that publish fails on both sides, the
            # engine leaves the group, and the next publish forms a new one that the server joins
            await asyncio.to_thread(srv.restart)
            with pytest.raises(PublishError, match="publishing version 5 over group 'tidal_test'"):
                await publisher.publish(5, tensors)
            await engine.settled(3)
            assert engine.sync.failures == 1 and "version 5" in engine.sync.last_error
            last = await publisher.publish(6, tensors)
            await engine.settled(4)
            after_restart, version = await greedy(http, srv.url)
            assert last.source.group_id != src.group_id
            assert version == "6" and after_restart == after and engine.healthy() == {srv.url: True}
        finally:
            await publisher.close()


class _Crash(DistributedPublisher):
    """Kills `victim` right after the first bucket of the next publish is sent: a crash mid-update."""

    victim: ReferenceServer | None = None

    def _broadcast(self, bucket) -> None:
        super()._broadcast(bucket)
        if self.victim is not None:
            self.victim.kill()
            self.victim = None


async def test_a_server_killed_mid_update_is_ejected_until_it_serves_the_latest_version(tiny_model_dir):
    tensors = flipped(tiny_model_dir)
    async with (
        ReferenceServer(tiny_model_dir) as a, ReferenceServer(tiny_model_dir) as b,
        aiohttp.ClientSession() as http, EngineSide([a.url, b.url]) as engine,
    ):
        cfg = DistributedPublish(server_ranks=2, group_name="tidal_crash", bucket_mb=0.05, timeout_s=20)
        publisher = _Crash(cfg, engine.announce)
        try:
            await publisher.publish(1, tensors)
            await engine.settled(1)
            assert engine.served[-1] == 1 and engine.healthy() == {a.url: True, b.url: True}
            publisher.victim = b
            with pytest.raises(PublishError, match="publishing version 2"):
                await publisher.publish(2, load_file(f"{tiny_model_dir}/model.safetensors"))
            await engine.settled(2)
            # b is gone; a took bucket 1 of version 2 and no more: weights of no version, so it is out too
            assert engine.sync.failures == 1 and engine.healthy() == {a.url: False, b.url: False}
            stats = engine.backend.stats()
            assert stats["ejections"] == 2 and stats["errors_update_weights_from_distributed"] >= 1
            # b comes back serving the base weights (version 0): health probes alone do not admit it
            assert not engine.backend.stats().get("readmissions_refused")  # b down, a paused (its /health waits)
            await asyncio.to_thread(b.restart)
            async with asyncio.timeout(60):
                while not engine.backend.stats().get("readmissions_refused"):
                    await asyncio.sleep(0.05)  # until a probe has found b healthy
            assert engine.healthy() == {a.url: False, b.url: False}
            # the next version reaches both, which puts both back in rotation
            await publisher.publish(3, tensors)
            await engine.settled(3)
            assert engine.healthy() == {a.url: True, b.url: True}
            assert engine.backend.stats()["readmissions"] == 2 and engine.served[-1] == 3
            assert await engine.backend.weight_version() == {a.url: 3, b.url: 3}
            for url in (a.url, b.url):
                out, version = await greedy(http, url)
                assert version == "3"
        finally:
            await publisher.close()


async def test_an_update_under_retract_gives_every_token_the_version_that_produced_it(tiny_model_dir):
    # Greedy generations stream while version 1 is broadcast under pause_mode = "retract": each one's
    # first tokens carry 0 and its last ones 1, and every token is what the weights of its version
    # choose after all the tokens before it (a retracted request recomputes its KV under the new
    # weights), which a forward pass of each version over the whole sequence checks.
    n_tokens, prompts = 600, [[30 + i, 31, 32, 33] for i in range(4)]
    base = load_file(f"{tiny_model_dir}/model.safetensors")
    async with (
        ReferenceServer(tiny_model_dir) as srv,
        EngineSide([srv.url], pause_mode="retract", weight_update="pause") as engine,
    ):
        received: list[list] = [[] for _ in prompts]

        async def stream(i: int):
            request = Request(input_ids=prompts[i], request_id=f"r{i}",
                              sampling=Sampling(max_new_tokens=n_tokens, temperature=0.0, ignore_eos=True))
            async for chunk in engine.backend.generate(request):
                received[i] += [(t, lp, chunk.weight_version) for t, lp in zip(chunk.token_ids, chunk.logprobs, strict=True)]
                last = chunk
            return last

        tasks = [asyncio.create_task(stream(i)) for i in range(len(prompts))]
        while min(len(r) for r in received) < 8:
            await asyncio.sleep(0.005)
        publisher = DistributedPublisher(DistributedPublish(server_ranks=1, group_name="tidal_retract",
                                                            bucket_mb=0.1, timeout_s=60), engine.announce)
        try:
            await publisher.publish(1, flipped(tiny_model_dir))
        finally:
            await publisher.close()
        finals = await asyncio.gather(*tasks)
        await engine.settled(1)
        stats = engine.backend.stats()
    assert [f.finish.reason for f in finals] == ["length"] * len(prompts)  # no request lost
    assert stats.get("resubmits", 0) == stats.get("retries", 0) == 0
    models = {}
    for version, tensors in ((0, base), (1, flipped(tiny_model_dir))):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
        model.load_state_dict(tensors, strict=False)
        models[version] = model
    for prompt, got in zip(prompts, received, strict=True):
        tokens = [t for t, _, _ in got]
        versions = [v for _, _, v in got]
        assert len(tokens) == n_tokens
        switch = versions.index(1)  # version 0 up to the update, 1 from it on: within this one request
        assert 0 < switch and versions == [0] * switch + [1] * (n_tokens - switch)
        with torch.no_grad():
            logprobs = {v: torch.log_softmax(m(torch.tensor([prompt + tokens])).logits[0], -1)[len(prompt) - 1:-1]
                        for v, m in models.items()}
        for i, (token, lp, v) in enumerate(got):
            assert logprobs[v][i].argmax().item() == token, (i, v)
            assert lp == pytest.approx(logprobs[v][i, token].item(), abs=1e-4), (i, v)
        # the check has teeth: the other version's weights would not have chosen these tokens
        other = [logprobs[1 - v][i].argmax().item() != t for i, (t, _, v) in enumerate(got)]
        assert sum(other) > n_tokens // 2


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


def test_a_version_written_below_published_ones_removes_that_lost_future(tmp_path):
    """A trainer restored from an older checkpoint (or starting anew) republishes its version: the versions
    published after it were lost with the trainer that made them, and must not outlive it (nor make
    keep_last delete the version just written)."""
    import torch
    from tidal.trainer.config import DiskPublish
    from tidal.trainer.publish import DiskPublisher

    pub = DiskPublisher(DiskPublish(dir=str(tmp_path / "w"), keep_last=2), str(tmp_path / "nomodel"))
    for v in (4, 5, 6):
        pub.write(v, {"w": torch.full((2,), float(v))})
    assert [p.name for p in pub.published()] == ["v00000005", "v00000006"]
    notice = pub.write(3, {"w": torch.zeros(2)})
    assert [p.name for p in pub.published()] == ["v00000003"] and notice.source.path.endswith("v00000003")
