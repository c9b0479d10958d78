"""ZeroMQ CURVE for the trajectory and status channels when engines and trainer are on different hosts.

Off by default: on loopback the channels run ZeroMQ's NULL mechanism, as before. With keys, the
trainer's two binding sockets (ROUTER, XPUB) are CURVE servers and every engine socket (DEALER, SUB)
a CURVE client: the traffic is encrypted, and a ZAP authenticator admits only clients whose public
key is a `*.key` file in the trainer's allowed directory. `tidal keys DIR` (protocol/keys.py) makes the
trainer's key pair and one per engine, laid out as the two configs expect.

Invariant: a peer that is refused never reaches the channel's decoder, and is counted. Every failed
handshake (no key at all, an unknown key, a wrong server key) is counted in `stats.refused` of the
channel end that saw it (read from the socket's monitor: the trainer's end always, the engine's end
when the trainer's authenticator said no) and logged with its reason; a key the authenticator denies
is also logged with the client key's z85 text.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from pathlib import Path

import msgspec
import zmq
import zmq.asyncio
from tidal.protocol.errors import ConfigError
from zmq.auth.asyncio import AsyncioAuthenticator
from zmq.auth.certs import load_certificate, load_certificates
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

__all__ = ["ServerKeys", "ClientKeys", "server_keys", "client_keys", "CurveGuard"]

log = logging.getLogger(__name__)

_REFUSALS = {zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake failed",
             zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "not a CURVE client of this server (protocol)",
             zmq.EVENT_HANDSHAKE_FAILED_AUTH: "refused by the authenticator"}


class ServerKeys(msgspec.Struct, frozen=True):
    """The trainer's side: its key pair and the engines it admits."""

    public: bytes
    """The trainer's public key (z85)."""
    secret: bytes
    """The trainer's secret key (z85)."""
    allowed_dir: str
    """Directory of the engines' public `*.key` files; a client whose key is not there is refused."""


class ClientKeys(msgspec.Struct, frozen=True):
    """An engine's side: its key pair and the trainer's public key."""

    public: bytes
    secret: bytes
    server: bytes
    """The trainer's public key (z85): the engine talks to no other server."""


def _pair(path: str, key: str) -> tuple[bytes, bytes]:
    """(public, secret) from a `.key_secret` file, with an error that names the config key."""
    try:
        public, secret = load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{key} = {path!r}: not a readable key file ({exc}); make one with `tidal keys DIR`") from None
    if secret is None:
        raise ConfigError(f"{key} = {path!r} holds only a public key; give the .key_secret file `tidal keys` made")
    return public, secret


def server_keys(secret_file: str, allowed_dir: str, *, section: str = "intake") -> ServerKeys | None:
    """The trainer's keys from its config (both empty: None, CURVE off); errors name the config key."""
    if not secret_file and not allowed_dir:
        return None
    if not (secret_file and allowed_dir):
        raise ConfigError(f"{section}.curve_secret_key and {section}.curve_allowed_dir go together: set both "
                          "(CURVE on) or neither (off, for loopback)")
    public, secret = _pair(secret_file, f"{section}.curve_secret_key")
    if not Path(allowed_dir).is_dir():
        raise ConfigError(f"{section}.curve_allowed_dir = {allowed_dir!r} is not a directory")
    if not load_certificates(allowed_dir):
        raise ConfigError(f"{section}.curve_allowed_dir = {allowed_dir!r} holds no engine public key (*.key)")
    return ServerKeys(public, secret, str(Path(allowed_dir).resolve()))


def client_keys(secret_file: str, server_file: str, *, section: str = "trainer") -> ClientKeys | None:
    """An engine's keys from its config (both empty: None, CURVE off); errors name the config key."""
    if not secret_file and not server_file:
        return None
    if not (secret_file and server_file):
        raise ConfigError(f"{section}.curve_secret_key and {section}.curve_server_key go together: set both "
                          "(CURVE on) or neither (off, for loopback)")
    public, secret = _pair(secret_file, f"{section}.curve_secret_key")
    try:
        server, _ = load_certificate(server_file)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{section}.curve_server_key = {server_file!r}: not a readable key file ({exc})") from None
    return ClientKeys(public, secret, server)


