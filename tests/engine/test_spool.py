"""engine/spool.py on a real directory: round trip, damage on disk, acknowledgement, bound, disk full."""

import errno
import logging

import numpy as np
import pytest
from _sink_child import make_trajectory
from tidal.engine import spool as spool_mod
from tidal.engine.spool import MAGIC, RecordId, Spool, SpoolError
from tidal.protocol.messages import encode

HEADER = 12  # payload length, payload crc32, header crc32


def _ids(spool: Spool) -> list[str]:
    return [traj.id for _, traj in spool.pending()]


def _group(prefix: str, n: int) -> list:
    return [make_trajectory(f"{prefix}-{i}", n=8 + i) for i in range(n)]


def _flip(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_round_trip_in_order_with_exact_contents(tmp_path):
    with Spool(tmp_path, max_bytes=1 << 20) as spool:
        first = spool.append(_group("a", 3))
        second = spool.append(_group("b", 2))
        assert first[0] == RecordId(1, len(MAGIC))  # one segment, the first record right after MAGIC
        assert [r.segment for r in first + second] == [1] * 5
        got = list(spool.pending())
        assert [rid for rid, _ in got] == first + second
        assert [t.id for _, t in got] == ["a-0", "a-1", "a-2", "b-0", "b-1"]
        for (_, traj), want in zip(got, _group("a", 3) + _group("b", 2), strict=True):
            assert np.array_equal(traj.token_ids(), want.token_ids())
            assert np.array_equal(traj.behav_logps(), want.behav_logps())
            assert (traj.reward, traj.turns) == (want.reward, want.turns)
        assert spool.records == 5
        assert spool.bytes == (tmp_path / "000000000001.seg").stat().st_size
        assert spool.corrupt_records == 0


@pytest.mark.parametrize("cut", [1, 100, "header"])
def test_torn_tail_is_skipped_counted_and_logged(tmp_path, caplog, cut):
    with Spool(tmp_path, max_bytes=1 << 20) as spool:
        ids = spool.append(_group("a", 3))
    seg = tmp_path / "000000000001.seg"
    size = seg.stat().st_size
    keep = ids[2].offset + 5 if cut == "header" else size - cut  # inside the last header, or its payload
    with open(seg, "r+b") as f:
        f.truncate(keep)
    with caplog.at_level(logging.WARNING), Spool(tmp_path, max_bytes=1 << 20) as spool:
        assert _ids(spool) == ["a-0", "a-1"]
        assert spool.corrupt_records == 1
    assert f"000000000001.seg at offset {ids[2].offset}: torn tail" in caplog.text


def test_corrupt_middle_record_is_skipped_and_the_rest_read(tmp_path, caplog):
    with Spool(tmp_path, max_bytes=1 << 20) as spool:
        ids = spool.append(_group("a", 3))
    _flip(tmp_path / "000000000001.seg", ids[1].offset + HEADER + 7)
    with caplog.at_level(logging.WARNING), Spool(tmp_path, max_bytes=1 << 20) as spool:
        assert _ids(spool) == ["a-0", "a-2"]
        assert spool.corrupt_records == 1
    assert f"000000000001.seg at offset {ids[1].offset}: checksum mismatch" in caplog.text


def test_corrupt_length_prefix_skips_the_rest_of_its_segment_only(tmp_path, caplog):
    with Spool(tmp_path, max_bytes=1 << 20, segment_bytes=1) as spool:  # one segment per group
        ids = spool.append(_group("a", 4))
        spool.append(_group("b", 2))
    _flip(tmp_path / "000000000001.seg", ids[1].offset + 1)  # the length of a-1
    with caplog.at_level(logging.WARNING), Spool(tmp_path, max_bytes=1 << 20) as spool:
        assert _ids(spool) == ["a-0", "b-0", "b-1"]  # a-1..a-3 cannot be framed; segment 2 is whole
        assert spool.corrupt_records == 1
    assert f"000000000001.seg at offset {ids[1].offset}: corrupt record header" in caplog.text


def test_corruption_found_on_read_is_counted_and_never_returned(tmp_path):
    with Spool(tmp_path, max_bytes=1 << 20) as spool:
        ids = spool.append(_group("a", 3))
        _flip(tmp_path / "000000000001.seg", ids[1].offset + HEADER + 3)  # after the opening scan
        got = spool.read_many(ids)
        assert [t and t.id for t in got] == ["a-0", None, "a-2"]
        assert (spool.corrupt_records, spool.records) == (1, 2)
        assert spool.read_many([ids[1]]) == [None]  # forgotten: not counted twice
        assert spool.corrupt_records == 1


def test_done_records_are_forgotten_and_whole_segments_deleted(tmp_path):
    with Spool(tmp_path, max_bytes=1 << 20, segment_bytes=1) as spool:
        a = spool.append(_group("a", 2))
        b = spool.append(_group("b", 3))
        seg_a, seg_b = tmp_path / "000000000001.seg", tmp_path / "000000000002.seg"
        size_b = seg_b.stat().st_size
        assert spool.bytes == seg_a.stat().st_size + size_b
        assert spool.mark_done(a[:1]) == 1
        assert seg_a.exists() and (tmp_path / "000000000001.done").stat().st_size == 12
        assert spool.mark_done(a + a) == 1  # a-0 was done already; repeats are harmless
        assert not seg_a.exists() and not (tmp_path / "000000000001.done").exists()
        assert spool.bytes == size_b
        assert spool.mark_done([b[0], b[2]]) == 2
        assert _ids(spool) == ["b-1"]
        assert spool.records == 1 and spool.bytes == size_b  # disk is freed a segment at a time
        spool.mark_done(b)
        assert (spool.records, spool.bytes) == (0, 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LOCK"]


def test_restart_from_the_same_dir_yields_only_records_not_done(tmp_path):
    with Spool(tmp_path, max_bytes=1 << 20, segment_bytes=1) as spool:
        a = spool.append(_group("a", 3))
        b = spool.append(_group("b", 2))
        spool.mark_done([a[0], a[2], b[1]])
    with Spool(tmp_path, max_bytes=1 << 20, segment_bytes=1) as spool:
        assert [(rid, t.id) for rid, t in spool.pending()] == [(a[1], "a-1"), (b[0], "b-0")]
        assert spool.first_segment == 3
        c = spool.append(_group("c", 1))  # never into an old segment
        assert c[0].segment == 3
        spool.mark_done([a[1]])
    with Spool(tmp_path, max_bytes=1 << 20) as spool:
        assert _ids(spool) == ["b-0", "c-0"]
        assert spool.corrupt_records == 0


def test_a_torn_done_list_resends_rather_than_loses(tmp_path):
    with Spool(tmp_path, max_bytes=1 << 20) as spool:
        ids = spool.append(_group("a", 3))
        spool.mark_done(ids[:1])
    done = tmp_path / "000000000001.done"
    done.write_bytes(done.read_bytes() + b"\0" * 12 + b"\x07" * 5)  # a zero-filled entry and a torn one
    with Spool(tmp_path, max_bytes=1 << 20) as spool:
        assert _ids(spool) == ["a-1", "a-2"]
        spool.mark_done(ids[1:2])
    with Spool(tmp_path, max_bytes=1 << 20) as spool:
        assert _ids(spool) == ["a-2"]


def test_full_at_max_bytes_and_free_again_once_done(tmp_path):
    record = len(encode(make_trajectory("x-0"))) + HEADER
    max_bytes = len(MAGIC) + 5 * record  # exactly five records in one segment
    with Spool(tmp_path, max_bytes=max_bytes, segment_bytes=1 << 20) as spool:
        ids = []
        for i in range(5):
            assert not spool.full
            ids += spool.append([make_trajectory(f"x-{i}")])
        assert spool.bytes == max_bytes and spool.full
        spool.mark_done(ids[:4])
        assert spool.full  # the segment still holds x-4
        spool.mark_done(ids[4:])
        assert not spool.full and spool.bytes == 0


def test_a_second_spool_on_the_same_dir_is_refused(tmp_path):
    with Spool(tmp_path, max_bytes=1 << 20):
        with pytest.raises(SpoolError, match="in use"):
            Spool(tmp_path, max_bytes=1 << 20)
    Spool(tmp_path, max_bytes=1 << 20).close()


@pytest.mark.parametrize("fail", ["write", "sync"])
def test_disk_full_raises_spool_error_and_damages_nothing(tmp_path, monkeypatch, fail):
    with Spool(tmp_path, max_bytes=1 << 20) as spool:
        before = spool.append(_group("a", 2))
        size = spool.bytes
        real_write = spool_mod._write

        def half_then_enospc(fd, data):  # the disk fills halfway through the group
            real_write(fd, bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, "No space left on device")

        def enospc(fd):
            raise OSError(errno.ENOSPC, "No space left on device")

        if fail == "write":
            monkeypatch.setattr(spool_mod, "_write", half_then_enospc)
        else:
            monkeypatch.setattr(spool_mod, "_datasync", enospc)
        with pytest.raises(SpoolError) as info:
            spool.append(_group("b", 3))
        assert info.value.errno == errno.ENOSPC
        assert str(tmp_path) in str(info.value) and "could not write" in str(info.value)
        assert "bytes (3 trajectories)" in str(info.value)
        monkeypatch.undo()
        assert (spool.bytes, spool.records) == (size, 2)
        assert (tmp_path / "000000000001.seg").stat().st_size == size  # the partial group was cut off
        assert _ids(spool) == ["a-0", "a-1"]
        after = spool.append(_group("c", 1))
        assert after[0].segment == 2  # the failed segment is sealed
    with Spool(tmp_path, max_bytes=1 << 20) as spool:
        assert [rid for rid, _ in spool.pending()] == before + after
        assert spool.corrupt_records == 0
