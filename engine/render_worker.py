"""`python -m tidal.engine.render_worker CHECKPOINT [--template NAME]`: one worker of the engine's
`RenderPool` (engine/render_pool.py). It loads the checkpoint's `ChatTokenizer` once, then answers
render calls read from stdin with replies written to stdout, computed by engine/render.py's functions.

Wire: in both directions a frame is a 4-byte big-endian length and that many bytes of msgpack
(msgspec, never pickle). Parent to worker: a list of `Call`s, one or several batched. Worker to
parent: `Ready` once the tokenizer is loaded, then one `Replies` per frame received, holding one
`Reply` per call in the calls' order: the result, or `RenderFailed` (the template's own error, which
the caller sees as the `ChatTemplateError` it would get inline). Decoding is strict on both sides: an
unknown field, a wrong type or a truncated frame is an error. The worker that reads one says so on
stderr and exits 2; the pool counts it as a dead worker and retries its calls once elsewhere.

Invariant: stdout carries frames and nothing else. The worker moves the real stdout to a private
descriptor and points descriptor 1 at stderr, so a stray print (its own or a library's) cannot
corrupt the channel. A worker lives exactly as long as its stdin: it exits at EOF and ignores SIGINT
and SIGTERM, which a terminal's Ctrl-C or a service manager sends to the whole process group while
the engine drains, and the draining engine still needs its workers.
"""

from __future__ import annotations

import argparse
import os
import signal
import struct
import sys
from typing import BinaryIO, Literal

import msgspec
from tidal.engine.chat import ChatTokenizer
from tidal.engine.chat_template import ChatTemplateError
from tidal.engine.render import (
    DeltaRequest,
    DeltaResult,
    PromptRequest,
    PromptResult,
    observation_delta,
    render_prompt,
)
from tidal.protocol.errors import TidalError

__all__ = ["Call", "Reply", "Replies", "Ready", "RenderFailed", "FrameError", "HEADER", "MAX_FRAME", "answer",
           "write_frame", "serve", "main"]

HEADER = struct.Struct(">I")
"""A frame's length prefix: 4 bytes, big-endian, unsigned."""
MAX_FRAME = 256 << 20
"""Largest frame either side accepts (a batch of long conversations is a few MiB); a larger length
is not a frame (text written to stdout reads as a length of ~1-2 GB) and is refused at once."""


class Call(msgspec.Struct, forbid_unknown_fields=True):
    """One render call; `id` is the pool's, echoed in its reply."""

    id: int
    """Unique within the pool's life."""
    request: PromptRequest | DeltaRequest
    """What to compute (tagged by `type`)."""


class RenderFailed(msgspec.Struct, tag="failed", forbid_unknown_fields=True):
    """A call that raised in the worker."""

    error: Literal["template", "internal"]
    """"template": the chat template failed on these inputs (`ChatTemplateError`, as inline);
    "internal": anything else (a bug), raised to the caller as `RenderWorkerError`."""
    message: str
    """The exception's message."""


class Reply(msgspec.Struct, forbid_unknown_fields=True):
    """The answer to one `Call`."""

    id: int
    """The call's id."""
    result: PromptResult | DeltaResult | RenderFailed
    """The computed result, or why there is none."""


class Ready(msgspec.Struct, tag="ready", forbid_unknown_fields=True):
    """The first frame a worker writes: its tokenizer is loaded."""

    pid: int
    """The worker's process id."""
    checkpoint: str
    """The checkpoint directory it loaded."""


class Replies(msgspec.Struct, tag="replies", forbid_unknown_fields=True):
    """The answers to one frame of calls, in the calls' order."""

    replies: list[Reply]
    """One per call."""


_calls = msgspec.msgpack.Decoder(list[Call])
_encoder = msgspec.msgpack.Encoder()


class FrameError(TidalError, ValueError):
    """Bytes on a render pipe that are not a frame (length out of bounds, truncated, not the schema)."""


def answer(tok: ChatTokenizer, request: PromptRequest | DeltaRequest) -> PromptResult | DeltaResult | RenderFailed:
    """One call's result; an exception becomes a `RenderFailed` (the worker goes on with the next)."""
    try:
        match request:
            case PromptRequest():
                return render_prompt(tok, request)
            case DeltaRequest():
                return observation_delta(tok, request)
    except ChatTemplateError as exc:
        return RenderFailed(error="template", message=str(exc))
    except Exception as exc:  # a bug must cost this call only, reported to its caller
        return RenderFailed(error="internal", message=f"{type(exc).__name__}: {exc}")
    raise AssertionError(f"unreachable: {type(request).__name__}")


def _read_frame(inp: BinaryIO) -> bytes | None:
    """The next frame's payload; None at EOF before a frame starts."""
    header = inp.read(HEADER.size)
    if not header:
        return None
    if len(header) < HEADER.size:
        raise FrameError(f"stdin ended inside a frame header ({len(header)} of {HEADER.size} bytes)")
    (size,) = HEADER.unpack(header)
    if size > MAX_FRAME:
        raise FrameError(f"frame length {size} exceeds {MAX_FRAME} bytes")
    payload = inp.read(size)
    if len(payload) < size:
        raise FrameError(f"stdin ended inside a frame ({len(payload)} of {size} bytes)")
    return payload


def write_frame(out: BinaryIO, message: msgspec.Struct) -> None:
    payload = _encoder.encode(message)
    out.write(HEADER.pack(len(payload)) + payload)  # one write: the engine wakes once per frame
    out.flush()


def serve(tok: ChatTokenizer, inp: BinaryIO, out: BinaryIO) -> int:
    """Write `Ready`, then answer every frame of calls until EOF (0) or a malformed frame (2)."""
    write_frame(out, Ready(pid=os.getpid(), checkpoint=tok.name))
    while True:
        try:
            payload = _read_frame(inp)
            if payload is None:
                return 0
            calls = _calls.decode(payload)
        except (FrameError, msgspec.DecodeError) as exc:
            print(f"render worker {os.getpid()}: malformed frame on stdin: {exc}", file=sys.stderr, flush=True)
            return 2
        write_frame(out, Replies(replies=[Reply(id=c.id, result=answer(tok, c.request)) for c in calls]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tidal.engine.render_worker", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="checkpoint directory (tokenizer.json and the chat template)")
    p.add_argument("--template", default=None, help="one of several named chat templates")
    args = p.parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    try:
        tok = ChatTokenizer.load(args.checkpoint, template=args.template)
    except (OSError, ValueError, TidalError) as exc:
        print(f"render worker: cannot load the checkpoint: {exc}", file=sys.stderr, flush=True)
        return 2
    try:
        return serve(tok, sys.stdin.buffer, out)
    except BrokenPipeError:  # the engine is gone: nobody is left to answer
        return 0


if __name__ == "__main__":
    sys.exit(main())
