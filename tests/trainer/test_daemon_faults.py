"""Failed training steps: the learner leaves no partial update, and the daemon counts the failure,
dead-letters the batch, acknowledges it and trains on; a persistent failure stops it with an error.

Two real faults: a batch whose rewards overflow float (1e308 each: the group mean is inf, so the loss
is NaN) and a poisoned batch on which the model's forward raises an out-of-memory error, scripted by
tests/trainer/faulty.py (no GPU here to run out of memory).
"""

import asyncio
import urllib.request

import numpy as np
import pytest
import torch
from tidal.protocol.channels import StatusSubscriber, TrajectorySender
from tidal.protocol.errors import ProtocolError
from tidal.protocol.messages import Trajectory, Turn
from tidal.trainer import dead_letter
from tidal.trainer.learner import Learner, NonFiniteStep

from tests.trainer.faulty import POISON, poison
from tests.trainer.proc import records, trainer_toml
from tests.trainer.producer import Producer
from tests.trainer.test_learner import batch_of, config, episode

pytestmark = pytest.mark.filterwarnings("ignore:(overflow|invalid value) encountered:RuntimeWarning")


def overflowing(n: int = 4, seed: int = 5) -> list[Trajectory]:
    """One group whose rewards are finite (valid on the wire) but whose sum overflows: a NaN loss."""
    rng = np.random.default_rng(seed)
    return [episode(i, rng, group="huge", reward=1e308) for i in range(n)]


def poisoned(like: Trajectory, traj_id: str, group: str) -> Trajectory:
    """`like` with every token POISON: the scripted forward raises on it."""
    return Trajectory.build(
        id=traj_id, group_id=group, env_id="test:poison", task_seed=0, tokens=[POISON] * len(like),
        loss_mask=like.mask(), behav_logp=like.behav_logps(), versions=like.token_versions(), turns=like.turns,
        reward=like.reward, terminated=True,
    )


def state_of(learner: Learner) -> dict:
    """Everything a step may change: weights, AdamW moments and step counts, schedule, version."""
    opt = learner.optimizer.state_dict()
    return {
        "params": {n: p.detach().clone() for n, p in learner.base_model.named_parameters()},
        "moments": {k: {n: v.clone() for n, v in s.items()} for k, s in opt["state"].items()},
        "schedule": learner.scheduler.state_dict()["last_epoch"],
        "version": learner.version,
    }


def assert_same(a: dict, b: dict) -> None:
    assert a["version"] == b["version"] and a["schedule"] == b["schedule"]
    assert all(torch.equal(a["params"][n], b["params"][n]) for n in a["params"])
    assert a["moments"].keys() == b["moments"].keys() and a["moments"]
    assert all(torch.equal(a["moments"][k][n], b["moments"][k][n]) for k in a["moments"] for n in a["moments"][k])


# --- the learner ------------------------------------------------------------------------------------

@pytest.mark.parametrize("fault", ["non_finite", "out_of_memory"])
def test_failed_step_leaves_model_optimiser_and_version_untouched(tiny_model_dir, fault):
    learner = Learner(config(tiny_model_dir, "advantage.type=grpo"))
    poison(learner.base_model)
    learner.train_step(batch_of(4, seed=1))  # AdamW has moments now: a partial update would move them
    before = state_of(learner)
    if fault == "non_finite":
        bad, expected = overflowing(), NonFiniteStep
    else:
        good = batch_of(4, seed=2, length=24)
        bad, expected = [*good[:3], poisoned(good[3], "p", good[3].group_id)], torch.OutOfMemoryError
    with pytest.raises(expected):
        learner.train_step(bad)
    assert_same(before, state_of(learner))
    assert all(p.grad is None for p in learner.base_model.parameters()), "a failed step left gradients behind"
    metrics = learner.train_step(batch_of(4, seed=3))  # and the next batch trains as usual
    assert learner.version == 2 and metrics["trainer/skipped_updates"] == 0.0
    assert any(not torch.equal(p, before["params"][n]) for n, p in learner.base_model.named_parameters())


