"""The trajectory channel's own frames: a small delivery envelope beside each encoded Trajectory.

A trajectory travels as two frames (`trajectory_frames`): the msgpack head of `messages.encode_parts`
and its four arrays in one frame, in `PACKED_FIELDS` order (13 bytes per token), so the message stays
the message; the envelope says who sent it and in which order. Engine -> trainer:
`[Data, head, arrays]` or `[Hello]`. One arrays frame instead of four: each frame costs both ends
Python calls, and each large one a zero-copy hand-off through pyzmq's garbage-collector thread,
which together weighed more per 32k-token trajectory than encoding and validating it. Trainer ->
engine: `[Ack]`, the whole acknowledgement state of one stream (cumulative, so a lost ack costs
nothing: the next one says it again). Every frame is decoded strictly; anything else is a
`ProtocolError` that the reading side counts.
"""

from __future__ import annotations

import asyncio
import ctypes
import time

import msgspec
import zmq
from tidal.protocol.errors import ProtocolError
from tidal.protocol.messages import PACKED_FIELDS, Trajectory, decode_parts, encode_parts

__all__ = [
    "ENVELOPE_VERSION",
    "Data",
    "Hello",
    "Ack",
    "Delivery",
    "ChannelStats",
    "encode_frame",
    "decode_envelope",
    "decode_ack",
    "trajectory_frames",
    "trajectory_from_frames",
    "BYTES_PER_TOKEN",
    "bind",
    "BIND_RETRY_S",
]

ENVELOPE_VERSION = 3
"""Bumped on any change to Data, Hello or Ack other than appending a defaulted field, or to the
frames that follow Data (2: the trajectory as head and array frames instead of one payload; 3: the
four arrays in one frame)."""


def _check(name: str, version: int) -> None:
    if version != ENVELOPE_VERSION:
        raise ValueError(f"{name}: envelope version {version} is not supported (expected {ENVELOPE_VERSION})")


class Data(msgspec.Struct, tag="data", array_like=True, frozen=True):
    """Envelope of one trajectory: stream `(engine_id, epoch)`, position `seq` (1, 2, ...).

    `floor` is the sender's lowest unacknowledged seq: every seq below it was committed by some
    trainer incarnation, so a receiver that has no state for the stream (no checkpoint, or one
    that forgot it) starts its watermark there instead of at 0.
    """

    engine_id: str
    epoch: int
    seq: int
    floor: int
    version: int = ENVELOPE_VERSION

    def __post_init__(self) -> None:
        _check("data", self.version)
        if not 1 <= self.floor <= self.seq:
            raise ValueError(f"data: seq {self.seq} and floor {self.floor} must satisfy 1 <= floor <= seq")


class Hello(msgspec.Struct, tag="hello", array_like=True, frozen=True):
    """Heartbeat from an engine (with its `floor`, as in Data); the trainer answers with an Ack."""

    engine_id: str
    epoch: int
    floor: int
    version: int = ENVELOPE_VERSION
    started: int = 0
    """Episodes this engine incarnation has started and not discarded (the trainer's grants count them:
    protocol/grants.py; the engine hands its discards back itself)."""
    in_flight: int = 0
    """Of those, episodes still running."""
    capacity: int = 0
    """Episodes it may run at once; 0: a sender that asks for no grants."""

    def __post_init__(self) -> None:
        _check("hello", self.version)
        if self.floor < 1:
            raise ValueError(f"hello: floor {self.floor} must be >= 1")
        if min(self.started, self.in_flight, self.capacity) < 0 or self.in_flight > self.started:
            raise ValueError(f"hello: started {self.started}, in_flight {self.in_flight} and capacity "
                             f"{self.capacity} must be >= 0 with in_flight <= started")


class Ack(msgspec.Struct, tag="ack", array_like=True, frozen=True):
    """A trainer incarnation's state for one stream.

    `committed`/`committed_above`: seqs the consumer made durable (the engine may forget them).
    `seen`/`seen_above`: seqs this trainer incarnation holds (the engine need not resend them).
    Both are a watermark plus the seqs above it (see `dedup.SeqSet`).
    """

    trainer: int
    epoch: int
    committed: int
    committed_above: list[int]
    seen: int
    seen_above: list[int]
    version: int = ENVELOPE_VERSION

    def __post_init__(self) -> None:
        _check("ack", self.version)


class Delivery(msgspec.Struct, frozen=True, gc=False):
    """One trajectory handed to the consumer, with the identity it must `commit`."""

    traj: Trajectory
    engine_id: str
    epoch: int
    seq: int


