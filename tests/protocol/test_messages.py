"""protocol/messages.py: round trips of every message type, and strict decoding of bad frames."""

import platform
import re

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tidal.protocol.channels.fastio import tune_allocator
from tidal.protocol.errors import ProtocolError
from tidal.protocol.messages import (
    ARRAY_FIELDS,
    SCHEMA_VERSION,
    Pause,
    TrainerStatus,
    Trajectory,
    Turn,
    _generated_version_span,
    decode,
    decode_parts,
    decode_status,
    decode_trajectory,
    encode,
    encode_parts,
)
from wire_strategies import messages, status_messages, trajectories


@settings(max_examples=150, deadline=None)
@given(messages)
def test_every_message_round_trips(msg):
    frame = encode(msg)
    assert decode(frame) == msg
    assert decode(memoryview(frame)) == msg


@settings(max_examples=50, deadline=None)
@given(trajectories())
def test_trajectory_arrays_are_zero_copy_views(traj):
    frame = bytearray(encode(traj))
    got = decode_trajectory(frame)
    assert len(got) == len(traj)
    np.testing.assert_array_equal(got.token_ids(), traj.token_ids())
    np.testing.assert_array_equal(got.mask(), traj.mask())
    np.testing.assert_array_equal(got.behav_logps(), traj.behav_logps())
    np.testing.assert_array_equal(got.token_versions(), traj.token_versions())
    if len(traj):
        assert np.shares_memory(got.token_ids(), np.frombuffer(frame, np.uint8))  # a view, not a copy


@settings(max_examples=50, deadline=None)
@given(status_messages)
def test_status_messages_decode_on_the_status_channel(msg):
    assert decode_status(encode(msg)) == msg


def _valid() -> Trajectory:
    return Trajectory.build(
        id="e0-7", group_id="g0", env_id="games:GuessTheNumber-v0", task_seed=3,
        tokens=[1, 2, 3, 4], loss_mask=[0, 0, 1, 1], behav_logp=[0, 0, -0.5, -0.25],
        versions=[-1, -1, 7, 8], turns=[Turn(2, 4, 1.0)], reward=1.0,
    )


def _fields() -> dict:
    """The valid trajectory as a plain msgpack map whose fields the cases below spoil one by one."""
    return msgspec.to_builtins(_valid(), builtin_types=(bytes, bytearray, memoryview))


def _frame(**changes) -> bytes:
    return msgspec.msgpack.encode({**_fields(), **changes})


BAD_FRAMES = {
    "garbage": (b"\xc1\xff\x00garbage", "MessagePack data is malformed"),
    "truncated": (encode(_valid())[:-3], "truncated"),
    "empty": (b"", "truncated"),
    "wrong schema version": (_frame(schema_version=SCHEMA_VERSION + 1), "schema_version 2 is not supported"),
    "wrong type": (_frame(task_seed="three"), "Expected `int`, got `str` - at `$.task_seed`"),
    "missing field": (msgspec.msgpack.encode({k: v for k, v in _fields().items() if k != "tokens"}), "tokens"),
    "tokens not whole uint32": (_frame(tokens=b"\x01\x02\x03"), "not a multiple of 4"),
    "arrays of different lengths": (_frame(behav_logp=b"\x00" * 12), "behav_logp is 12 bytes, expected 16"),
    "mask not 0/1": (_frame(loss_mask=b"\x00\x00\x01\x02"), "loss_mask holds values other than 0 and 1"),
    "positive logprob": (_frame(behav_logp=np.float32([0, 0, 0.5, -1]).tobytes()), "behav_logp"),
    "nan logprob": (_frame(behav_logp=np.float32([0, 0, np.nan, -1]).tobytes()), "behav_logp"),
    "turn outside tokens": (_frame(turns=[[2, 9, 1.0]]), "turn 0 span [2, 9)"),
    "turns out of order": (_frame(turns=[[2, 4, 0.0], [0, 1, 0.0]]), "turn 1 span"),
    "nan reward": (_frame(reward=float("nan")), "reward nan is not finite"),
    "reward not the sum of turn rewards": (_frame(reward=2.0), "reward 2.0 is not the sum of its 1 turn rewards (1.0)"),
    "reward without turns": (_frame(turns=[], reward=0.5), "reward 0.5 is not the sum of its 0 turn rewards (0.0)"),
    "non-finite sampling": (_frame(sampling={"top_p": float("nan")}), "sampling top_p = nan is not finite"),
    "negative temperature": (_frame(sampling={"temperature": -1.0}), "sampling temperature -1.0 is negative"),
    "min/max version mismatch": (_frame(min_version=3), "min_version/max_version are 3/8"),
    "generated token without version": (_frame(versions=np.int32([-1, -1, -1, 8]).tobytes(), min_version=-1),
                                        "negative policy version"),
    "unknown tag": (msgspec.msgpack.encode({"type": "nope"}), "Invalid value 'nope'"),
}


