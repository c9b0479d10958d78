"""`tidal serve --api-key` (and `--admin-api-key`) guard every route but the open ones (docs/sglang.md
§0: /health*, /ready and /metrics never need a key). The route list is read from the server's own
application, so a route added later is checked without editing this test. Paths dressed up to look like
an open path, or percent-encoded, get no further than a plain request, and no answer repeats a key."""

from __future__ import annotations

import asyncio

import pytest
from tidal.engine.reference.launch import ReferenceServer
from tidal.engine.reference.server import build_app

pytestmark = pytest.mark.slow

KEY, ADMIN = "normal-key-1f2e", "admin-key-9a8b"
OPEN = ("/health", "/ready", "/metrics")
ADMIN_PATHS = {"/update_weights_from_disk", "/update_weights_from_distributed", "/update_weights_from_tensor",
               "/init_weights_update_group", "/destroy_weights_update_group", "/update_weight_version",
               "/begin_weight_update", "/end_weight_update", "/pause_generation", "/continue_generation",
               "/abort_request", "/flush_cache"}
"""docs/sglang.md §0's weight and control endpoints: with --admin-api-key, only that key opens them."""


def routes() -> list[tuple[str, str]]:
    """(method, path) of every route the server registers (HEAD left out: GET covers it)."""
    out = []
    for route in build_app(None).router.routes():
        path = route.resource.canonical.replace("{model}", "some-model")
        methods = ("GET", "POST") if route.method == "*" else (route.method,)
        out += [(m, path) for m in methods if m != "HEAD"]
    return out


async def request(port: int, method: str, path: str, key: str | None = None,
                  body: bytes = b"not json") -> tuple[int, bytes]:
    """One raw HTTP/1.1 request, the path sent exactly as given (no client-side normalisation).
    The default body is malformed JSON: an authorised request is refused by its handler (400), so no
    request here changes the server's state."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close",
            "Content-Type: application/json", f"Content-Length: {len(body) if method != 'GET' else 0}"]
    if key is not None:
        head.append(f"Authorization: Bearer {key}")
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + (body if method != "GET" else b""))
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    status = int(raw.split(b" ", 2)[1])
    return status, raw.split(b"\r\n\r\n", 1)[1]


@pytest.fixture(scope="module")
def keyed():
    with ReferenceServer(simulate=True, args=["--fast", "--api-key", KEY]) as srv:
        yield srv


@pytest.fixture(scope="module")
def admin_keyed():
    with ReferenceServer(simulate=True, args=["--fast", "--api-key", KEY, "--admin-api-key", ADMIN]) as srv:
        yield srv


def test_the_route_list_is_the_servers():
    found = routes()
    assert ("POST", "/generate") in found and ("POST", "/v1/completions") in found
    assert ADMIN_PATHS <= {path for _, path in found}
    assert len(found) >= 25


@pytest.mark.parametrize("method, path", routes())
async def test_every_route_needs_the_key(keyed, method, path):
    if path.startswith(OPEN):
        status, _ = await request(keyed.port, method, path)
        assert status != 401, f"{method} {path} is open by the contract"
        return
    for key in (None, "", "wrong", KEY + "x", KEY[:-1], KEY.upper()):
        status, body = await request(keyed.port, method, path, key)
        assert (status, body) == (401, b'{"error":"Unauthorized"}'), f"{method} {path} with key {key!r}"
    status, _ = await request(keyed.port, method, path, KEY)
    assert status not in (401, 403), f"{method} {path} refused the right key"


@pytest.mark.parametrize("method, path", routes())
async def test_admin_key_alone_opens_control_routes(admin_keyed, method, path):
    if path.startswith(OPEN):
        return
    status, _ = await request(admin_keyed.port, method, path)
    assert status == 401, f"{method} {path} without a key"
    if path in ADMIN_PATHS:
        status, body = await request(admin_keyed.port, method, path, KEY)
        assert (status, body) == (403, b'{"error":"Forbidden"}'), f"{method} {path} with the normal key"
        status, _ = await request(admin_keyed.port, method, path, ADMIN)
        assert status not in (401, 403), f"{method} {path} refused the admin key"
    else:
        status, _ = await request(admin_keyed.port, method, path, KEY)
        assert status not in (401, 403), f"{method} {path} refused the normal key"


@pytest.mark.parametrize("path", [
    "/health/../generate", "/metrics/../server_info", "/ready/..%2fserver_info", "/health%2F..%2Fgenerate",
    "//generate", "/generate/", "/%67enerate", "/./generate", "/health/../update_weights_from_disk",
    "/metrics/../../pause_generation", "/healthz/../../flush_cache",
])
async def test_dressed_up_paths_get_no_further(keyed, path):
    """A path that starts like an open one but resolves elsewhere is refused or unknown, never served."""
    for method in ("GET", "POST"):
        status, body = await request(keyed.port, method, path)
        assert status in (401, 404, 405), f"{method} {path} -> {status} {body[:200]!r}"


async def test_no_answer_repeats_a_key(admin_keyed):
    """A normal key's holder reads /server_info, /model_info and /metrics: the admin key is in none."""
    for path in ("/server_info", "/get_server_info", "/model_info", "/metrics", "/v1/models"):
        status, body = await request(admin_keyed.port, "GET", path, KEY)
        assert status == 200, path
        assert ADMIN.encode() not in body and KEY.encode() not in body, f"{path} shows a key: {body[:400]!r}"
