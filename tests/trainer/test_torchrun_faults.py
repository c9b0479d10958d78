"""Failed steps under `torchrun --nproc-per-node 2` (gloo, CPU): a step that raises on one rank only ends
the job at once, unacknowledged, and a restarted job trains the resent batch; a non-finite step, which
every rank sees, is skipped and dead-lettered as one process does, and the job goes on.

The rank-local fault is tests/trainer/faulty.py's scripted out-of-memory from the model's forward on a
poisoned trajectory. Which rank trains a trajectory is set by lengths: `Learner.train_step` hands the
longest to rank 0, the next to rank 1, then each to the less loaded rank, so in a batch of lengths
23, 21, 17, 17 the 23 is rank 0's alone and the 21 rank 1's alone.
"""

import asyncio

import pytest
from tidal.protocol.channels import TrajectorySender
from tidal.protocol.messages import Trajectory, Turn
from tidal.trainer import dead_letter

from tests.trainer.faulty import ATTEMPTS_ENV, POISON
from tests.trainer.proc import records, trainer_toml
from tests.trainer.producer import Producer
from tests.trainer.test_torchrun import TORCHRUN

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:(overflow|invalid value) encountered:RuntimeWarning")]

FAULTY = (*TORCHRUN[:-1], "tests.trainer.faulty")
RESTARTING = (*TORCHRUN[:-2], "--max-restarts", "1", "-m", "tests.trainer.faulty")

COLLECTIVE_TIMEOUT_S = 600.0
"""distributed.timeout_s of these jobs: a job that waited for it would outlive JOB_LIMIT_S."""

JOB_LIMIT_S = 120.0
"""How long a test waits for a job to end by itself: starts, a few steps, and a failed rank's teardown."""


def config(tmp_path, tiny_model_dir, **sections) -> dict:
    return trainer_toml(
        tmp_path, tiny_model_dir, distributed={"timeout_s": COLLECTIVE_TIMEOUT_S},
        failures={"dead_letter": str(tmp_path / "dead.jsonl")}, **sections,
    )


def member(t: Trajectory, traj_id: str, group: str, *, poison: bool = False) -> Trajectory:
    """`t` as member `traj_id` of `group`; with `poison` every token is POISON (the forward raises)."""
    return Trajectory.build(
        id=traj_id, group_id=group, env_id=t.env_id, task_seed=0, tokens=[POISON] * len(t) if poison else t.token_ids(),
        loss_mask=t.mask(), behav_logp=t.behav_logps(), versions=t.token_versions(), turns=t.turns,
        reward=t.reward, terminated=True,
    )


def batches(tiny_model_dir, poisoned_rank: int) -> tuple[list[Trajectory], list[Trajectory]]:
    """A clean batch (4 x 17 tokens), then one whose trajectory for `poisoned_rank` alone is poisoned."""
    short = Producer(tiny_model_dir, seed=3, gen_tokens=3)                   # 5 + 2 * (3 + 3) = 17 tokens
    longest = Producer(tiny_model_dir, seed=4, gen_tokens=6).group("x", 0, 1)[0]                # 23: rank 0
    second = Producer(tiny_model_dir, seed=5, gen_tokens=5).group("y", 0, 1)[0]                 # 21: rank 1
    clean = [t for g in range(2) for t in short.group(f"clean{g}", version=0, size=2)]
    faulty = [member(longest, "mix-0", "mix", poison=poisoned_rank == 0),
              member(second, "mix-1", "mix", poison=poisoned_rank == 1), *short.group("plain", version=0, size=2)]
    return clean, faulty


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
async def test_a_step_failing_on_one_rank_ends_the_job_at_once_unacknowledged(
        tmp_path, tiny_model_dir, torchrun_job, strategy):
    cfg = config(tmp_path, tiny_model_dir, intake={"batch_size": 4, "group_size": 2, "commit": "step"})
    cfg["distributed"]["strategy"] = strategy
    job = torchrun_job(cfg, FAULTY)
    job.launch()
    clean, faulty = batches(tiny_model_dir, poisoned_rank=1)
    ready = await asyncio.to_thread(job.ready)
    async with TrajectorySender(ready["endpoint"], "engine-test") as tx:
        for t in clean:
            await tx.send(t)
        assert await tx.flush(timeout=60), "the clean step is acknowledged (intake.commit = 'step')"
        for t in faulty:
            await tx.send(Producer.retag(t, 1))
        # rank 1 raises while rank 0 waits for it in a collective of the step (DDP's gradient all-reduce,
        # FSDP's all-gathers): before, both waited for the collective timeout (600 s, far beyond
        # JOB_LIMIT_S; wait raises TimeoutExpired then)
        assert await asyncio.to_thread(job.wait, JOB_LIMIT_S) != 0, job.log()
        assert tx.unacked == len(faulty), "the failed batch is still the engine's, to resend"
    log = job.output()
    assert ("tidal trainer: rank 1: step at version 1 failed on 4 trajectories (mix-0, mix-1, plain-0, plain-1): "
            "OutOfMemoryError: CUDA out of memory") in log and "Traceback" in log, log
    recs = records(job.jsonl)
    assert [r["ids"].split(",") for r in recs if r["event"] == "step"] == [[t.id for t in clean]]
    assert not [r for r in recs if r["event"] == "step_error"]
    assert not (tmp_path / "dead.jsonl").exists(), "a rank-local failure is no bad input: nothing dead-lettered"