@pytest.mark.parametrize("name", list(BAD_FRAMES))
def test_bad_frames_raise_protocol_error_naming_the_problem(name):
    frame, expected = BAD_FRAMES[name]
    with pytest.raises(ProtocolError, match=re.escape(expected)):
        decode(frame)


def test_the_final_reward_is_the_sum_of_the_turn_rewards_within_a_relative_tolerance():
    def build(turn_rewards, reward, tid="e1"):
        n = 2 * len(turn_rewards)
        return Trajectory.build(
            id=tid, group_id="g", env_id="test", task_seed=0, tokens=list(range(n)), loss_mask=[1] * n,
            behav_logp=[-0.5] * n, versions=[0] * n, reward=reward,
            turns=[Turn(2 * i, 2 * i + 2, r) for i, r in enumerate(turn_rewards)],
        )

    assert build([0.1, 0.2], 0.3).reward == 0.3  # 0.1 + 0.2 = 0.30000000000000004: rounding is no mismatch
    assert build([1.0], 1.0 + 0.9e-5).turns[0].reward == 1.0  # within 1e-5 * max(1, |reward|)
    assert build([1e6, 0.0], 1e6 + 9.0).reward == 1e6 + 9.0  # relative for large rewards: 1e-5 * 1e6 = 10
    assert build([], 0.0).reward == 0.0
    with pytest.raises(ValueError, match=re.escape("trajectory e1: reward 1.00002 is not the sum of its 1 turn rewards (1.0)")):
        build([1.0], 1.00002)
    with pytest.raises(ValueError, match=re.escape("trajectory outcome-only: reward 1.0 is not the sum of its 2 turn "
                                                   "rewards (0.0)")):
        build([0.0, 0.0], 1.0, tid="outcome-only")  # an outcome score belongs on the last turn
    with pytest.raises(ValueError, match=re.escape("reward 1.0 is not the sum of its 0 turn rewards (0.0)")):
        build([], 1.0)
    with pytest.raises(ProtocolError, match="is not the sum of its"):  # decode: a counted rejection
        decode(_frame(turns=[[2, 3, 0.25], [3, 4, 0.25]], reward=1.0))
    assert decode(_frame(turns=[[2, 3, 0.75], [3, 4, 0.25]], reward=1.0)).reward == 1.0


def test_sampling_settings_round_trip_and_default_to_empty_for_an_old_sender():
    t = msgspec.structs.replace(_valid(), sampling={"temperature": 0.7, "top_p": 0.9, "top_k": -1, "masked": False})
    assert decode(encode(t)).sampling == {"temperature": 0.7, "top_p": 0.9, "top_k": -1, "masked": False}
    assert decode_parts(encode_parts(t)).sampling == t.sampling
    old = msgspec.msgpack.encode({k: v for k, v in _fields().items() if k != "sampling"})
    assert decode(old).sampling == {} and _valid().sampling == {}


