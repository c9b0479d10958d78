"""An env hosted in its own child process, for envs that hang, leak, crash or hold global state.

    env = envs.make("games:Wordle-v0", offload="process")   # or ProcessEnv(entry_point="pkg.mod:Env")

Threads cannot be killed, so a blocking env whose step hangs can only be abandoned (tidal.envs.core); an
env in a process can be killed and replaced. `abandon` (what `StepTimeout` calls) kills the worker;
the next `areset` starts a fresh one, so the env object stays usable. A worker that dies on its own
(segfault, OOM kill) turns the pending call into an `EnvError` naming its exit code, and is restarted
at the next reset too. Process isolation also gives each env its own global RNGs. It is one process
per env rather than a shared pool on purpose: a pooled worker would hold many envs' state, and
killing it for one hung step would end them all. Use it for the few envs that need it; cheap and
merely blocking envs are better served by the thread pool.

Wire: length-prefixed msgpack frames on the worker's stdin/stdout (no pickle): requests
`[op, arg]` with op in make/reset/step/close; replies `["ok", value]` or `["error", type, message,
traceback]`. The worker moves its own stdout to stderr first, so a print in env code cannot corrupt
a frame. The API is async only: the worker is tied to the event loop that started it.

Memory: `worker_memory_mb` caps the worker's address space (RLIMIT_AS, the interpreter included: about
170 MB with a games env). An env that leaks past it gets MemoryError in the call that allocates, which
reaches the caller as a `RemoteEnvError`; the worker is then killed, and the next reset starts a fresh
one, so a leak costs the episodes it breaks, never the engine's memory.
"""

import asyncio
import os
import struct
import sys
from typing import Any

import msgspec
from tidal.envs.core import Env, EnvError, StepResult

__all__ = ["ProcessEnv", "RemoteEnvError"]

_HEADER = struct.Struct("<I")
_encoder = msgspec.msgpack.Encoder(enc_hook=repr)
_decoder = msgspec.msgpack.Decoder()
MAX_FRAME = 64 * 1024 * 1024
"""Frames above this are refused: an observation or action of 64 MiB is a bug, not data."""


class RemoteEnvError(EnvError):
    """The env in the worker raised; the message carries its type, message and traceback."""


