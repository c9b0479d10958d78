"""An idle `torchrun --nproc-per-node 2` trainer (gloo, CPU) with a short `distributed.timeout_s`: while
no batch comes, rank 0 tells the other ranks, which wait in a broadcast bounded by that timeout, to
keep waiting (the IDLE command), so the job outlives many timeouts and then trains as usual; a rank 0
that stops answering still ends the job."""

import asyncio
import contextlib
import os
import signal
import subprocess

import pytest
import torch
from tidal.protocol.channels import TrajectorySender
from tidal.protocol.config import load_config
from tidal.trainer.config import TrainerConfig
from tidal.trainer.learner import Learner

from tests.trainer.proc import records, trainer_toml
from tests.trainer.producer import Producer
from tests.trainer.test_torchrun import TORCHRUN, assert_same_update

pytestmark = pytest.mark.slow

COLLECTIVE_TIMEOUT_S = 10.0
"""distributed.timeout_s of these jobs: a rank waiting in a broadcast this long without a word fails.
Short enough to idle through several, long enough that every real collective (an FSDP gather, the
final checkpoint) finishes well within it on a loaded 2-core machine (4 s did not, once)."""

IDLE_S = 2.5 * COLLECTIVE_TIMEOUT_S
"""How long the idle job gets no trajectories."""

JOB_LIMIT_S = 120.0
"""How long a test waits for a job to reach a state or to end: starts, a few steps, a teardown."""


async def steps(job, n: int) -> None:
    """Wait until the job has recorded `n` steps."""
    async with asyncio.timeout(JOB_LIMIT_S):
        while len([r for r in records(job.jsonl) if r["event"] == "step"]) < n:
            assert job.proc.poll() is None, job.output()
            await asyncio.sleep(0.05)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
async def test_an_idle_job_outlives_its_collective_timeout_then_trains_and_stops(
        tmp_path, tiny_model_dir, torchrun_job, strategy):
    # FSDP: each step is followed by GATHER_WEIGHTS (publish) and GATHER_STATE (checkpoint), so IDLE
    # comes between those and the next STEP
    cfg = trainer_toml(tmp_path, tiny_model_dir, checkpoint={"every_steps": 1},
                       distributed={"strategy": strategy, "timeout_s": COLLECTIVE_TIMEOUT_S})
    job = torchrun_job(cfg, TORCHRUN)
    job.launch()
    producer = Producer(tiny_model_dir, seed=8)
    batches = [[t for g in range(2) for t in producer.group(f"b{i}g{g}", version=0, size=2)] for i in range(2)]
    ready = await asyncio.to_thread(job.ready)
    async with TrajectorySender(ready["endpoint"], "engine-test") as tx:
        for t in batches[0]:
            await tx.send(t)
        await steps(job, 1)
        try:  # rank 1 waits in its broadcast all along: before IDLE it failed after COLLECTIVE_TIMEOUT_S
            code = await asyncio.to_thread(job.wait, IDLE_S)
        except subprocess.TimeoutExpired:
            pass
        else:
            pytest.fail(f"the idle job ended with {code}:\n{job.output()}")
        for t in batches[1]:
            await tx.send(t)
        await steps(job, 2)
        ranks = job.ranks()
        assert sorted(ranks) == [0, 1], ranks
        for pid in ranks.values():  # as torchrun forwards it; rank 1 ignores it and waits for STOP
            os.kill(pid, signal.SIGTERM)
        assert await asyncio.to_thread(job.wait, JOB_LIMIT_S) == 0, job.output()
        assert await tx.flush(timeout=10), "the final checkpoint acknowledges both batches"

    recs = records(job.jsonl)
    assert [r["ids"].split(",") for r in recs if r["event"] == "step"] == [[t.id for t in b] for b in batches]
    single = Learner(load_config(TrainerConfig, job.config).learner)  # both ranks trained their shares alike
    base = {n: t.clone() for n, t in single.base_model.state_dict().items()}
    for batch in batches:
        single.train_step(batch)
    assert_same_update(tmp_path / "ckpt" / "step-00000002", base, single)
    assert any(not torch.equal(t, base[n]) for n, t in single.base_model.state_dict().items())


async def test_a_rank_0_that_stops_answering_still_ends_the_job(tmp_path, tiny_model_dir, torchrun_job):
    cfg = trainer_toml(tmp_path, tiny_model_dir, distributed={"timeout_s": COLLECTIVE_TIMEOUT_S})
    job = torchrun_job(cfg, TORCHRUN)
    await asyncio.to_thread(job.start)
    rank_0 = job.ranks()[0]
    os.kill(rank_0, signal.SIGSTOP)  # hung: its event loop, which sends IDLE, no longer runs
    try:
        async with asyncio.timeout(JOB_LIMIT_S):
            while "tidal trainer: rank 1: waiting for rank 0's next command failed" not in job.output():
                await asyncio.sleep(0.1)
        # torchrun's agent now stops the workers: SIGTERM, and SIGKILL 30 s later to the stopped rank 0
        os.kill(rank_0, signal.SIGKILL)
        assert await asyncio.to_thread(job.wait, JOB_LIMIT_S) != 0, job.output()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(rank_0, signal.SIGKILL)
