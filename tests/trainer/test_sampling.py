"""Restricted sampling (trainer/sampling.py): what counts as a policy the learner cannot reproduce, the
warning's rhythm, and a real trainer daemon that counts it, warns in its log and reports it in health."""

import asyncio
import signal

import numpy as np
import pytest
from tidal.protocol.channels import StatusSubscriber, TrajectorySender
from tidal.protocol.messages import Trajectory, Turn
from tidal.trainer.sampling import SamplingMonitor, restrictions, temperature

from tests.trainer.proc import records, trainer_toml
from tests.trainer.producer import Producer


def traj(tid: str, **sampling) -> Trajectory:
    return Trajectory.build(id=tid, group_id="g", env_id="test", task_seed=0, tokens=[1, 2, 3], loss_mask=[0, 1, 1],
                            behav_logp=[0, -1, -1], versions=[-1, 0, 0], turns=[Turn(1, 3, 1.0)], reward=1.0,
                            sampling=sampling)


def test_what_the_learner_cannot_reproduce():
    full = {"temperature": 0.7, "top_p": 1.0, "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0,
            "frequency_penalty": 0.0, "presence_penalty": 0.0, "masked": False}
    assert restrictions(full) == [] and restrictions({}) == [] and restrictions({"top_k": 0}) == []
    assert restrictions({**full, "top_p": 0.9}) == ["top_p=0.9"]
    assert restrictions({**full, "top_k": 20}, vocab_size=256) == ["top_k=20"]
    assert restrictions({**full, "top_k": 256}, vocab_size=256) == []  # the whole vocabulary: no restriction
    assert restrictions({**full, "min_p": 0.05, "masked": True}) == ["min_p=0.05", "masked"]
    assert restrictions({**full, "repetition_penalty": 1.1}) == ["repetition_penalty=1.1"]
    assert restrictions({"temperature": 0.0}) == ["temperature=0.0 (greedy)"]
    assert restrictions({"seed": 3, "top_p": 1}) == []  # keys it does not know are ignored


def test_the_learner_temperature_of_a_record():
    assert temperature({"temperature": 0.7}, 1.0) == 0.7
    assert temperature({}, 1.3) == 1.3  # not recorded: learner.model.temperature
    assert temperature({"temperature": 0.0}, 1.3) == 1.0  # greedy: servers report T = 1 log-probabilities


def test_monitor_counts_warns_once_then_every_n_and_health_follows_the_latest_batch():
    monitor = SamplingMonitor(5, vocab_size=256, warn_every=4)  # 5 counted before a restart
    plain = [traj("a", temperature=1.0), traj("b")]
    assert monitor.observe(plain) is None and monitor.health is None and monitor.restricted == 5
    restricted = [traj("c", top_p=0.9), traj("d", top_p=0.9, top_k=40), traj("e")]
    first = monitor.observe(restricted)
    assert monitor.restricted == 7 and monitor.last == 2
    assert "2 of 3 trajectories" in first and "(7 in all)" in first and "top_p=0.9, top_k=40" in first
    assert "e.g. c, d" in first and "top_p = 1, top_k = -1" in first
    assert monitor.health == "warn: restricted sampling (top_p=0.9, top_k=40)"
    assert monitor.observe(restricted) is None  # 9: fewer than 4 more since the warning
    assert monitor.observe(restricted) is not None  # 11: 4 more
    assert monitor.observe(plain) is None and monitor.health is None and monitor.restricted == 11


@pytest.mark.slow
async def test_daemon_counts_restricted_sampling_warns_in_its_log_and_reports_it_in_health(
        tmp_path, tiny_model_dir, trainer_process):
    trainer = trainer_process(trainer_toml(tmp_path, tiny_model_dir))  # batches of 2 groups of 2
    trainer.launch()
    producer = Producer(tiny_model_dir, seed=5)
    nucleus = {"temperature": 1.0, "top_p": 0.9, "top_k": -1}
    full = {"temperature": 1.0, "top_p": 1.0, "top_k": -1}
    first = producer.group("nucleus", version=0, size=2, sampling=nucleus) + producer.group("a", 0, 2, full)
    second = producer.group("b", version=1, size=2, sampling=full) + producer.group("c", 1, 2, full)
    ready = trainer.ready()
    async with (
        StatusSubscriber(ready["status_endpoint"]) as sub,
        TrajectorySender(ready["endpoint"], "engine-test") as tx,
    ):
        async def status_at(version: int):
            async with asyncio.timeout(120):
                while (s := sub.latest_status) is None or s.version < version:
                    await sub.recv()
            return s

        for t in first:
            await tx.send(t)
        after_first = await status_at(1)
        for t in second:
            await tx.send(t)
        after_second = await status_at(2)
        trainer.signal(signal.SIGTERM)
        assert await asyncio.to_thread(trainer.wait) == 0, trainer.log()

    assert after_first.health == "warn: restricted sampling (top_p=0.9)"
    assert after_second.health == "ok"  # the latest batch was sampled from the full distribution
    steps = [r for r in records(trainer.jsonl) if r["event"] == "step"]
    assert [r["trainer/restricted_sampling"] for r in steps] == [2, 2]  # cumulative
    log = trainer.output()
    assert log.count("restricted sampling:") == 1, log
    line = next(s for s in log.splitlines() if "restricted sampling:" in s)
    assert "2 of 4 trajectories" in line and "top_p=0.9" in line and "nucleus-0" in line
    assert "cannot reproduce the acting policy" in line and "top_p = 1" in line
    assert np.isfinite(steps[0]["trainer/loss"])
