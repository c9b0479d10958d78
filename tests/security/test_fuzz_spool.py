"""Hostile bytes in the engine's spool directory (engine/spool.py): a segment with bytes flipped,
cut, inserted or overwritten, its done-list damaged, or a segment of arbitrary bytes. Opening and
reading never raise; every record is either returned intact (exactly as appended) or skipped and
counted in `corrupt_records`; a record is never returned twice or half; and the spool still appends
and reads new records afterwards."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tidal.engine.spool import MAGIC, Spool
from tidal.protocol.messages import Trajectory, Turn

FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
SEG = "000000000001.seg"


def trajectory(i: int) -> Trajectory:
    n = 6 + i
    return Trajectory.build(id=f"t-{i}", group_id=f"g-{i // 2}", env_id="fuzz", task_seed=i,
                            tokens=list(range(100 + i, 100 + i + n)), loss_mask=[0, 0] + [1] * (n - 2),
                            behav_logp=[0.0, 0.0] + [-0.25 * (k + 1) for k in range(n - 2)],
                            versions=[-1, -1] + [i] * (n - 2), turns=[Turn(2, n, float(i))], reward=float(i))


def same(a: Trajectory, b: Trajectory) -> bool:
    return (a.id == b.id and np.array_equal(a.token_ids(), b.token_ids())
            and np.array_equal(a.behav_logps(), b.behav_logps()) and np.array_equal(a.mask(), b.mask())
            and np.array_equal(a.token_versions(), b.token_versions()) and a.turns == b.turns and a.reward == b.reward)


damage = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.integers(0, 10_000), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 10_000), st.binary(min_size=1, max_size=40)),
    st.tuples(st.just("overwrite"), st.integers(0, 10_000), st.binary(min_size=1, max_size=40)),
)


def apply(data: bytearray, how) -> bytearray:
    kind, at, arg = how
    at = at % (len(data) + 1)
    if kind == "flip" and at < len(data):
        data[at] ^= arg
    elif kind == "cut":
        del data[at:]
    elif kind == "insert":
        data[at:at] = arg
    elif kind == "overwrite":
        data[at:at + len(arg)] = arg
    return data


def reopen_and_check(path, originals: dict[str, Trajectory], expect: set[str]) -> None:
    """`expect`: the ids that must be returned or counted as corrupt."""
    with Spool(path, max_bytes=1 << 20) as spool:
        got = list(spool.pending())
        ids = [t.id for _, t in got]
        assert len(ids) == len(set(ids)), f"a record returned twice: {ids}"
        for _, t in got:
            assert t.id in originals and same(t, originals[t.id]), f"{t.id} is not as it was appended"
        lost = expect - set(ids)
        assert not lost or spool.corrupt_records >= 1, f"{sorted(lost)} vanished uncounted"
        assert ids == [i for i in originals if i in ids], "records out of order"
        # the spool goes on: a new record after the damage is stored and read back whole
        fresh = trajectory(99)
        spool.append([fresh])
        after = [t for _, t in spool.pending()]
        assert after and same(after[-1], fresh)


def test_fuzz_finds_nothing_wrong_with_an_undamaged_spool(tmp_path):
    originals = {t.id: t for t in map(trajectory, range(5))}
    with Spool(tmp_path, max_bytes=1 << 20) as spool:
        spool.append(originals.values())
    with Spool(tmp_path, max_bytes=1 << 20) as spool:
        assert [t.id for _, t in spool.pending()] == list(originals) and spool.corrupt_records == 0


@FUZZ
@given(st.integers(1, 6), st.lists(damage, min_size=1, max_size=4), st.sets(st.integers(0, 5)))
def test_a_damaged_segment_returns_records_intact_or_counts_them(tmp_path_factory, n, damages, done):
    path = tmp_path_factory.mktemp("spool")
    originals = {t.id: t for t in map(trajectory, range(n))}
    with Spool(path, max_bytes=1 << 20) as spool:
        rids = spool.append(originals.values())
        done = [i for i in sorted(done) if i < n][:n - 1]  # some, never all: the segment stays
        spool.mark_done([rids[i] for i in done])
    expect = {f"t-{i}" for i in range(n)} - {f"t-{i}" for i in done}
    seg = path / SEG
    if seg.exists():
        data = bytearray(seg.read_bytes())
        for how in damages:
            data = apply(data, how)
        seg.write_bytes(bytes(data))
        if len(data) < len(MAGIC):  # indistinguishable from a segment created just before a crash:
            expect = set()          # nothing was ever synced into it, as far as the spool can tell
    reopen_and_check(path, originals, expect)


@FUZZ
@given(st.integers(2, 6), st.binary(max_size=80), st.booleans())
def test_a_damaged_done_list_resends_rather_than_loses(tmp_path_factory, n, junk, replace):
    path = tmp_path_factory.mktemp("spool")
    originals = {t.id: t for t in map(trajectory, range(n))}
    with Spool(path, max_bytes=1 << 20) as spool:
        rids = spool.append(originals.values())
        spool.mark_done(rids[:1])
    done = path / "000000000001.done"
    done.write_bytes(junk if replace else done.read_bytes() + junk)
    with Spool(path, max_bytes=1 << 20) as spool:
        ids = [t.id for _, t in spool.pending()]
        assert set(ids) >= {f"t-{i}" for i in range(1, n)}, "a record not done was lost"
        for _, t in spool.pending():
            assert same(t, originals[t.id])


@FUZZ
@given(st.one_of(st.binary(max_size=300), st.binary(max_size=300).map(lambda b: MAGIC + b)),
       st.sampled_from([SEG, "000000000007.seg", "000000000002.done", "notanumber.seg", "LOCK"]))
def test_arbitrary_files_in_the_spool_directory_never_raise(tmp_path_factory, raw, name):
    path = tmp_path_factory.mktemp("spool")
    (path / name).write_bytes(raw)
    with Spool(path, max_bytes=1 << 20) as spool:
        assert list(spool.pending()) == []
        fresh = trajectory(1)
        spool.append([fresh])
        assert [t.id for _, t in spool.pending()][-1] == "t-1"


def test_a_short_foreign_segment_is_counted(tmp_path):
    """Fewer bytes than MAGIC that are not its start: not a segment cut by a crash, but damage."""
    (tmp_path / SEG).write_bytes(b"junk")
    with Spool(tmp_path, max_bytes=1 << 20) as spool:
        assert list(spool.pending()) == [] and spool.corrupt_records == 1