def test_one_non_finite_update_is_skipped_and_the_others_apply(tiny_model_dir):
    # two updates per step: sequences 0, 2 | 1, 3. The first pair is a group of overflowing rewards
    # (NaN advantages), the second a normal group: one update skipped, one applied, version + 1.
    learner = Learner(config(tiny_model_dir, "advantage.type=grpo", "optim.minibatches=2"))
    huge, fine = overflowing(2), batch_of(2, seed=4)
    before = state_of(learner)
    metrics = learner.train_step([huge[0], fine[0], huge[1], fine[1]])
    assert metrics["trainer/skipped_updates"] == 1.0 and learner.version == 1
    assert np.isfinite(metrics["trainer/grad_norm"]) and metrics["trainer/grad_norm"] > 0
    assert learner.scheduler.state_dict()["last_epoch"] == before["schedule"] + 1
    assert all(torch.isfinite(p).all() for p in learner.base_model.parameters())


def test_failure_after_an_applied_update_advances_the_version_and_says_so(tiny_model_dir):
    learner = Learner(config(tiny_model_dir, "advantage.type=grpo", "optim.minibatches=2"))
    poison(learner.base_model, grad_only=True)  # the no-grad pass of pi_prox passes; update 2 raises
    good = batch_of(4, seed=6, length=24)
    bad = [good[0], poisoned(good[1], "p1", good[1].group_id), good[2], poisoned(good[3], "p3", good[3].group_id)]
    before = state_of(learner)
    with pytest.raises(torch.OutOfMemoryError) as info:
        learner.train_step(bad)
    assert learner.version == 1, "update 1 changed the weights: they are a new version"
    assert "1 of 2 updates were applied" in "".join(info.value.__notes__)
    assert any(not torch.equal(p, before["params"][n]) for n, p in learner.base_model.named_parameters())
    assert all(p.grad is None for p in learner.base_model.parameters())


def test_dead_letter_round_trips_whole_trajectories_and_survives_a_torn_line(tmp_path):
    path = tmp_path / "dl" / "dead.jsonl"
    letter = dead_letter.DeadLetter(path)
    first, second = batch_of(2, seed=7), overflowing(2)
    letter.append(3, "RuntimeError: boom", "Traceback ...", first)
    with open(path, "ab") as f:
        f.write(b'{"time": 1, "vers')  # a crash mid-write
    assert [b.version for b in dead_letter.read(path)] == [3]
    letter.append(4, "NonFiniteStep: nan", "Traceback ...", second)
    got = dead_letter.read(path)
    assert [(b.version, b.error, b.ids) for b in got] == [
        (3, "RuntimeError: boom", [t.id for t in first]), (4, "NonFiniteStep: nan", [t.id for t in second])]
    for batch, sent in zip(got, [first, second], strict=True):
        for t, s in zip(batch.trajectories, sent, strict=True):
            assert (t.token_ids() == s.token_ids()).all() and (t.behav_logps() == s.behav_logps()).all()
            assert t.reward == s.reward and t.turns == s.turns
    path.write_bytes(b"garbage\n" + path.read_bytes())
    with pytest.raises(ProtocolError, match="record 1"):
        dead_letter.read(path)


# --- the daemon -------------------------------------------------------------------------------------

async def wait_for(jsonl, event: str, count: int, timeout: float = 60.0) -> list[dict]:
    async with asyncio.timeout(timeout):
        while len(found := [r for r in records(jsonl) if r["event"] == event]) < count:
            await asyncio.sleep(0.05)
    return found