class ChannelStats(msgspec.Struct):
    """Counters of one channel end (a field that does not apply to a side stays 0)."""

    sent: int = 0
    """sender: trajectories sent for the first time"""
    resent: int = 0
    """sender: sends of a trajectory the trainer had not seen after a timeout or a trainer restart"""
    acked: int = 0
    """sender: trajectories the trainer committed (forgotten by the sender)"""
    received: int = 0
    """receiver: data frames read"""
    delivered: int = 0
    """receiver: trajectories handed to the consumer (each exactly once)"""
    duplicates: int = 0
    """receiver: data frames of a trajectory already seen or committed (dropped)"""
    committed: int = 0
    """receiver: deliveries the consumer committed"""
    rejected: int = 0
    """both: frames that failed strict decoding (counted, dropped; the channel keeps going)"""
    last_error: str = ""
    """both: the message of the last rejection"""
    refused: int = 0
    """both, with CURVE keys: failed handshakes (receiver: a peer without an allowed key; sender: the
    trainer refused this engine's key)"""


_encoder = msgspec.msgpack.Encoder()
_envelope = msgspec.msgpack.Decoder(Data | Hello)
_ack = msgspec.msgpack.Decoder(Ack)


def encode_frame(frame: Data | Hello | Ack) -> bytes:
    return _encoder.encode(frame)


def _decode(decoder: msgspec.msgpack.Decoder, what: str, buf):
    try:
        return decoder.decode(buf)
    except msgspec.DecodeError as exc:  # ValidationError is a subclass
        raise ProtocolError(f"bad {what} ({len(buf)} bytes): {exc}") from None
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        raise ProtocolError(f"bad {what}: {type(exc).__name__}: {exc}") from None


def decode_envelope(buf) -> Data | Hello:
    return _decode(_envelope, "envelope", buf)


def decode_ack(buf) -> Ack:
    return _decode(_ack, "ack", buf)


BYTES_PER_TOKEN = 13
"""uint32 token + float32 behaviour logprob + int32 version + uint8 mask."""


class _PyBuffer(ctypes.Structure):
    """CPython's Py_buffer (in the stable ABI since 3.11)."""

    _fields_ = [
        ("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p), ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p),
    ]


_get_buffer, _release_buffer = ctypes.pythonapi.PyObject_GetBuffer, ctypes.pythonapi.PyBuffer_Release
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]


def _address(buf) -> int:
    """Where a buffer's bytes start: half the cost of numpy's `ctypes.data`, on the send path."""
    view = _PyBuffer()
    _get_buffer(buf, view, 0)
    try:
        return view.buf or 0
    finally:
        _release_buffer(view)


def _packed_span(views: tuple) -> memoryview | None:
    """The one buffer the views lie in, back to back and in order, or None if they do not."""
    base = views[0].obj
    if base is None or any(v.obj is not base for v in views):
        return None
    try:
        whole = memoryview(base).cast("B")
    except TypeError:  # not a flat, contiguous buffer
        return None
    origin = _address(whole)
    start = end = None
    for v in views:
        at = _address(v) - origin
        if end is None:
            start = end = at
        elif at != end:
            return None
        end += v.nbytes
    return whole[start:end]


def trajectory_frames(traj: Trajectory) -> list:
    """`[head, arrays]`, the arrays frame a view of the trajectory's memory when they lie in one
    buffer in PACKED_FIELDS order (`Trajectory.build` makes them so), else a copy. Small trajectories
    are always copied: ZeroMQ copies a frame under pyzmq's COPY_THRESHOLD anyway, so one join costs
    less than finding the buffer."""
    head = encode_parts(traj)[0]
    views = tuple(getattr(traj, name) for name in PACKED_FIELDS)
    if len(traj) * BYTES_PER_TOKEN >= zmq.COPY_THRESHOLD and (span := _packed_span(views)) is not None:
        return [head, span]
    return [head, b"".join(views)]


def trajectory_from_frames(head, arrays) -> Trajectory:
    """The Trajectory of `trajectory_frames`, its arrays views into `arrays`, validated as strictly
    as `messages.decode_parts`. Raises ProtocolError on anything malformed."""
    arrays = memoryview(arrays).cast("B")
    nbytes = len(arrays)
    if nbytes % BYTES_PER_TOKEN:
        raise ProtocolError(f"bad trajectory: arrays frame of {nbytes} bytes is not {BYTES_PER_TOKEN} bytes per token")
    n = nbytes // BYTES_PER_TOKEN
    tokens, behav_logp, versions = arrays[: 4 * n], arrays[4 * n : 8 * n], arrays[8 * n : 12 * n]
    return decode_parts([head, tokens, arrays[12 * n :], behav_logp, versions])  # in ARRAY_FIELDS order


BIND_RETRY_S = 2.0
"""How long `bind` retries an address still held by a previous incarnation that is closing."""


async def bind(sock: zmq.Socket, endpoint: str) -> str:
    """Bind to a zmq URL and return the bound one: `tcp://127.0.0.1:0` (or `:*`) picks a free port."""
    if endpoint.startswith("tcp://") and endpoint.rsplit(":", 1)[-1] == "0":
        endpoint = endpoint[:-1] + "*"
    deadline = time.monotonic() + BIND_RETRY_S
    while True:
        try:
            sock.bind(endpoint)
            return sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EADDRINUSE or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.05)
