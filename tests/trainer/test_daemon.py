"""The trainer daemon end to end: a real child process fed over the real trajectory channel.

The producer (tests/trainer/producer.py) plays the engine: it samples groups from the tiny model,
tags them with the trainer's current version (or an old one, to be dropped as stale), sends them with
a TrajectorySender and follows the trainer's TrainerStatus on a StatusSubscriber.
"""

import asyncio
import hashlib
import signal
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tidal.protocol.channels import StatusSubscriber, TrajectorySender
from tidal.protocol.messages import TrainerStatus, Trajectory, WeightsPublished

from tests.trainer.proc import records, served, trainer_toml
from tests.trainer.producer import Producer

pytestmark = pytest.mark.slow


class Watcher:
    """Records every status-channel change the trainer publishes."""

    def __init__(self, sub: StatusSubscriber):
        self.sub = sub
        self.seen: list = []
        self._task = asyncio.create_task(self._run())

    async def _run(self):
        while True:
            self.seen.append(await self.sub.recv())

    async def version(self, at_least: int, timeout: float = 120.0) -> TrainerStatus:
        async with asyncio.timeout(timeout):
            while (s := self.sub.latest_status) is None or s.version < at_least:
                await asyncio.sleep(0.05)
        return s

    def statuses(self) -> list[TrainerStatus]:
        return [m for m in self.seen if isinstance(m, TrainerStatus)]

    def close(self):
        self._task.cancel()


async def weights(sub: StatusSubscriber, at_least: int, timeout: float = 60.0) -> WeightsPublished:
    async with asyncio.timeout(timeout):
        while (w := sub.latest_weights) is None or w.version < at_least:
            await asyncio.sleep(0.05)
    return w


def timeline(recs: list[dict]) -> dict[int, list[str]]:
    """Trajectory ids each version's step used, as the run finally stands: a resume at version v
    supersedes steps >= v recorded before it."""
    steps: dict[int, list[str]] = {}
    for r in recs:
        if r["event"] == "resume":
            steps = {v: ids for v, ids in steps.items() if v < r["step"]}
        elif r["event"] == "step":
            steps[r["step"]] = r["ids"].split(",")
    return steps


