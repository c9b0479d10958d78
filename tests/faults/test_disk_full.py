"""Disk full for the weights directory, the checkpoint directory and the engine's spool, on real small
filesystems: tmpfs mounts in a user + mount namespace (no root needed) that the trainer and the engine
run in (tests/faults/pipeline.py `SmallDisks`), filled by the test while they run, then freed.

Expected: a clear error naming the directory, back-pressure instead of loss, and nothing already
written damaged: published weights and checkpoints are written to a temporary name, fsynced and
renamed, so a full disk leaves the earlier ones whole; the spool keeps what it had, retries, and
stops admission meanwhile.
"""

import asyncio
import hashlib
import signal

import pytest

from tests.faults.pipeline import (
    SmallDisks,
    assert_nothing_lost,
    can_unshare,
    ledger,
    metrics,
    steps,
)
from tests.trainer.proc import records

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not can_unshare(), reason="needs unprivileged user + mount namespaces")]


def digests(d) -> dict[str, str]:
    """sha256 of every file under `d`, by relative path: what "not corrupted" means here."""
    return {str(f.relative_to(d)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.rglob("*"))
            if f.is_file()}


def assert_whole(before: dict[str, str], after: dict[str, str]) -> None:
    """Every file written before the disk filled is unchanged, and every version or checkpoint directory
    is complete (a write that got in meanwhile may have added one and pruned the oldest)."""
    after = {k: v for k, v in after.items() if k != "filler"}
    assert {k: after[k] for k in before.keys() & after.keys()} == {k: before[k] for k in before.keys() & after.keys()}
    dirs = {k.split("/")[0] for k in after}
    files = {d: {k.split("/", 1)[1] for k in after if k.startswith(f"{d}/")} for d in dirs}
    assert len({frozenset(f) for f in files.values()}) == 1, files  # the same files in every directory
    assert not [d for d in dirs if d.startswith(".")], dirs


def events(trainer, name: str) -> list[dict]:
    return [r for r in records(trainer.jsonl) if r.get("event") == name]


async def test_full_weights_checkpoint_and_spool_disks_corrupt_nothing_and_lose_nothing(tmp_path, pipeline):
    weights, ckpt, spool = tmp_path / "weights", tmp_path / "ckpt", tmp_path / "engine-spool"
    with SmallDisks([weights, ckpt, spool], size="8m") as disks:
        server = await asyncio.to_thread(pipeline.server, wrap=disks.wrap)  # it reads the weights there
        trainer = pipeline.trainer(wrap=disks.wrap)
        ready = await asyncio.to_thread(trainer.start)
        engine = pipeline.engine([server.url], ready, wrap=disks.wrap)
        await asyncio.to_thread(engine.start)
        await pipeline.until(lambda: events(trainer, "checkpoint") and len(events(trainer, "publish")) >= 2, 180,
                    "a checkpoint and 2 publishes")

        # 1. weights disk full: publishing fails with a clear error, training goes on, the engine waits
        # for weights (its tokens would be too stale) rather than running ahead, published ones stay whole.
        # Filled again while waiting: a write that got in first frees an old version as it prunes.
        published = digests(disks.view(weights))
        failed = await pipeline.until(lambda: (disks.fill(weights), events(trainer, "publish_failed"))[1], 120,
                             "a failed publish")
        assert "publish.dir" in failed[0]["error"] and "No space left" in failed[0]["error"], failed[0]
        await pipeline.until(lambda: metrics(engine).get("engine/admission_blocked/weights", 0), 60, "back-pressure")
        assert_whole(published, digests(disks.view(weights)))
        disks.free(weights)
        done = len(events(trainer, "publish"))
        await pipeline.until(lambda: len(events(trainer, "publish")) > done, 120, "publishing again")

        # 2. checkpoint disk full: the trainer stops with one clear line; the checkpoints before stay whole
        # and the restarted trainer resumes from the newest; the engine spools meanwhile
        saved = digests(disks.view(ckpt))
        await pipeline.until(lambda: (disks.fill(ckpt), trainer.proc.poll() is not None)[1], 180, "the trainer to stop")
        assert trainer.proc.returncode != 0
        last = trainer.log().strip().splitlines()[-1]
        assert "checkpoint.dir" in last and "No space left" in last, trainer.log()
        assert not [p for p in disks.view(ckpt).iterdir() if p.name.startswith(".tmp-")]
        assert_whole(saved, digests(disks.view(ckpt)))
        await pipeline.until(lambda: metrics(engine).get("engine/admission_blocked/no_trainer", 0), 60, "back-pressure")
        disks.free(ckpt)
        newest = max(int(p.name[5:]) for p in disks.view(ckpt).glob("step-*"))
        await asyncio.to_thread(trainer.start)
        assert events(trainer, "resume")[-1]["step"] == newest

        # 3. spool disk full: appends fail and are retried, counted, admission stops; nothing is lost
        def full_spool(key: str) -> float:  # filled again and again: committed segments free space as they go
            disks.fill(spool)
            return metrics(engine).get(key, 0)

        await pipeline.until(lambda: full_spool("engine/sink/spool_errors"), 120, "a failed spool write")
        assert "No space left" in engine.log() and str(spool) in engine.log()
        await pipeline.until(lambda: full_spool("engine/admission_blocked/spool_full"), 60, "back-pressure")
        disks.free(spool)
        at = len(steps(trainer))
        await pipeline.until(lambda: len(steps(trainer)) >= at + 2, 180, "2 more steps")

        trainer.signal(signal.SIGTERM)
        assert await asyncio.to_thread(trainer.wait) == 0, trainer.log()
        engine.signal(signal.SIGTERM)
        assert await asyncio.to_thread(engine.wait) == 0, engine.log()
        m = metrics(engine)
        assert_nothing_lost(ledger(trainer, disks.view(ckpt), [disks.view(spool)]), m["engine/sink/spooled"])
