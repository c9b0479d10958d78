"""Which server gets a request: load-aware with per-session affinity, health-aware. Pure state, no IO.

Policy (after sglang-router's `cache_aware`, docs/sglang.md §6): a session's later requests go back to the
server that served it, whose radix cache holds the shared prefix, unless that server is ejected or its
load exceeds the least-loaded server's by more than `slack`; otherwise the least-loaded healthy server
takes it (fewest in-flight tokens or requests; ties rotate). The session table is an LRU of bounded size.
The client owns the IO: it calls `pick`, `acquire`/`release` around each request, `eject` on a failure
and `admit` when a health probe passes. All methods are synchronous, so no state changes across an await.

>>> r = Router(["http://a", "http://b"], balance="requests")
>>> a = r.pick("traj-1"); r.acquire(a, 10)
>>> r.pick("traj-2").url != a.url, r.pick("traj-1").url == a.url
(True, True)
"""

import logging
from collections import Counter, OrderedDict
from collections.abc import Collection
from typing import Literal

from tidal.engine.backends.errors import BackendError, ServerUnavailable

__all__ = ["Server", "Router", "count_failed_attempt"]

log = logging.getLogger(__name__)


class Server:
    """One server's routing state."""

    __slots__ = ("url", "index", "healthy", "requests", "tokens", "failures")

    def __init__(self, url: str, index: int):
        self.url = url
        self.index = index
        self.healthy = True
        self.requests = 0
        """Requests in flight."""
        self.tokens = 0
        """Tokens in flight: prompt + remaining budget of every request in flight."""
        self.failures = 0
        """Consecutive failures (requests or probes) since the last success."""

    def __repr__(self) -> str:
        state = "up" if self.healthy else "ejected"
        return f"Server({self.url}, {state}, requests={self.requests}, tokens={self.tokens})"


class Router:
    """Routing state over a fixed list of servers."""

    def __init__(self, urls: list[str], *, balance: Literal["tokens", "requests"] = "tokens",
                 affinity: bool = True, slack: int = 16384, capacity: int = 1 << 17,
                 eject_after: int = 3):
        if not urls:
            raise ValueError("Router needs at least one server URL")
        self.servers = [Server(url.rstrip("/"), i) for i, url in enumerate(urls)]
        self._by_tokens = balance == "tokens"
        self._affinity = affinity
        self._slack = slack
        self._capacity = capacity
        self._eject_after = eject_after
        self._sessions: OrderedDict[str, Server] = OrderedDict()
        self._turn = 0

    def load(self, server: Server) -> int:
        return server.tokens if self._by_tokens else server.requests

    def pick(self, session_key: str | None = None, exclude: Collection[Server] = ()) -> Server | None:
        """The server for the next request of `session_key`; None when no healthy server is left."""
        servers = self.servers
        n = len(servers)
        self._turn = (self._turn + 1) % n
        best = None
        for i in range(n):
            s = servers[(self._turn + i) % n]
            if s.healthy and s not in exclude and (best is None or self.load(s) < self.load(best)):
                best = s
        if best is None or session_key is None or not self._affinity:
            return best
        held = self._sessions.get(session_key)
        if (held is not None and held.healthy and held not in exclude
                and self.load(held) - self.load(best) <= self._slack):
            self._sessions.move_to_end(session_key)
            return held
        self._sessions[session_key] = best
        self._sessions.move_to_end(session_key)
        if len(self._sessions) > self._capacity:
            self._sessions.popitem(last=False)
        return best

    def holder(self, session_key: str) -> Server | None:
        """The server a session is pinned to, if any."""
        return self._sessions.get(session_key)

    def acquire(self, server: Server, tokens: int) -> None:
        server.requests += 1
        server.tokens += tokens

    def release(self, server: Server, tokens: int) -> None:
        server.requests -= 1
        server.tokens -= tokens

    def succeeded(self, server: Server) -> None:
        server.failures = 0

    def failed(self, server: Server, *, hard: bool = False) -> bool:
        """Count a failed request; eject at once if `hard` (connection lost) or after `eject_after`
        consecutive failures (a 5xx or a bad response may be one request's fault). True if ejected now."""
        server.failures += 1
        if hard or server.failures >= self._eject_after:
            return self.eject(server)
        return False

    def eject(self, server: Server) -> bool:
        """Take a failed server out of rotation; True if it was in rotation."""
        was, server.healthy = server.healthy, False
        return was

    def admit(self, server: Server) -> bool:
        """Put a server that passed a health probe back; True if it was ejected."""
        server.failures = 0
        was, server.healthy = server.healthy, True
        return not was

    @property
    def healthy(self) -> list[Server]:
        return [s for s in self.servers if s.healthy]


def count_failed_attempt(router: Router, server: Server, exc: BackendError, counters: Counter, *,
                         retries: int, max_retries: int, rid: str, received: int) -> None:
    """A request's attempt on `server` failed with `exc`: count it, eject the server if due, and
    re-raise `exc` unless the request may go on elsewhere (the caller then retries). Shared by the
    backends that route, so they count and eject alike."""
    counters[f"errors_{exc.kind}"] += 1
    if not exc.retryable or retries >= max_retries:
        raise exc
    if router.failed(server, hard=isinstance(exc, ServerUnavailable)):
        counters["ejections"] += 1
        log.warning("ejected %s: %s", server.url, exc)
    log.warning("retrying %s elsewhere after %d tokens: %s", rid, received, exc)