@pytest.mark.slow
async def test_daemon_dead_letters_failed_steps_trains_on_and_stops_on_persistent_failure(
        tmp_path, tiny_model_dir, trainer_process):
    cfg = trainer_toml(tmp_path, tiny_model_dir, metrics={"prometheus_port": 0},
                       failures={"dead_letter": str(tmp_path / "dead.jsonl"), "max_consecutive": 3})
    trainer = trainer_process(cfg, argv=("-m", "tests.trainer.faulty"))
    trainer.launch()
    producer = Producer(tiny_model_dir, seed=3)
    groups = {k: producer.group(f"g{k}", version=0, size=2) for k in range(7)}

    def poison_group(name: str) -> list[Trajectory]:
        return [poisoned(t, f"{name}-{i}", name) for i, t in enumerate(groups[0])]

    huge = [Trajectory.build(  # valid on the wire, but the group's mean reward overflows: NaN loss
        id=f"huge-{i}", group_id="huge", env_id="test:even", task_seed=0, tokens=t.token_ids(), loss_mask=t.mask(),
        behav_logp=t.behav_logps(), versions=t.token_versions(),
        turns=[Turn(t.turns[-1].start, t.turns[-1].end, 1e308)], reward=1e308, terminated=True,
    ) for i, t in enumerate(producer.group("h", version=0, size=2))]
    plan = [  # (what to send, whether the step trains)
        (poison_group("poison") + groups[1], False),
        (groups[2] + groups[3], True),
        (huge + groups[4], False),
        (groups[5] + groups[6], True),
    ]
    ready = trainer.ready()
    async with (
        StatusSubscriber(ready["status_endpoint"]) as sub,
        TrajectorySender(ready["endpoint"], "engine-test") as tx,
    ):
        version = failed = 0
        for batch, trains in plan:
            for t in batch:
                await tx.send(Producer.retag(t, version))
            if trains:
                version += 1
                async with asyncio.timeout(60):
                    while (s := sub.latest_status) is None or s.version < version:
                        await asyncio.sleep(0.05)
            else:
                failed += 1
                await wait_for(trainer.jsonl, "step_error", failed)
        scrape = urllib.request.urlopen(ready["prometheus_url"], timeout=10).read()
        assert b"tidal_trainer_step_errors 2.0" in scrape and b"tidal_trainer_step_errors_non_finite 1.0" in scrape
        assert sub.latest_status.version == 2 and sub.latest_status.consumed == 8
        # the dead-lettered batches are given back to the engines' admission budget
        assert sub.latest_status.dropped == failed * 4

        # a fault that persists: three poisoned batches in a row stop the daemon with a clear error
        for k in range(3):
            for t in poison_group(f"again{k}") + producer.group(f"late{k}", version=0, size=2):
                await tx.send(Producer.retag(t, 2))
        assert await asyncio.to_thread(trainer.wait) == 2, trainer.log()
        assert await tx.flush(timeout=10), f"dead-lettered deliveries must be acknowledged: {tx.stats}"
        async with asyncio.timeout(10):
            while not sub.latest_status.health.startswith("3 training steps in a row failed"):
                await asyncio.sleep(0.05)
    log = trainer.log()
    assert "3 training steps in a row failed" in log and "OutOfMemoryError" in log and "Traceback" in log

    recs = records(trainer.jsonl)
    errors = [r for r in recs if r["event"] == "step_error"]
    assert [r["step"] for r in errors] == [0, 1, 2, 2, 2]
    assert [r["trainer/step_errors_consecutive"] for r in errors] == [1, 1, 1, 2, 3]
    assert "OutOfMemoryError" in errors[0]["error"] and "NonFiniteStep" in errors[1]["error"]
    assert "Traceback" in errors[0]["traceback"] and "forward" in errors[0]["traceback"]
    steps = [r for r in recs if r["event"] == "step"]
    assert [r["step"] for r in steps] == [0, 1] and [r["trainer/step_errors"] for r in steps] == [1, 2]
    used = {i for r in steps for i in r["ids"].split(",")}
    assert used == {t.id for k in (2, 3, 5, 6) for t in groups[k]}

    # the dead letter holds every failed batch whole, in order, ids matching the error records
    dead = dead_letter.read(tmp_path / "dead.jsonl")
    assert [b.ids for b in dead] == [r["ids"].split(",") for r in errors]
    assert {t.id for t in dead[0].trajectories} == {"poison-0", "poison-1", *(t.id for t in groups[1])}
    assert dead[1].error.startswith("NonFiniteStep") and {"huge-0", "huge-1"} <= set(dead[1].ids)
    sent = {t.id: t for t in huge + poison_group("poison")}
    for t in (t for b in dead[:2] for t in b.trajectories if t.id in sent):
        assert (t.token_ids() == sent[t.id].token_ids()).all() and t.reward == sent[t.id].reward
    assert (tmp_path / "ckpt" / "step-00000002").exists(), "the stop still writes the final checkpoint"