class _Authenticator(AsyncioAuthenticator):
    """The ZAP handler of one context on one event loop, shared by the channel ends that use it."""

    def __init__(self, context: zmq.Context) -> None:
        super().__init__(context, log=logging.getLogger("tidal.zap"))
        self.users = 0
        self.denied = 0
        self.dirs: dict[str, str] = {}
        """ZAP domain -> the allowed-keys directory it stands for (a path may exceed a domain's 254 bytes)."""
        self.loop = asyncio.get_running_loop()

    async def _authenticate_curve(self, domain: str, client_key: bytes) -> tuple[bool, bytes]:
        if domain in self.dirs:  # keys added or removed take effect at the next handshake
            try:
                self.certs[domain] = load_certificates(self.dirs[domain])
            except (OSError, ValueError) as exc:  # the directory is gone or unreadable: admit no one
                log.error("cannot read the allowed CURVE keys in %s (every client is refused): %s",
                          self.dirs[domain], exc)
                self.certs[domain] = {}
        allowed, reason = await super()._authenticate_curve(domain, client_key)
        if not allowed:
            self.denied += 1
            log.warning("refused a client with CURVE key %s: %s (allowed keys: %s)",
                        z85.encode(client_key).decode(), reason.decode(), self.dirs.get(domain, domain))
        return allowed, reason


_authenticators: dict[int, _Authenticator] = {}
"""id(context) -> its running authenticator (ZeroMQ allows one ZAP handler per context)."""


def _acquire(context: zmq.Context) -> _Authenticator:
    auth = _authenticators.get(id(context))
    if auth is not None and (auth.loop.is_closed() or auth.loop is not asyncio.get_running_loop()):
        auth.stop()  # left by a loop that has ended (tests run one loop each)
        auth = None
    if auth is None:
        auth = _authenticators[id(context)] = _Authenticator(context)
        auth.start()
    auth.users += 1
    return auth


def _release(context: zmq.Context, auth: _Authenticator) -> None:
    auth.users -= 1
    if auth.users <= 0 and _authenticators.get(id(context)) is auth:
        auth.stop()
        del _authenticators[id(context)]


class CurveGuard:
    """CURVE on one channel socket and the count of its failed handshakes: a server socket (the trainer's,
    with its share of the context's authenticator) or a client socket (an engine's). `secure()` before
    bind or connect, `start(stats)` once the channel runs, `close()` before the socket closes."""

    def __init__(self, sock: zmq.asyncio.Socket, keys: ServerKeys | ClientKeys, what: str,
                 context: zmq.Context | None = None) -> None:
        self.sock, self.keys, self.what, self.context = sock, keys, what, context
        self._auth: _Authenticator | None = None
        self._monitor: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task | None = None

    def secure(self) -> None:
        keys = self.keys
        if isinstance(keys, ServerKeys):
            self._auth = _acquire(self.context)
            domain = "tidal-" + hashlib.sha1(keys.allowed_dir.encode()).hexdigest()[:16]
            self._auth.dirs[domain] = keys.allowed_dir
            self._auth.configure_curve(domain=domain, location=keys.allowed_dir)
            self.sock.zap_domain = domain.encode()
            self.sock.curve_server = True
        else:
            self.sock.curve_serverkey = keys.server
        self.sock.curve_secretkey = keys.secret
        self.sock.curve_publickey = keys.public
        events = zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
        self._monitor = self.sock.get_monitor_socket(events)

    def start(self, stats) -> None:
        """Count failed handshakes into `stats.refused` (and `stats.last_error`) from now on."""
        self._task = asyncio.create_task(self._watch(stats), name=f"curve-{self.what}")

    async def _watch(self, stats) -> None:
        server = isinstance(self.keys, ServerKeys)
        while True:
            event = parse_monitor_message(await self._monitor.recv_multipart())
            stats.refused += 1
            why = _REFUSALS.get(event["event"], "handshake failed")
            where = event["endpoint"].decode(errors="replace")
            if server:
                stats.last_error = f"{self.what}: refused a peer at {where}: {why}"
                log.warning("%s", stats.last_error)
            else:
                stats.last_error = (f"{self.what}: the trainer at {where} refused this engine's CURVE handshake: "
                                    f"{why} (is this engine's public key in the trainer's curve_allowed_dir, and "
                                    "curve_server_key the trainer's public key?)")
                log.error("%s", stats.last_error)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._monitor is not None:
            with contextlib.suppress(zmq.ZMQError):
                self.sock.disable_monitor()
            self._monitor.close(linger=0)
        if self._auth is not None:
            _release(self.context, self._auth)
            self._auth = None