def test_status_channel_refuses_a_trajectory_and_bad_ranges():
    with pytest.raises(ProtocolError, match="trajectory"):
        decode_status(encode(_valid()))
    bad_status = msgspec.msgpack.encode({"type": "status", "version": -1, "consumed": 0})
    with pytest.raises(ProtocolError, match="version -1"):
        decode_status(bad_status)
    with pytest.raises(ProtocolError, match="schema_version 9"):
        decode_status(msgspec.msgpack.encode({"type": "pause", "schema_version": 9}))
    with pytest.raises(ProtocolError, match="deadline_s"):
        decode_status(msgspec.msgpack.encode({"type": "drain", "deadline_s": -1.0}))
    assert decode_status(encode(Pause())) == Pause()
    assert decode_status(encode(TrainerStatus(version=3, consumed=9))).consumed == 9


def test_deep_nesting_is_a_protocol_error():
    with pytest.raises(ProtocolError):
        decode(b"\x91" * 100_000)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(-3, 2**31 - 1)), max_size=40))
def test_generated_version_span_matches_a_plain_loop(pairs):
    mask = np.array([m for m, _ in pairs], dtype=np.uint8)
    versions = np.array([v for _, v in pairs], dtype=np.int32)
    lo, hi = _generated_version_span(versions, mask)
    generated = [v for m, v in pairs if m]
    if not generated:
        assert (lo, hi) == (-1, -1)
    elif min(generated) < 0:
        assert lo < 0
    else:
        assert (lo, hi) == (min(generated), max(generated))


# --- the trajectory channel's framing: a head, then each array as its own frame


@settings(max_examples=100, deadline=None)
@given(trajectories())
def test_parts_round_trip_without_copying_the_arrays(traj):
    parts = encode_parts(traj)
    assert len(parts) == 1 + len(ARRAY_FIELDS)
    for part, name in zip(parts[1:], ARRAY_FIELDS, strict=True):
        assert part is getattr(traj, name)  # sent from the trajectory's own buffer
    frames = [bytearray(p) for p in parts]  # as received: one buffer per frame
    got = decode_parts([memoryview(f) for f in frames])
    assert got == traj
    assert encode(got) == encode(traj)  # the same message as the single-frame encoding
    if len(traj):
        assert np.shares_memory(got.behav_logps(), np.frombuffer(frames[3], np.uint8))


def _parts(frame: bytes) -> list:
    """A BAD_FRAMES trajectory map split the way `encode_parts` splits a trajectory."""
    fields = msgspec.msgpack.decode(frame)
    head = {k: v for k, v in fields.items() if k not in ARRAY_FIELDS}
    return [msgspec.msgpack.encode(head), *(fields[k] for k in ARRAY_FIELDS)]


SPLITTABLE = [name for name in BAD_FRAMES if name not in ("garbage", "truncated", "empty",
                                                                             "missing field", "unknown tag")]


@pytest.mark.parametrize("name", SPLITTABLE)
def test_parts_reject_what_a_whole_frame_rejects(name):
    frame, expected = BAD_FRAMES[name]
    with pytest.raises(ProtocolError, match=re.escape(expected)):
        decode_parts(_parts(frame))


def test_malformed_parts_raise_protocol_error():
    good = encode_parts(_valid())
    with pytest.raises(ProtocolError, match="expected a head and 4 arrays, got 4 parts"):
        decode_parts(good[:4])
    with pytest.raises(ProtocolError, match="expected a head and 4 arrays, got 6 parts"):
        decode_parts([*good, b""])
    with pytest.raises(ProtocolError, match="trajectory head"):
        decode_parts([b"\xc1garbage", *good[1:]])
    with pytest.raises(ProtocolError, match="trajectory head"):
        decode_parts([encode(TrainerStatus(version=1, consumed=0)), *good[1:]])
    with pytest.raises(ProtocolError, match="loss_mask is 3 bytes, expected 4"):
        decode_parts([good[0], good[1], bytes(good[2])[:3], good[3], good[4]])
    assert decode_parts(good) == _valid()


def test_allocator_thresholds_are_accepted_where_libc_is_glibc():
    assert tune_allocator() is (platform.libc_ver()[0] == "glibc")  # mallopt refuses out-of-range values