async def test_trains_drops_stale_publishes_and_stops_on_sigterm(tmp_path, tiny_model_dir, trainer_process):
    trainer = trainer_process(trainer_toml(tmp_path, tiny_model_dir, metrics={"prometheus_port": 0},
                                           intake={"max_uncommitted": 3}))
    trainer.launch()
    producer = Producer(tiny_model_dir)  # sample while the trainer starts; tag versions when sending
    fresh = {k: [t for g in range(2) for t in producer.group(f"s{k}g{g}", version=0, size=2)] for k in range(3)}
    stale = producer.group("old", version=0, size=2)  # sent at version 2: staleness 2 > max_staleness 1
    bad = [Trajectory.build(  # token ids outside the vocabulary: rejected and counted, the steps go on
        id=f"bad-{i}", group_id="bad", env_id="x", task_seed=0, tokens=[10**6] * len(stale[0]),
        loss_mask=stale[0].mask(), behav_logp=stale[0].behav_logps(), versions=stale[0].token_versions(),
        turns=[], reward=0.0,
    ) for i in range(2)]
    bad.append(Trajectory.build(  # one token: nothing to predict
        id="bad-2", group_id="bad2", env_id="x", task_seed=0, tokens=[9], loss_mask=[1], behav_logp=[-1.0],
        versions=[0], turns=[], reward=0.0))
    ready = trainer.ready()
    async with (
        StatusSubscriber(ready["status_endpoint"]) as sub,
        TrajectorySender(ready["endpoint"], "engine-test") as tx,
    ):
        watch = Watcher(sub)
        for t in bad:
            await tx.send(t)
        # no step can use them, yet max_uncommitted (3) forces a checkpoint: the engine is never stalled
        assert await tx.flush(timeout=30), f"rejected deliveries were never acknowledged: {tx.stats}"
        for k in range(3):
            await watch.version(k)
            for t in stale * (k == 2) + [Producer.retag(t, k) for t in fresh[k]]:
                await tx.send(t)
        final = await watch.version(3)
        scrape = urllib.request.urlopen(ready["prometheus_url"], timeout=10).read()
        assert b"tidal_trainer_loss " in scrape and b"tidal_trainer_intake_stale_dropped 2.0" in scrape
        assert b"tidal_trainer_intake_rejected 3.0" in scrape
        trainer.signal(signal.SIGTERM)
        assert await asyncio.to_thread(trainer.wait) == 0, trainer.log()
        assert await tx.flush(timeout=10), f"the SIGTERM checkpoint should have committed every delivery: {tx.stats}"
        watch.close()

    # TrainerStatus at start and after every step, consumed counting trajectories used; then "stopped"
    statuses = watch.statuses()
    assert [s.version for s in statuses if s.health == "ok"] == [0, 1, 2, 3]
    assert [s.consumed for s in statuses if s.health == "ok"] == [0, 4, 8, 12]
    assert statuses[-1].health == "stopped"
    assert final.consumed == 12 and final.batch_size == 4 and final.max_staleness == 1
    assert final.dropped == 2 + 3  # the stale pair and the rejected three, given back to admission

    recs = records(trainer.jsonl)
    steps = [r for r in recs if r["event"] == "step"]
    used = [i for r in steps for i in r["ids"].split(",")]
    assert sorted(used) == sorted(t.id for k in fresh for t in fresh[k])
    assert not set(used) & {t.id for t in stale}
    assert steps[-1]["trainer/intake/stale_dropped"] == 2 and steps[-1]["trainer/intake/rejected"] == 3
    assert not any(i.startswith("bad") for i in used)
    drops = [r for r in recs if r["event"] == "dropped"]  # the ledger names each dropped trajectory once
    named = {reason: [i for r in drops for i in r[reason].split(",") if i] for reason in ("stale", "rejected")}
    assert sorted(named["stale"]) == sorted(t.id for t in stale) and [r["step"] for r in drops if r["stale"]] == [2]
    assert sorted(named["rejected"]) == ["bad-0", "bad-1", "bad-2"]
    assert [r["step"] for r in recs if r["event"] == "checkpoint"][0] == 0  # forced by intake pressure
    for r in steps:  # groups kept whole; every metric finite (telemetry writes null otherwise)
        assert set(Counter(i.rsplit("-", 1)[0] for i in r["ids"].split(",")).values()) == {2}
        assert None not in r.values()
    assert any(r["trainer/grad_norm"] > 0 for r in steps)

    # a WeightsPublished per step; files match checksums and differ from the initial weights
    published = [m for m in watch.seen if isinstance(m, WeightsPublished)]
    assert [p.version for p in published] == [1, 2, 3]
    last = Path(published[-1].source.path)
    digest = hashlib.sha256((last / "model.safetensors").read_bytes()).hexdigest()
    assert published[-1].checksum == f"sha256:{digest}"
    new, old = load_file(last / "model.safetensors"), load_file(Path(tiny_model_dir) / "model.safetensors")
    assert set(new) == set(old)
    assert any(not (new[k] == old[k]).all() for k in old), "training should change the weights"
    assert (last / "config.json").exists() and (last / "tokenizer.json").exists()

    # SIGTERM wrote a checkpoint at the last version; its weights are exactly those published as v3
    # (publishing overlaps the next step, from a copy taken before it)
    saved = load_file(tmp_path / "ckpt" / "step-00000003" / "model.safetensors")
    assert all(torch.equal(saved[k], new[k]) for k in new)
    v2 = load_file(Path(published[-2].source.path) / "model.safetensors")
    assert any(not torch.equal(v2[k], new[k]) for k in new)


async def test_sigkill_then_restart_resumes_and_uses_each_trajectory_once(tmp_path, tiny_model_dir, trainer_process):
    cfg = trainer_toml(
        tmp_path, tiny_model_dir,
        intake={"endpoint": f"ipc://{tmp_path}/traj", "status_endpoint": f"ipc://{tmp_path}/status"},
        checkpoint={"every_steps": 2}, publish={"type": "disk", "dir": str(tmp_path / "weights"), "every_steps": 2},
    )
    trainer = trainer_process(cfg)
    trainer.launch()
    producer = Producer(tiny_model_dir, seed=1)
    steps = 5
    groups = {k: [t for g in range(2) for t in producer.group(f"s{k}g{g}", version=0, size=2)] for k in range(steps)}
    sent = [t.id for k in groups for t in groups[k]]
    trainer.ready()
    async with TrajectorySender(cfg["intake"]["endpoint"], "engine-test", resend_after_s=1.0) as tx:
        async with StatusSubscriber(cfg["intake"]["status_endpoint"]) as sub:
            watch = Watcher(sub)
            for k in range(3):  # not step 3's: with it the trainer could checkpoint at 4 before the kill
                await watch.version(k)
                for t in groups[k]:
                    await tx.send(Producer.retag(t, k))
            await watch.version(3)  # step 2 trained after the checkpoint at 2: its trajectories are resent
            watch.close()
        async with asyncio.timeout(60):  # the checkpoint at version 2 is durable (written in the background)
            while not any(r["event"] == "checkpoint" and r["step"] == 2 for r in records(trainer.jsonl)):
                await asyncio.sleep(0.05)
        trainer.signal(signal.SIGKILL)
        await asyncio.to_thread(trainer.wait)
        await asyncio.to_thread(trainer.start)  # resumes from step-00000002; the sender resends the rest
        async with StatusSubscriber(cfg["intake"]["status_endpoint"]) as sub:
            watch = Watcher(sub)
            for k in (3, 4):
                await watch.version(k)
                for t in groups[k]:
                    await tx.send(Producer.retag(t, k))
            await watch.version(steps)
            watch.close()
        trainer.signal(signal.SIGTERM)
        assert await asyncio.to_thread(trainer.wait) == 0, trainer.log()
        assert await tx.flush(timeout=10)

    recs = records(trainer.jsonl)
    resumes = [r for r in recs if r["event"] == "resume"]
    assert [r["step"] for r in resumes] == [2]
    after = recs[recs.index(resumes[0]):]
    first_publish = next(r for r in after if r["event"] == "publish")  # the checkpoint's weights, again
    assert first_publish["step"] == 2 and after.index(first_publish) < after.index(next(
        r for r in after if r["event"] == "step"))
    used = timeline(recs)
    assert sorted(used) == list(range(steps))
    ids = [i for v in sorted(used) for i in used[v]]
    assert len(ids) == len(set(ids)), "a trajectory was used twice"
    assert sorted(ids) == sorted(sent), "a trajectory was lost"
    assert (tmp_path / "ckpt" / f"step-{steps:08d}").exists()


