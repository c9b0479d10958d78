"""The dead letter: batches a training step failed on, kept whole so that nothing is lost.

A step can fail on its batch (a model error, an out-of-memory, a loss that is not finite). The daemon
then appends one record here and only after that lets the batch's deliveries be acknowledged:
invariant 4 (no trajectory is lost) holds because the trajectories are in this file, and the stream
never stalls on a batch that would fail again. Each record is one JSON line, fsynced before `append`
returns:

    {"time": ..., "version": 7, "error": "RuntimeError: ...", "traceback": "...",
     "ids": ["g3-0", ...], "trajectories": [<Trajectory as JSON, arrays base64>, ...]}

`read` gives the records back with real `Trajectory` objects, to inspect or to send again.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import msgspec
from tidal.protocol.errors import ProtocolError
from tidal.protocol.messages import Trajectory

__all__ = ["DeadLetter", "DeadBatch", "read"]


class DeadBatch(msgspec.Struct, kw_only=True):
    """One failed step: the version it would have trained, why it failed, and its whole batch."""

    time: float
    version: int
    error: str
    """`Type: message` of the exception."""
    traceback: str
    ids: list[str]
    trajectories: list[Trajectory]


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(DeadBatch)


class DeadLetter:
    """Appends failed batches to one JSONL file (its directory is created)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, version: int, error: str, traceback: str, trajectories: list[Trajectory]) -> None:
        """Write one record and fsync it: it is durable when this returns (blocking: call it off the loop)."""
        record = DeadBatch(time=time.time(), version=version, error=error, traceback=traceback,
                           ids=[t.id for t in trajectories], trajectories=trajectories)
        with open(self.path, "a+b") as f:
            _drop_torn_tail(f)
            f.write(_encoder.encode(record) + b"\n")
            f.flush()
            os.fsync(f.fileno())


def _drop_torn_tail(f) -> None:
    """Cut off a record that a crash left half-written (the bytes after the last newline): its batch
    was never acknowledged, so the engine resends it."""
    end = pos = f.seek(0, os.SEEK_END)
    keep = 0
    while pos > 0:
        start = max(0, pos - 65536)
        f.seek(start)
        newline = f.read(pos - start).rfind(b"\n")
        if newline >= 0:
            keep = start + newline + 1
            break
        pos = start
    if keep < end:
        f.truncate(keep)


def read(path: str | Path) -> list[DeadBatch]:
    """Every record of a dead-letter file, oldest first. A torn last line (a crash mid-write, before
    the batch was acknowledged) is skipped; a bad line elsewhere is an error."""
    lines = [line for line in Path(path).read_bytes().splitlines() if line.strip()]
    out = []
    for i, line in enumerate(lines):
        try:
            out.append(_decoder.decode(line))
        except msgspec.DecodeError as exc:
            if i < len(lines) - 1:
                raise ProtocolError(f"dead letter {path}, record {i + 1}: {exc}") from None
    return out
