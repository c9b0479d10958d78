"""The engine SIGKILLed under the real trainer, a torn record left at its spool's tail, then restarted.

(tests/engine/test_engine_faults.py checks the spool's resend against a stand-in trainer; here the
real trainer deduplicates, trains and commits.) After the restart the spool left by the killed run is
delivered and trained on once; the record torn mid-write fails its checksum and is skipped with a
count, never sent; and the episodes the killed run had in flight are counted by the trainer as lost
work, never trained on as data.
"""

import asyncio
import signal
import struct
import zlib

import msgspec
import pytest
from tidal.engine.spool import Spool
from tidal.protocol.messages import encode

from tests.engine.test_engine_faults import PLUGIN_ENV
from tests.faults.pipeline import ledger, metrics, spool_pending, steps, trained
from tests.trainer.proc import records

pytestmark = pytest.mark.slow

HEARD_S = 1.2
"""More than two heartbeat intervals: a heartbeat sent in it has surely reached the trainer."""


def tear_a_record_onto(spool_dir, traj_id: str) -> None:
    """Append to the newest segment what a kill mid-append leaves: a whole header, half its payload."""
    with Spool(spool_dir, max_bytes=1 << 30) as spool:
        _, like = next(iter(spool.pending()))
    payload = encode(msgspec.structs.replace(like, id=traj_id))
    head = struct.pack("<II", len(payload), zlib.crc32(payload))
    newest = sorted(spool_dir.glob("*.seg"))[-1]
    with open(newest, "ab") as f:
        f.write(head + struct.pack("<I", zlib.crc32(head)) + payload[: len(payload) // 2])


def heard_in_flight(engine) -> bool:
    """Whether the engine's current episodes have been in flight for `HEARD_S` with no episode started
    since, and it holds trajectories not yet committed. The trainer counts as lost what the engine's
    last heartbeat (every 0.5 s) reported in flight, so the kill must not follow a start too closely:
    episodes end together here, and a kill just after the next ones start would find the trainer last
    told of none."""
    rows = [r for r in records(engine.jsonl) if "engine/episodes_started" in r or r.get("event") == "ready"]
    run = rows[max((i for i, r in enumerate(rows) if r.get("event") == "ready"), default=-1) + 1:]
    if not run or run[-1]["engine/episodes_in_flight"] == 0 or run[-1].get("engine/sink/pending", 0) < 4:
        return False
    last = run[-1]
    return any(last["time"] - r["time"] >= HEARD_S for r in run
               if r["engine/episodes_started"] == last["engine/episodes_started"])


async def test_engine_killed_then_restarted_delivers_its_spool_skips_a_torn_record_and_loses_in_flight_work(
        tmp_path, pipeline):
    spool_dir = tmp_path / "engine-spool"
    server = await asyncio.to_thread(pipeline.server)
    # A staleness budget that never binds: nothing is dropped as stale, so every id is accounted for.
    trainer = pipeline.trainer(intake={"max_staleness": 1000},
                               checkpoint={"dir": str(tmp_path / "ckpt"), "every_steps": 4})
    ready = await asyncio.to_thread(trainer.start)
    engine = pipeline.engine([server.url], ready, env=PLUGIN_ENV, tasks=[{"env": "faulty:Slow-v0"}],  # 1 s a step
                             agent={"type": "chat", "max_turns": 3, "max_new_tokens": 6})
    await asyncio.to_thread(engine.start)
    await pipeline.until(lambda: len(steps(trainer)) >= 2 and heard_in_flight(engine), 180,
                "2 steps, with episodes in flight that a heartbeat reported, and trajectories not committed")
    engine.signal(signal.SIGKILL)
    await asyncio.to_thread(engine.wait)
    first_epoch = engine.events("ready")[-1]["epoch"]
    left = spool_pending(spool_dir)  # produced, not yet committed by a checkpoint
    assert left
    tear_a_record_onto(spool_dir, "torn-0")

    await asyncio.to_thread(engine.start)
    m = await pipeline.until(lambda: metrics(engine), 60, "the restarted engine's metrics")
    assert m["engine/sink/recovered"] == len(left) and m["engine/sink/corrupt_records"] == 1, m
    await pipeline.until(lambda: set(left) <= set(trained(trainer)), 180, "the killed run's spool to be trained on")
    lost = await pipeline.until(lambda: steps(trainer)[-1].get("trainer/engines/lost_episodes", 0), 60,
                       "the trainer to count the killed run's in-flight episodes as lost")

    trainer.signal(signal.SIGTERM)
    assert await asyncio.to_thread(trainer.wait) == 0, trainer.log()
    engine.signal(signal.SIGTERM)
    assert await asyncio.to_thread(engine.wait) == 0, engine.log()
    book = ledger(trainer, tmp_path / "ckpt", [spool_dir])
    used = book["trained"]
    assert len(used) == len(set(used)), "a trajectory was trained on twice"
    seen = set(used) | set(book["buffered"]) | set(book["pending"])
    assert "torn-0" not in seen and book["rejected"] == 0  # never sent half, never sent at all
    assert book["stale_dropped"] == 0
    assert 1 <= lost <= 8  # at most max_concurrent were in flight at the kill
    first_run = {i for i in seen if i.startswith(f"engine-0-{first_epoch}-")}
    assert set(left) <= first_run
