"""Fuzzing the wire decoder through a live TrajectoryReceiver on loopback.

Random frames and mutations of valid frames: each bad one is rejected with ProtocolError (and
nothing else escapes `decode_*`), counted in the receiver's stats, and a good frame sent after it is
still delivered.
"""

import asyncio
import itertools

import pytest
import zmq
import zmq.asyncio
from _actors import make_trajectory
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from tidal.protocol.channels import TrajectoryReceiver
from tidal.protocol.channels.frames import (
    Data,
    Hello,
    decode_envelope,
    encode_frame,
    trajectory_frames,
    trajectory_from_frames,
)
from tidal.protocol.errors import ProtocolError
from wire_strategies import trajectories

ENGINE, EPOCH = "fuzz", 1


class Live:
    """A receiver and a raw DEALER on one event loop that outlives the hypothesis examples."""

    def __init__(self) -> None:
        self.runner = asyncio.Runner()
        self.seqs = itertools.count(1)
        self.runner.run(self._open())

    async def _open(self) -> None:
        self.rx = await TrajectoryReceiver("tcp://127.0.0.1:0", auto_commit=True, capacity=64).__aenter__()
        self.dealer = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        self.dealer.linger = 0
        self.dealer.connect(self.rx.endpoint)

    async def _exchange(self, frames: list[bytes], timeout: float = 5.0) -> list:
        """Send `frames`, then a good trajectory; return what was delivered up to and including it."""
        sentinel = f"sentinel-{next(self.seqs)}"
        await self.dealer.send_multipart(frames)
        await self.dealer.send_multipart([encode_frame(Data(ENGINE, EPOCH, next(self.seqs), 1)),
                                          *trajectory_frames(make_trajectory(sentinel))])
        got = []
        async with asyncio.timeout(timeout):
            while not got or got[-1].traj.id != sentinel:
                got.append(await self.rx.recv())
        return got

    def exchange(self, frames: list[bytes]) -> list:
        return self.runner.run(self._exchange(frames))

    def close(self) -> None:
        self.dealer.close(linger=0)
        self.runner.run(self.rx.__aexit__(None, None, None))
        self.runner.close()


@pytest.fixture(scope="module")
def live():
    live = Live()
    yield live
    live.close()


def _expected_rejection(frames: list[bytes]) -> bool:
    """Whether the receiver must reject this message; only ProtocolError may come out of decoding."""
    try:
        env = decode_envelope(frames[0])
    except ProtocolError:
        return True
    match env:
        case Hello():
            return len(frames) != 1
        case Data():
            if len(frames) != 3:
                return True
            try:
                trajectory_from_frames(*frames[1:])
            except ProtocolError:
                return True
            return False


@st.composite
def mutated(draw, valid: bytes) -> bytes:
    buf = bytearray(valid)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, max(len(buf) - 1, 0)))
        match draw(st.sampled_from(["flip", "truncate", "insert", "delete"])):
            case "flip" if buf:
                buf[at] ^= draw(st.integers(1, 255))
            case "truncate":
                del buf[at:]
            case "insert":
                buf[at:at] = draw(st.binary(min_size=1, max_size=8))
            case _:
                del buf[at : at + draw(st.integers(1, 8))]
    return bytes(buf)


def _check(live: Live, frames: list[bytes], expect_reject: bool) -> None:
    before = live.rx.stats.rejected
    got = live.exchange(frames)
    assert live.rx.stats.rejected - before == int(expect_reject), live.rx.stats.last_error
    assert len(got) == 1 + (not expect_reject)  # the sentinel, and the frame itself if it was good


FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(st.lists(st.binary(max_size=64), min_size=1, max_size=7))
def test_random_frames(live, frames):
    expect = _expected_rejection(frames)
    assume(expect)  # a random frame that happens to be a valid envelope + trajectory proves nothing
    _check(live, frames, expect)


@FUZZ
@given(st.data(), trajectories(max_tokens=16))
def test_mutated_payloads(live, data, traj):
    parts = [bytes(p) for p in trajectory_frames(traj)]
    which = data.draw(st.integers(0, len(parts) - 1))  # the head or the arrays
    parts[which] = data.draw(mutated(parts[which]))
    frames = [encode_frame(Data(ENGINE, EPOCH, next(live.seqs), 1)), *parts]
    _check(live, frames, _expected_rejection(frames))


@FUZZ
@given(st.data(), trajectories(max_tokens=16))
def test_missing_or_extra_parts(live, data, traj):
    parts = [bytes(p) for p in trajectory_frames(traj)]
    if data.draw(st.booleans()):
        del parts[data.draw(st.integers(0, len(parts) - 1))]
    else:
        parts.insert(data.draw(st.integers(0, len(parts))), data.draw(st.binary(max_size=16)))
    frames = [encode_frame(Data(ENGINE, EPOCH, next(live.seqs), 1)), *parts]
    assert _expected_rejection(frames)
    _check(live, frames, True)


@FUZZ
@given(st.data())
def test_mutated_envelopes(live, data):
    env = data.draw(mutated(encode_frame(Data(ENGINE, EPOCH, 10**9, 1))))
    frames = [env, *trajectory_frames(make_trajectory("x"))]
    expect = _expected_rejection(frames)
    if not expect:  # a still-valid envelope would reuse or skip seqs: only count rejections there
        assume(isinstance(decode_envelope(env), Hello))
    _check(live, frames, expect)
