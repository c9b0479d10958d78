"""protocol/channels/dedup.py: the watermark + out-of-order set against a plain Python set."""

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st
from tidal.protocol.channels.dedup import MAX_EPOCHS_PER_ENGINE, DedupState, SeqSet, StreamTable


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 60), max_size=200))
def test_seqset_matches_a_plain_set(seqs):
    fast, plain = SeqSet(), set()
    for seq in seqs:
        assert fast.add(seq) == (seq not in plain)
        plain.add(seq)
    assert all((s in fast) == (s in plain) for s in range(1, 70))
    # Bounded memory: only the seqs above the contiguous prefix are stored.
    prefix = next(i for i in range(1, 70) if i not in plain) - 1
    assert fast.upto == prefix
    assert fast.above == {s for s in plain if s > prefix}


def test_in_order_stream_keeps_no_set():
    s = SeqSet()
    for seq in range(1, 10_001):
        s.add(seq)
    assert (s.upto, s.above) == (10_000, set())
    assert 10_000 in s and 10_001 not in s


def test_state_round_trips_and_includes_pending():
    table = StreamTable()
    for seq in (1, 2, 3, 5):
        table.get("e0", 11).add(seq)
    state = table.state(including=[("e0", 11, 7), ("e1", 12, 1)])
    assert table.contains("e0", 11, 5) and not table.contains("e0", 11, 7)  # `including` did not mutate
    back = msgspec.msgpack.decode(msgspec.msgpack.encode(state), type=DedupState)
    restored = StreamTable(back)
    assert [s for s in range(1, 9) if restored.contains("e0", 11, s)] == [1, 2, 3, 5, 7]
    assert restored.contains("e1", 12, 1) and not restored.contains("e1", 13, 1)


def test_old_epochs_of_an_engine_are_forgotten():
    table = StreamTable()
    for epoch in range(MAX_EPOCHS_PER_ENGINE + 2):
        table.get("e0", epoch).add(1)
    table.get("e1", 0).add(1)
    kept = [e for e in range(MAX_EPOCHS_PER_ENGINE + 2) if table.contains("e0", e, 1)]
    assert kept == list(range(2, MAX_EPOCHS_PER_ENGINE + 2))
    assert table.contains("e1", 0, 1)
