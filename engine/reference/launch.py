"""Start `tidal serve` as a child process and wait until it listens: for tests, benches, the engine.

Imports no torch (the engine uses it). The child binds 127.0.0.1 port 0 and prints
`tidal serve ready URL`; `ReferenceServer` reads that line, so there is no find-a-free-port race.
`restart()` asks for the same port again so clients keep their URL.

    with ReferenceServer(simulate=True, args=["--fast"]) as srv:
        requests.post(srv.url + "/generate", json={"input_ids": [1, 2], "stream": False})
    async with ReferenceServer(model_dir) as srv: ...
"""

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Mapping, Sequence

__all__ = ["ReferenceServer", "ServerStartError"]

_READY = "tidal serve ready "


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


class ServerStartError(RuntimeError):
    """The child exited or stayed silent before printing its readiness line; carries its output."""


class ReferenceServer:
    """A `tidal serve` child process on loopback; a context manager, sync or async."""

    def __init__(self, model_path: str | os.PathLike | None = None, *, simulate: bool = False,
                 args: Sequence[str] = (), env: Mapping[str, str] | None = None,
                 host: str = "127.0.0.1", start_timeout_s: float = 180.0):
        if model_path is None and not simulate:
            raise ValueError("ReferenceServer needs a model_path, or simulate=True")
        self.model_path = None if model_path is None else str(model_path)
        self.simulate = simulate
        self.args = list(args)
        self.env = env
        self.host = host
        self.start_timeout_s = start_timeout_s
        self.url: str | None = None
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self._tail: deque[str] = deque(maxlen=200)
        self._drain: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def _command(self, port: int) -> list[str]:
        cmd = [sys.executable, "-u", "-m", "tidal.engine.reference.server", "--host", self.host, "--port", str(port)]
        if self.simulate:
            cmd.append("--simulate")
        if self.model_path is not None:
            cmd += ["--model", self.model_path]
        return cmd + self.args

    def start(self, port: int | None = None) -> "ReferenceServer":
        """Launch and block until the readiness line (raises ServerStartError with the child's output)."""
        env = dict(os.environ if self.env is None else self.env)
        self.proc = subprocess.Popen(
            self._command(port or 0), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
            text=True, bufsize=1,
        )
        ready = threading.Event()
        self._tail.clear()

        def drain(proc=self.proc):
            for line in proc.stdout:
                self._tail.append(line.rstrip("\n"))
                if line.startswith(_READY) and not ready.is_set():
                    self.url = line[len(_READY):].strip()
                    ready.set()
            ready.set()

        self._drain = threading.Thread(target=drain, name=f"serve-{self.proc.pid}-stdout", daemon=True)
        self._drain.start()
        if not ready.wait(self.start_timeout_s) or self.proc.poll() is not None or self.url is None:
            output = "\n".join(self._tail)
            self.kill()
            raise ServerStartError(f"tidal serve did not become ready: {' '.join(self._command(port or 0))}\n{output}")
        self.port = int(self.url.rsplit(":", 1)[1])
        return self

    def output(self) -> str:
        """The last lines the child wrote (stdout and stderr)."""
        return "\n".join(self._tail)

    def terminate(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM, wait, then SIGKILL if it lingers; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._join()
        return self.proc.returncode

    def kill(self) -> int | None:
        """SIGKILL at once (a crash, for fault-injection tests)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._join()
        return self.proc.returncode

    def _join(self) -> None:
        if self.proc is not None and self.proc.stdout is not None:
            if self._drain is not None:
                self._drain.join(timeout=5)
            self.proc.stdout.close()

    def restart(self, *, kill: bool = False) -> "ReferenceServer":
        """Stop (SIGTERM, or SIGKILL with kill=True) and start again, on the same port if it is free."""
        port = self.port
        self.kill() if kill else self.terminate()
        if port is not None and _port_free(self.host, port):
            try:
                return self.start(port)
            except ServerStartError:
                pass
        return self.start()

    def __enter__(self) -> "ReferenceServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.terminate()

    async def __aenter__(self) -> "ReferenceServer":
        return await asyncio.to_thread(self.start)

    async def __aexit__(self, *exc) -> None:
        await asyncio.to_thread(self.terminate)
