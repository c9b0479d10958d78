"""A weight update that fails on one of two servers: the server is ejected, never left serving an old
version beside the new one unnoticed, and re-enters rotation only once it serves the current version.

The failing server runs in a mount namespace of its own where the trainer's weights directory is an
empty tmpfs (a host that does not see the shared directory), so every /update_weights_from_disk it
gets fails for real. Later the test copies the latest version into its view, and the engine's next
health probe replays the update and re-admits it.
"""

import asyncio
import json
import shutil
import signal
import urllib.request

import pytest

from tests.faults.pipeline import can_unshare, hiding, metrics, steps
from tests.trainer.proc import records

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not can_unshare(), reason="needs unprivileged user + mount namespaces")]


def get(url: str, path: str) -> dict:
    with urllib.request.urlopen(url + path, timeout=10) as resp:
        return json.loads(resp.read())


def generate_requests(url: str) -> int:
    """/generate requests the server took (its health probe generates too, but not through /generate)."""
    return get(url, "/server_info")["counters"].get("generate_requests", 0)


async def test_a_server_that_fails_an_update_is_ejected_until_it_serves_the_current_version(tmp_path, pipeline):
    weights = tmp_path / "weights"
    weights.mkdir()
    good, blind = await asyncio.gather(asyncio.to_thread(pipeline.server),
                                       asyncio.to_thread(pipeline.server, wrap=hiding(weights)))
    trainer = pipeline.trainer()
    ready = await asyncio.to_thread(trainer.start)
    engine = pipeline.engine([good.url, blind.url], ready)
    await asyncio.to_thread(engine.start)

    m = await pipeline.until(lambda: (m := metrics(engine)).get("engine/weight_update_failures", 0) and m, 120,
                    "a failed weight update")
    assert m["engine/backend/ejections"] >= 1, m
    await pipeline.until(lambda: len(steps(trainer)) >= 4, 180, "4 steps")
    info = get(blind.url, "/server_info")
    assert info["counters"]["weight_update_failures"] >= 1 and "weight_updates" not in info["counters"], info
    assert get(blind.url, "/model_info")["weight_version"] == "default"  # it never loaded one
    before = generate_requests(blind.url)
    await pipeline.until(lambda: len(steps(trainer)) >= 6, 180, "2 more steps")
    assert 0 < before == generate_requests(blind.url)  # served before the failure, out of rotation since
    await pipeline.until(lambda: metrics(engine).get("engine/backend/readmissions_refused", 0), 60,
                "a probe finding it healthy but behind")

    trainer.signal(signal.SIGTERM)
    assert await asyncio.to_thread(trainer.wait) == 0, trainer.log()
    latest = max(r["step"] for r in records(trainer.jsonl) if r.get("event") == "publish")
    await pipeline.until(lambda: metrics(engine).get("engine/served_version") == latest, 60, "the last version served")
    name = f"v{latest:08d}"
    shutil.copytree(weights / name, blind.view(weights) / name)  # the shared directory reaches that host
    await pipeline.until(lambda: metrics(engine).get("engine/backend/readmissions", 0), 60, "the server re-admitted")
    assert {get(s.url, "/model_info")["weight_version"] for s in (good, blind)} == {str(latest)}
    assert metrics(engine)["engine/backend/servers_healthy"] == 2
