"""One of two inference servers SIGKILLed while it streams, then restarted, under the real trainer.

Its requests in flight move to the other server with the tokens received so far as prompt (the
backend's retry), so no episode fails and the trainer trains on; the engine ejects the dead server,
and once it is back re-admits it only after replaying the latest weights on it. (With one server,
episodes wait and resume: tests/engine/test_engine_faults.py, test_with_every_server_down_...)
"""

import asyncio
import json
import signal
import urllib.request

import pytest

from tests.faults.netproxy import Proxy
from tests.faults.pipeline import assert_nothing_lost, ledger, metrics, steps
from tests.trainer.proc import records

pytestmark = pytest.mark.slow


def get(url: str, path: str) -> dict:
    with urllib.request.urlopen(url + path, timeout=10) as resp:
        return json.loads(resp.read())


def running(url: str) -> int:
    return get(url, "/server_info")["internal_states"][0]["num_running_reqs"]


async def test_a_server_killed_mid_stream_loses_no_episode_and_is_readmitted_with_the_current_weights(
        tmp_path, pipeline):
    a, b = await asyncio.gather(asyncio.to_thread(pipeline.server), asyncio.to_thread(pipeline.server))
    trainer = pipeline.trainer()
    ready = await asyncio.to_thread(trainer.start)
    with Proxy(a.port) as slow_a:  # a's streams crawl, so it has some in flight when it dies
        slow_a.delay_s = 0.01
        engine = pipeline.engine([slow_a.url, b.url], ready, agent={"type": "chat", "max_turns": 2,
                                                                    "max_new_tokens": 96})
        await asyncio.to_thread(engine.start)
        await pipeline.until(lambda: len(steps(trainer)) >= 2, 180, "2 steps")
        await pipeline.until(lambda: running(a.url) > 0, 60, "requests running on the first server", every=0.01)
        await asyncio.to_thread(a.kill)
        m = await pipeline.until(lambda: (m := metrics(engine)).get("engine/backend/retries", 0) and m, 60,
                        "a request to move to the other server")
        assert m["engine/backend/ejections"] >= 1
        trained_before = len(steps(trainer))
        await pipeline.until(lambda: len(steps(trainer)) >= trained_before + 2, 180, "2 more steps on one server")

        await asyncio.to_thread(a.restart)  # same port, base weights: behind the trainer
        await pipeline.until(lambda: metrics(engine).get("engine/backend/readmissions", 0), 60, "the server re-admitted")
        trainer.signal(signal.SIGTERM)
        assert await asyncio.to_thread(trainer.wait) == 0, trainer.log()
        latest = max(r["step"] for r in records(trainer.jsonl) if r.get("event") == "publish")
        settled = lambda m: m.get("engine/served_version") == latest and m.get("engine/backend/servers_healthy") == 2  # noqa: E731
        await pipeline.until(lambda: settled(metrics(engine)), 60, "the last version served by both servers")
        versions = {get(s.url, "/model_info")["weight_version"] for s in (a, b)}
        assert versions == {str(latest)}, versions  # both in rotation: both at the current version
        engine.signal(signal.SIGTERM)
        assert await asyncio.to_thread(engine.wait) == 0, engine.log()
    m = metrics(engine)
    assert m.get("engine/errors/backend_error", 0) == 0, m  # no episode lost to the kill
    assert_nothing_lost(ledger(trainer, tmp_path / "ckpt", [tmp_path / "engine-spool"]), m["engine/sink/spooled"])
