"""Start-up failures as one line: `PROG: what could not be done: why`, on stderr, exit code 2.

Every daemon (`tidal serve`, `tidal engine`, `tidal trainer`) starts the same way: read the config,
then open what it needs (a model, a port, a socket, a directory). When that fails the user needs
the one fact that went wrong, not a library's traceback: a busy port, a host that does not
resolve, a model path that does not exist, a broken checkpoint. The invariant: a start-up error
is a `TidalError` by the time it reaches `main` (`starting` turns a library's exception into a
`StartupError` naming what was being done), `main` prints one line and returns `EXIT_STARTUP`,
and `--debug` prints the traceback above that line. Errors after start-up are the daemon's own
to handle (counted, logged); this module is only about getting a daemon running.

    with starting(f"cannot listen on {host}:{port}"):
        sock.bind((host, port))          # OSError EADDRINUSE -> "...: address already in use"

    def main(argv):
        args = parser.parse_args(argv)
        return run_main("tidal serve", lambda: serve(args), debug=args.debug)
"""

import errno
import gc
import socket
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tidal.protocol.errors import TidalError

__all__ = ["EXIT_STARTUP", "GC_THRESHOLDS", "StartupError", "reason", "starting", "add_debug_arg", "fail", "run_main",
           "quiet_gc", "freeze_startup_heap"]

EXIT_STARTUP = 2
"""Exit code of a daemon that could not start (the same as a usage error: argparse exits 2)."""

GC_THRESHOLDS = (100_000, 50, 1000)
"""Cyclic garbage collection far less often than Python's default (700, 10, 10). A daemon's hot path
allocates many short-lived objects and makes few reference cycles, and every full collection walks
everything alive: in the engine, each episode's per-token lists (at 2,000 episodes the walks stalled
its event loop for seconds; tidal bench engine held 5,000 with these), in the reference server the
model's tensors and modules (12% of its busy time went to the collector on the CPU default)."""

_LONGEST = 400
"""A reason longer than this is cut: one line must stay one readable line."""

_NAMED_ERRNOS = {
    errno.EADDRINUSE: "address already in use (another process listens there; pick another port, or 0 for any)",
    errno.EADDRNOTAVAIL: "address not available on this machine",
    errno.EACCES: "permission denied",
}


class StartupError(TidalError, RuntimeError):
    """A daemon could not start; the message names what it was doing (a key, an address, a path) and why."""


def reason(exc: BaseException) -> str:
    """One line saying why `exc` happened: the errno's meaning for socket and file errors, otherwise
    the first line of the message that says something, prefixed by the exception's type for
    exceptions that are not tidal's own."""
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name ({exc.strerror or exc})"
    if isinstance(exc, OSError) and exc.errno in _NAMED_ERRNOS:
        return _NAMED_ERRNOS[exc.errno]
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    text = next((line.strip() for line in str(exc).splitlines() if any(ch.isalnum() for ch in line)), "")
    if len(text) > _LONGEST:
        text = text[:_LONGEST - 3] + "..."
    if isinstance(exc, TidalError):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@contextmanager
def starting(what: str) -> Iterator[None]:
    """Raise an exception from inside as `StartupError("{what}: {reason}")`, the original kept as its
    cause (`--debug` shows both). A `TidalError` passes unchanged: it already names the problem."""
    try:
        yield
    except TidalError:
        raise
    except Exception as exc:
        raise StartupError(f"{what}: {reason(exc)}") from exc


def add_debug_arg(parser) -> None:
    """`--debug`: log at debug level and show the traceback of a start-up error."""
    parser.add_argument("--debug", action="store_true", help="log at debug level; show tracebacks of start-up errors")


def fail(prog: str, exc: BaseException, *, debug: bool = False) -> int:
    """Print `prog: message` on stderr (after the traceback, with `debug`); return `EXIT_STARTUP`."""
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    message = str(exc) if isinstance(exc, TidalError) else reason(exc)
    if "\n" in message:
        message = " ".join(message.split())
    print(f"{prog}: {message}", file=sys.stderr, flush=True)
    return EXIT_STARTUP


def quiet_gc() -> None:
    """Collect rarely (`GC_THRESHOLDS`); call it first thing in a daemon's main."""
    gc.set_threshold(*GC_THRESHOLDS)


def freeze_startup_heap() -> None:
    """Move what start-up built (modules, the model, its tokenizer) out of the collector's sight: it
    lives for the whole run, so no collection need walk it again. Call it once start-up is done."""
    gc.freeze()


def run_main(prog: str, body: Callable[[], int | None], *, debug: bool = False) -> int:
    """Run a daemon's `body`; a `TidalError` out of it is one line and `EXIT_STARTUP`."""
    try:
        return int(body() or 0)
    except TidalError as exc:
        return fail(prog, exc, debug=debug)
