"""engine/sink.py against a real TrajectoryReceiver (the trainer's side) over real sockets on loopback.

The trainer-absent test uses an ipc:// path: the sink must start before anything listens, and a path
can be named in advance without the find-a-free-port race. The kill test runs real engine processes
(tests/engine/_sink_child.py) against a receiver on tcp://127.0.0.1 port 0 and SIGKILLs one.
"""

import asyncio
import errno
import json
import signal
import sys
from collections import Counter
from pathlib import Path

import pytest
from _sink_child import WINDOW, make_trajectory
from tidal.engine import spool as spool_mod
from tidal.engine.sink import TrajectorySink
from tidal.protocol.channels import TrajectoryReceiver
from tidal.protocol.messages import encode

CHILD = Path(__file__).with_name("_sink_child.py")
RECORD = len(encode(make_trajectory("e0-0"))) + 12  # one spooled trajectory, header included


def _group(engine_id: str, g: int, size: int = 2) -> list:
    return [make_trajectory(f"{engine_id}-{g * size + i}") for i in range(size)]


class _Trainer:
    """Receives from `rx`, and once `committing` is set commits each delivery as it comes."""

    def __init__(self, rx: TrajectoryReceiver, committing: bool = True) -> None:
        self.rx = rx
        self.committing = committing
        self.ids: list[str] = []
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            delivery = await self.rx.recv()
            self.ids.append(delivery.traj.id)
            if self.committing:
                self.rx.commit([delivery])

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


def _spool_files(spool_dir: Path) -> list[str]:
    return sorted(p.name for p in spool_dir.iterdir() if p.name != "LOCK")


async def test_trainer_absent_spool_fills_put_waits_then_everything_arrives_once(tmp_path):
    endpoint = f"ipc://{tmp_path}/trainer.sock"
    spool_dir = tmp_path / "spool"
    async with TrajectorySink(endpoint, "e0", spool_dir, window=4, max_spool_bytes=10 * RECORD,
                              segment_bytes=2 * RECORD, heartbeat_s=0.05) as sink:
        g = 0
        while not sink.full:
            assert sink.room() > 0
            await sink.put(_group("e0", g))
            g += 1
        assert g == 5 and sink.room() == 0  # 10 records, a MAGIC per segment tips it over
        blocked = asyncio.create_task(sink.put(_group("e0", g)))
        await asyncio.sleep(0.3)
        assert not blocked.done()  # back-pressure: no trainer, a full spool
        stats = sink.stats()
        assert (stats["spooled"], stats["committed"], stats["pending"]) == (10, 0, 10)
        async with TrajectoryReceiver(endpoint) as rx:
            trainer = _Trainer(rx)
            await asyncio.wait_for(blocked, 10)  # commits freed whole segments
            for later in range(g + 1, 12):
                await sink.put(_group("e0", later))
            assert await sink.flush(timeout=10)
            await trainer.stop()
        stats = sink.stats()
    assert Counter(trainer.ids) == Counter(f"e0-{i}" for i in range(24))  # each id exactly once
    assert (stats["spooled"], stats["committed"], stats["pending"], stats["spool_bytes"]) == (24, 24, 0, 0)
    assert (stats["corrupt_records"], stats["recovered"], stats["resent"]) == (0, 0, 0)
    assert _spool_files(spool_dir) == []


async def test_a_restarted_sink_sends_what_its_spool_holds_and_skips_a_damaged_record(tmp_path):
    spool_dir = tmp_path / "spool"
    async with TrajectoryReceiver("tcp://127.0.0.1:0") as rx:
        trainer = _Trainer(rx, committing=False)
        async with TrajectorySink(rx.endpoint, "e0", spool_dir, window=4, max_spool_bytes=1 << 20) as sink:
            for g in range(5):
                await sink.put(_group("e0", g))
            async with asyncio.timeout(10):
                while len(trainer.ids) < 4:  # the window's worth arrived, none committed
                    await asyncio.sleep(0.01)
        await trainer.stop()
        assert trainer.ids == [f"e0-{i}" for i in range(4)]
        seg = spool_dir / "000000000001.seg"
        data = bytearray(seg.read_bytes())
        data[-20] ^= 0xFF  # inside the last record, e0-9
        seg.write_bytes(bytes(data))
        trainer = _Trainer(rx)
        async with TrajectorySink(rx.endpoint, "e0", spool_dir, window=4, max_spool_bytes=1 << 20) as sink:
            assert await sink.flush(timeout=10)
            stats = sink.stats()
        await trainer.stop()
    # a new stream: the four delivered before come again (the trainer deduplicates by id)
    assert trainer.ids == [f"e0-{i}" for i in range(9)]
    assert (stats["recovered"], stats["resent"], stats["corrupt_records"]) == (9, 9, 1)
    assert (stats["committed"], stats["pending"], stats["spooled"]) == (9, 0, 0)
    assert _spool_files(spool_dir) == []