async def test_broadcasts_each_version_to_the_reference_server_and_survives_its_restart(
        tmp_path, tiny_model_dir, trainer_process):
    # The trainer announces each version on its status channel and broadcasts it; an engine side (the
    # real WeightSync over the sglang backend, on a subscriber of its own) has the server receive it.
    import aiohttp
    from tidal.engine.reference.launch import ReferenceServer

    from tests.trainer.engine_side import EngineSide

    producer = Producer(tiny_model_dir, seed=2)
    groups = {k: [t for g in range(2) for t in producer.group(f"s{k}g{g}", version=0, size=2)] for k in range(4)}
    async with ReferenceServer(tiny_model_dir) as srv, aiohttp.ClientSession() as http:
        before, _ = await served(http, srv.url)
        cfg = trainer_toml(tmp_path, tiny_model_dir, learner={"optim": {"lr": 1e-2}},
                           publish={"type": "distributed", "server_ranks": 1, "timeout_s": 30})
        trainer = trainer_process(cfg)
        ready = await asyncio.to_thread(trainer.start)
        async with (
            StatusSubscriber(ready["status_endpoint"]) as sub,
            StatusSubscriber(ready["status_endpoint"]) as engine_sub,
            EngineSide([srv.url]) as engine,
            TrajectorySender(ready["endpoint"], "engine-test") as tx,
        ):
            engine.follow(engine_sub)
            watch = Watcher(sub)
            for k in range(4):
                await watch.version(k)
                if k == 2:  # once v2 is served, the server restarts and loses the group
                    await engine.reached(2)
                    logprobs, version = await served(http, srv.url)
                    assert version == "2" and logprobs != before
                    await asyncio.to_thread(srv.restart)
                if k == 3:  # v3's broadcast failed (the server left the group); tried again, it lands
                    await engine.reached(3)
                for t in groups[k]:
                    await tx.send(Producer.retag(t, k))
            await engine.reached(4)
            trainer.signal(signal.SIGTERM)
            assert await asyncio.to_thread(trainer.wait) == 0, trainer.log()
            watch.close()
            assert engine.sync.updates == 4 and engine.healthy() == {srv.url: True}
        logprobs, version = await served(http, srv.url)
        assert version == "4" and logprobs != before
        recs = records(trainer.jsonl)
        # A second run resumes at v4 and broadcasts it again after its `ready` record, from which a new
        # engine is wired: the server, still in the first run's dead group, joins the new one and takes
        # v4 again although it serves v4 already (a pending broadcast is never skipped).
        second = trainer_process(cfg)
        ready = await asyncio.to_thread(second.start)
        async with StatusSubscriber(ready["status_endpoint"]) as engine_sub, EngineSide([srv.url]) as engine:
            engine.follow(engine_sub)
            await engine.settled(1)
            assert engine.sync.updates == 1 and engine.served == [4, 4]
        second.signal(signal.SIGTERM)
        assert await asyncio.to_thread(second.wait) == 0, second.log()
    assert [r["step"] for r in records(trainer.jsonl) if r["event"] == "publish"] == [1, 2, 3, 4, 4]
    assert [r["step"] for r in recs if r["event"] == "publish"] == [1, 2, 3, 4]
    failed = [r for r in recs if r["event"] == "publish_failed"]
    assert [r["step"] for r in failed] == [3] and "publishing version 3 over group 'tidal_weights'" in failed[0]["error"]
    assert any(s.health.startswith("publish failed") for s in watch.statuses())
    # each version announced (pending) before its broadcast and closed after it; v3 twice, on two groups
    notices = [w for w in watch.seen if isinstance(w, WeightsPublished)]
    assert [(w.version, w.source.pending) for w in notices] == [
        (v, pending) for v in (1, 2, 3, 3, 4) for pending in (True, False)]
    assert len({w.source.group_id for w in notices}) == 2  # formed again after the failure