class ProcessEnv(Env):
    """Runs `envs.make(env_id, **kwargs)` (or `entry_point(**kwargs)`) in a worker process."""

    blocking = True

    def __init__(self, env_id: str | None = None, *, entry_point: str | None = None, worker_memory_mb: int = 0,
                 **kwargs: Any):
        """`worker_memory_mb`: the worker's address-space cap (0: none); every other kwarg is the env's."""
        if (env_id is None) == (entry_point is None):
            raise ValueError("ProcessEnv: give exactly one of env_id or entry_point")
        if worker_memory_mb < 0:
            raise ValueError(f"ProcessEnv: worker_memory_mb must be >= 0, got {worker_memory_mb}")
        self.target = {"id": env_id, "entry_point": entry_point, "kwargs": kwargs}
        self.worker_memory_mb = worker_memory_mb
        self.proc: asyncio.subprocess.Process | None = None
        self.remote_instructions = ""
        self.in_episode = False
        self.restarts = 0

    @property
    def instructions(self) -> str:  # type: ignore[override]
        return self.remote_instructions

    @property
    def id(self) -> str:
        return self.target["id"] or self.target["entry_point"]

    async def _start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tidal.envs.process", str(self.worker_memory_mb),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )
        self.remote_instructions = await self._call("make", self.target)

    async def _call(self, op: str, arg: Any) -> Any:
        proc = self.proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        body = _encoder.encode([op, arg])
        proc.stdin.write(_HEADER.pack(len(body)) + body)
        try:
            await proc.stdin.drain()
            (size,) = _HEADER.unpack(await proc.stdout.readexactly(_HEADER.size))
            if size > MAX_FRAME:
                raise EnvError(f"env worker {self.id}: reply frame of {size} bytes exceeds {MAX_FRAME}")
            reply = _decoder.decode(await proc.stdout.readexactly(size))
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            code = await self._reap(grace_s=1.0)  # it closed its pipe: it is exiting, learn how
            raise EnvError(f"env worker {self.id} died during {op} (exit code {code})") from exc
        except asyncio.CancelledError:
            self.abandon(f"{op} cancelled mid-frame")  # its reply would be read as the next call's
            raise
        if reply[0] == "error":
            _, kind, message, tb = reply
            if kind == "MemoryError":  # past worker_memory_mb: what it leaked goes with it
                await self._reap()
                self.in_episode = False
                self.restarts += 1  # the next reset starts a fresh worker
            raise RemoteEnvError(f"{kind}: {message}\n--- in the env worker ---\n{tb}")
        return reply[1]

    async def _reap(self, grace_s: float = 0.0) -> int | None:
        """Wait up to `grace_s` for the worker to exit by itself, then kill it; its exit code."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.returncode is None and grace_s > 0:
            try:
                async with asyncio.timeout(grace_s):
                    return await proc.wait()
            except TimeoutError:
                pass
        if proc.returncode is None:
            proc.kill()
        return await proc.wait()

    async def areset(self, seed: int | None = None) -> tuple[str, dict[str, Any]]:
        if self.proc is None or self.proc.returncode is not None:
            if self.proc is not None:
                await self._reap()
                self.restarts += 1
            await self._start()
        obs, info = await self._call("reset", seed)
        self.in_episode = True
        return obs, info

    async def astep(self, action: str) -> StepResult:
        if not self.in_episode or self.proc is None:
            raise EnvError(f"env {self.id}: step before reset (or after its worker was killed)")
        obs, reward, terminated, truncated, info = await self._call("step", action)
        return obs, reward, terminated, truncated, info

    def abandon(self, reason: str) -> None:
        """Kill the worker (it may be stuck in the call that timed out); the next reset starts anew."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
        self.in_episode = False

    def reset(self, seed: int | None = None) -> tuple[str, dict[str, Any]]:
        raise EnvError("ProcessEnv is async only: await areset()/astep()")

    def step(self, action: str) -> StepResult:
        raise EnvError("ProcessEnv is async only: await areset()/astep()")

    async def aclose(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            try:
                async with asyncio.timeout(5):
                    await self._call("close", None)
            except (TimeoutError, EnvError):
                pass  # it is killed below either way
        await self._reap()

    def close(self) -> None:
        """Kill the worker from sync code; prefer `await aclose()`, which also reaps it."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()


def _serve(memory_mb: int = 0) -> None:
    """The worker: build the env, then answer requests until close or end of input."""
    import importlib
    import resource
    import traceback

    if memory_mb:
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))

    from tidal import envs
    reader = os.fdopen(0, "rb", buffering=0)
    writer = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    env: Env | None = None

    def read_exactly(n: int) -> bytes:
        chunks, left = [], n
        while left:
            chunk = reader.read(left)
            if not chunk:
                raise EOFError
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    while True:
        try:
            (size,) = _HEADER.unpack(read_exactly(_HEADER.size))
            op, arg = _decoder.decode(read_exactly(size))
        except EOFError:
            return
        try:
            if op == "make":
                if arg["id"] is not None:
                    env = envs.make(arg["id"], **arg["kwargs"])
                else:
                    module, _, name = arg["entry_point"].partition(":")
                    env = getattr(importlib.import_module(module), name)(**arg["kwargs"])
                value: Any = env.instructions
            elif op == "reset":
                value = env.reset(arg)
            elif op == "step":
                value = env.step(arg)
            elif op == "close":
                env.close()
                value = None
            else:
                raise ValueError(f"unknown op {op!r}")
            reply = ["ok", value]
        except Exception as exc:
            reply = ["error", type(exc).__qualname__, str(exc), traceback.format_exc()]
        body = _encoder.encode(reply)
        writer.write(_HEADER.pack(len(body)) + body)
        if op == "close":
            return


if __name__ == "__main__":
    _serve(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