async def test_disk_full_pauses_puts_until_the_disk_takes_writes_again(tmp_path, monkeypatch):
    def enospc(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    async with TrajectoryReceiver("tcp://127.0.0.1:0") as rx:
        trainer = _Trainer(rx)
        async with TrajectorySink(rx.endpoint, "e0", tmp_path / "spool", window=4, max_spool_bytes=1 << 20,
                                  retry_s=0.05) as sink:
            await sink.put(_group("e0", 0))
            monkeypatch.setattr(spool_mod, "_write", enospc)
            blocked = asyncio.create_task(sink.put(_group("e0", 1)))
            async with asyncio.timeout(10):
                while sink.stats()["spool_errors"] < 2:  # retried, still refused
                    await asyncio.sleep(0.01)
            assert not blocked.done() and sink.full and sink.room() == 0
            waiting = asyncio.create_task(sink.put(_group("e0", 2)))  # waits before even trying
            await asyncio.sleep(0.2)
            assert not waiting.done()
            monkeypatch.undo()
            await asyncio.wait_for(asyncio.gather(blocked, waiting), 10)
            assert not sink.full
            assert await sink.flush(timeout=10)
            stats = sink.stats()
        await trainer.stop()
    assert sorted(trainer.ids) == sorted(f"e0-{i}" for i in range(6))
    assert (stats["spooled"], stats["committed"], stats["pending"]) == (6, 6, 0)


# --- a real engine process, SIGKILLed


async def _spawn(endpoint: str, spool_dir: Path, count: int) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, str(CHILD), endpoint, str(spool_dir), "e0", str(count),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )


@pytest.mark.parametrize("when", ["after_all_puts", "mid_put"])
async def test_sigkilled_engine_loses_nothing_its_successor_delivers_the_spool(tmp_path, when):
    spool_dir = tmp_path / "spool"
    n = 200
    async with TrajectoryReceiver("tcp://127.0.0.1:0", capacity=1024) as rx:
        trainer = _Trainer(rx, committing=False)  # the trainer never checkpoints while the first child lives
        child = await _spawn(rx.endpoint, spool_dir, n if when == "after_all_puts" else 10**6)
        try:
            spooled = 0
            while spooled < n:
                line = await asyncio.wait_for(child.stdout.readline(), 60)
                assert line, (await child.stderr.read()).decode()
                spooled = int(line.split()[1])
            async with asyncio.timeout(10):
                while len(trainer.ids) < WINDOW:  # the child's window is out, uncommitted
                    await asyncio.sleep(0.01)
        finally:
            child.send_signal(signal.SIGKILL)
            await child.wait()
        assert child.returncode == -signal.SIGKILL
        await trainer.stop()
        before = trainer.ids

        trainer = _Trainer(rx)  # now committing
        successor = await _spawn(rx.endpoint, spool_dir, 0)
        out, err = await asyncio.wait_for(successor.communicate(), 90)
        assert successor.returncode == 0, err.decode()
        await trainer.stop()
    stats = json.loads(out.decode().splitlines()[-1])
    after = trainer.ids
    # Every trajectory whose put had returned arrives (mid_put: the child may have spooled more than
    # it printed before the kill, and a group cut short by it may have left its first records whole).
    assert len(after) == len(set(after))  # the successor's one stream: each once
    assert set(after) == {f"e0-{i}" for i in range(len(after))} and len(after) >= spooled
    duplicates = len(before) + len(after) - len(set(before) | set(after))
    assert len(before) == WINDOW and duplicates == WINDOW  # sent uncommitted before the kill: again
    assert stats["recovered"] == stats["resent"] == stats["committed"] == len(after)
    assert (stats["pending"], stats["spool_bytes"], stats["spooled"]) == (0, 0, 0)
    assert stats["corrupt_records"] <= 1  # at most the torn tail of the group being written
    assert _spool_files(spool_dir) == []
