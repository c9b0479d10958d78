"""The trainer SIGKILLed mid-step and mid-checkpoint-write, then restarted, under a running engine.

The trainer resumes from its last complete checkpoint at that checkpoint's version (a torn checkpoint
is never loaded); the engine meanwhile stops admitting (`no_trainer`) and keeps what it made in its
spool; and in the end every trajectory the engine produced was trained on exactly once, is buffered in
the trainer's final checkpoint, or was dropped for staleness with a count: none silently lost.
"""

import asyncio
import signal

import pytest
from tidal.trainer.checkpoint import PAUSE_ENV

from tests.faults.pipeline import assert_nothing_lost, ledger, steps
from tests.trainer.proc import records

pytestmark = pytest.mark.slow


def complete_checkpoints(ckpt) -> list[int]:
    return sorted(int(p.name[5:]) for p in ckpt.glob("step-*") if p.is_dir())


def resumes(trainer) -> list[int]:
    return [r["step"] for r in records(trainer.jsonl) if r.get("event") == "resume"]


async def test_trainer_killed_mid_step_and_mid_checkpoint_resumes_and_loses_nothing(tmp_path, pipeline):
    ckpt = tmp_path / "ckpt"
    server = await asyncio.to_thread(pipeline.server)
    trainer = pipeline.trainer()
    ready = await asyncio.to_thread(trainer.start)
    engine = pipeline.engine([server.url], ready)
    await asyncio.to_thread(engine.start)

    # 1. SIGKILL while training: right after a step's record, with the next batch arriving
    await pipeline.until(lambda: len(steps(trainer)) >= 3 and complete_checkpoints(ckpt), 180, "3 steps and a checkpoint")
    trainer.signal(signal.SIGKILL)
    await asyncio.to_thread(trainer.wait)
    before = complete_checkpoints(ckpt)[-1]
    await pipeline.until(lambda: engine.last_metrics().get("engine/admission_blocked/no_trainer", 0) > 0, 60,
                "the engine to stop admitting without a trainer")
    m = engine.last_metrics()
    assert m["engine/sink/pending"] > 0 and m["engine/sink/unacked"] > 0, m  # spooled, awaiting a commit

    # 2. restarted with a pause before each checkpoint's rename: SIGKILL while the next one is written
    trainer.env = {PAUSE_ENV: "120"}
    await asyncio.to_thread(trainer.start)
    assert resumes(trainer) == [before]
    torn = await pipeline.until(lambda: [p for p in ckpt.glob(".tmp-step-*")], 180, "a checkpoint being written")
    trainer.signal(signal.SIGKILL)
    await asyncio.to_thread(trainer.wait)
    assert complete_checkpoints(ckpt)[-1] < int(torn[0].name.split("-")[2])  # the torn one is not in place

    # 3. restarted for good: from the last complete checkpoint, the torn one discarded
    trainer.env = None
    latest = complete_checkpoints(ckpt)[-1]
    await asyncio.to_thread(trainer.start)
    assert resumes(trainer) == [before, latest]
    assert not list(ckpt.glob(".tmp-*"))
    await pipeline.until(lambda: steps(trainer)[-1]["step"] >= latest + 3, 180, "3 steps after the last resume")

    trainer.signal(signal.SIGTERM)  # a final checkpoint, whose commit reaches the engine
    assert await asyncio.to_thread(trainer.wait) == 0, trainer.log()
    engine.signal(signal.SIGTERM)
    assert await asyncio.to_thread(engine.wait) == 0, engine.log()
    m = engine.last_metrics()
    book = ledger(trainer, ckpt, [tmp_path / "engine-spool"])
    assert_nothing_lost(book, produced=m["engine/sink/spooled"])
    assert len(book["trained"]) >= 4 * (latest + 3) - 4 * 2  # most of it trained, not all dropped
    assert all(i.startswith("engine-0-") for i in book["trained"])
