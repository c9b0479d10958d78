"""A real render worker with a scripted fault, for tests/engine/test_render_pool.py.

`python -m tests.engine._render_faulty CHECKPOINT` runs engine/render_worker.py's `main` with its reply
stream wrapped. TIDAL_TEST_RENDER_FAULT = "MODE:DIR" scripts the fault, which strikes when the worker
has computed the replies to its first frame of calls (it holds them: from the pool's side it is
mid-request):
- stall-once: the first worker of the test to get there writes its pid to DIR/fault and never
  answers; every other worker, restarted ones included, behaves;
- stall: every worker writes its pid to DIR/<pid> and never answers;
- slow-once: the first worker to get there writes DIR/fault and answers a second late;
- garbage-once-KIND: the first worker to get there writes DIR/fault and, instead of its replies,
  bytes that are no valid frame: KIND text (a line of text), bytes (a frame of invalid msgpack) or
  schema (valid msgpack in the wrong shape).
"""

import os
import sys
import time
from pathlib import Path

import msgspec
from tidal.engine import render_worker

GARBAGE = {
    "text": b"this is not a frame\n",
    "bytes": render_worker.HEADER.pack(5) + b"\xc1" * 5,  # 0xc1 is unused in msgpack
    "schema": (lambda body: render_worker.HEADER.pack(len(body)) + body)(msgspec.msgpack.encode(
        {"type": "replies", "replies": [{"id": 1, "result": {"type": "prompt", "text": 5, "ids": []}}]})),
}


class FaultyOut:
    """Buffers each frame (`write_frame` ends every frame with a flush) and plays the fault on the second."""

    def __init__(self, out, mode: str, where: Path):
        self.out, self.mode, self.where = out, mode, where
        self.buffer = bytearray()
        self.frames = 0

    def write(self, data: bytes) -> None:
        self.buffer += data

    def flush(self) -> None:
        data, self.buffer = bytes(self.buffer), bytearray()
        self.frames += 1
        if self.frames == 2 and self._claim():
            if self.mode.startswith("stall"):
                while True:
                    time.sleep(60)
            if self.mode == "slow-once":
                time.sleep(1.0)
            else:
                data = GARBAGE[self.mode.removeprefix("garbage-once-")]
        self.out.write(data)
        self.out.flush()

    def _claim(self) -> bool:
        if self.mode == "stall":
            (self.where / str(os.getpid())).write_text(str(os.getpid()))
            return True
        try:
            fd = os.open(self.where / "fault", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return True


if __name__ == "__main__":
    mode, where = os.environ["TIDAL_TEST_RENDER_FAULT"].split(":", 1)
    serve = render_worker.serve
    render_worker.serve = lambda tok, inp, out: serve(tok, inp, FaultyOut(out, mode, Path(where)))
    sys.exit(render_worker.main())