async def test_a_restarted_job_trains_the_batch_a_transient_fault_on_rank_0_failed(
        tmp_path, tiny_model_dir, torchrun_job):
    # the intake binds ipc paths, the same across torchrun's restart, so the engine's sender reconnects
    cfg = config(tmp_path, tiny_model_dir, max_steps=2, checkpoint={"every_steps": 1},
                 intake={"batch_size": 4, "group_size": 2, "endpoint": f"ipc://{tmp_path}/traj",
                         "status_endpoint": f"ipc://{tmp_path}/status"})
    # without the opt-out, torch 2.13's restarted group may read the first attempt's gloo addresses
    # from the store torchrun's agent keeps across attempts, and fail or hang as it forms (the daemon warns)
    job = torchrun_job(cfg, RESTARTING, env={ATTEMPTS_ENV: "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
    job.launch()
    clean, faulty = batches(tiny_model_dir, poisoned_rank=0)
    await asyncio.to_thread(job.ready)
    async with TrajectorySender(cfg["intake"]["endpoint"], "engine-test", resend_after_s=1.0) as tx:
        for t in clean:
            await tx.send(t)
        assert await tx.flush(timeout=60), "acknowledged once checkpoint step-00000001 is durable"
        for t in faulty:
            await tx.send(Producer.retag(t, 1))
        # rank 0 fails; torchrun starts the group again (unpoisoned), it resumes from step-00000001,
        # the sender resends the batch, the job trains it and stops at max_steps
        assert await asyncio.to_thread(job.wait, JOB_LIMIT_S) == 0, job.log()
        assert await tx.flush(timeout=10)
    log = job.output()
    assert ("tidal trainer: rank 0: step at version 1 failed on 4 trajectories (mix-0, mix-1, plain-0, plain-1): "
            "OutOfMemoryError: CUDA out of memory") in log, log
    recs = records(job.jsonl)
    assert [r["step"] for r in recs if r["event"] == "resume"] == [1]
    steps = [r for r in recs if r["event"] == "step"]
    assert [(r["step"], sorted(r["ids"].split(","))) for r in steps] == [
        (0, sorted(t.id for t in clean)), (1, sorted(t.id for t in faulty))]
    assert not [r for r in recs if r["event"] == "step_error"]


async def test_a_non_finite_step_is_skipped_on_every_rank_and_the_job_goes_on(tmp_path, tiny_model_dir, torchrun_job):
    cfg = config(tmp_path, tiny_model_dir, max_steps=1, intake={"batch_size": 4, "group_size": 2, "commit": "step"})
    job = torchrun_job(cfg, TORCHRUN)
    job.launch()
    producer = Producer(tiny_model_dir, seed=6)
    # one group whose rewards overflow (finite on the wire, a NaN loss): the global gradient norm is NaN
    huge = [Trajectory.build(
        id=f"huge-{i}", group_id="huge", env_id=t.env_id, task_seed=0, tokens=t.token_ids(), loss_mask=t.mask(),
        behav_logp=t.behav_logps(), versions=t.token_versions(),
        turns=[Turn(t.turns[-1].start, t.turns[-1].end, 1e308)], reward=1e308, terminated=True,
    ) for i, t in enumerate(producer.group("h", version=0, size=2))]
    skipped = huge + producer.group("fine", version=0, size=2)
    trained = [t for g in range(2) for t in producer.group(f"next{g}", version=0, size=2)]
    ready = await asyncio.to_thread(job.ready)
    async with TrajectorySender(ready["endpoint"], "engine-test") as tx:
        for t in skipped:
            await tx.send(t)
        async with asyncio.timeout(60):
            while not [r for r in records(job.jsonl) if r["event"] == "step_error"]:
                await asyncio.sleep(0.05)
        for t in trained:
            await tx.send(t)
        assert await asyncio.to_thread(job.wait, JOB_LIMIT_S) == 0, job.log()
        assert await tx.flush(timeout=10), "the dead-lettered batch is acknowledged, as in one process"
    recs = records(job.jsonl)
    errors = [r for r in recs if r["event"] == "step_error"]
    assert [(r["step"], r["ids"].split(",")) for r in errors] == [(0, [t.id for t in skipped])]
    assert errors[0]["error"].startswith("NonFiniteStep") and errors[0]["trainer/step_errors_non_finite"] == 1
    assert [(r["step"], r["ids"].split(",")) for r in recs if r["event"] == "step"] == [(0, [t.id for t in trained])]
    assert [b.ids for b in dead_letter.read(tmp_path / "dead.jsonl")] == [[t.id for t in skipped]]
    assert "skipped on rank 1 (non-finite on every rank)" in job.output()
