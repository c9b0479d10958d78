"""Network faults between the engine and its server (HTTP) and between the engine and the trainer
(ZeroMQ over TCP): a proxy in the test (tests/faults/netproxy.py) delays every chunk, cuts some
connections midway and drops others, and every few seconds drops every open connection.

The engine counts the errors, retries its requests (a cut stream resumes with the tokens it had) and
its channel reconnects and resends what was not acknowledged; the trainer deduplicates. In the end
nothing is lost and nothing is trained on twice.
"""

import asyncio
import contextlib
import signal

import pytest

from tests.faults.netproxy import Proxy
from tests.faults.pipeline import assert_nothing_lost, latest_status, ledger, metrics, steps, until

pytestmark = pytest.mark.slow


async def test_delayed_cut_and_dropped_connections_lose_and_duplicate_nothing(tmp_path, pipeline):
    server = await asyncio.to_thread(pipeline.server)
    trainer = pipeline.trainer(intake={"endpoint": "tcp://127.0.0.1:0", "status_endpoint": "tcp://127.0.0.1:0"})
    ready = await asyncio.to_thread(trainer.start)
    port = lambda endpoint: int(endpoint.rsplit(":", 1)[1])  # noqa: E731
    with Proxy(server.port) as http, Proxy(port(ready["endpoint"])) as traj, \
            Proxy(port(ready["status_endpoint"])) as status:
        for proxy in (http, traj, status):
            proxy.delay_s = 0.002
        http.truncate_every, http.truncate_bytes, http.drop_every = 3, 3000, 5
        traj.truncate_every, traj.truncate_bytes = 2, 3000  # every other connection cut within a few frames
        engine = pipeline.engine(
            [http.url], {"endpoint": traj.endpoint, "status_endpoint": status.endpoint},
            backend={"type": "sglang", "urls": [http.url], "health_interval_s": 0.3, "eject_after": 3,
                     "max_retries": 6})
        await asyncio.to_thread(engine.start)

        async def flap():
            while True:
                await asyncio.sleep(1.5)
                for proxy in (traj, status):
                    await asyncio.to_thread(proxy.drop_all)

        flapping = asyncio.create_task(flap())
        def faulted() -> bool:  # 6 steps, and every kind of fault has hit at least once
            return (len(steps(trainer)) >= 6 and http.counts["truncated"] and http.counts["dropped"]
                    and traj.counts["truncated"] and traj.counts["dropped_all"] and status.counts["dropped_all"])

        try:  # faults until then, or 45 s on a slow machine (so much of the traffic is cut, that may be all)
            with contextlib.suppress(AssertionError):
                await until(faulted, 45, "6 steps through a faulty network")
        finally:
            flapping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flapping
        for proxy in (http, traj, status):  # the network heals: training goes on, the last commits get through
            proxy.truncate_every = proxy.drop_every = 0
        healed = len(steps(trainer))

        def explain() -> str:
            return (f"proxies {http.counts} {traj.counts} {status.counts}\nengine {metrics(engine)}\n{engine.log()}\n"
                    f"trainer {steps(trainer)[-1:]}\n{trainer.log()}\n{latest_status(ready['status_endpoint'])}")

        await until(lambda: len(steps(trainer)) >= healed + 2, 120, "2 steps once the network healed", explain=explain)
        trainer.signal(signal.SIGTERM)
        assert await asyncio.to_thread(trainer.wait) == 0, trainer.log()
        engine.signal(signal.SIGTERM)
        assert await asyncio.to_thread(engine.wait) == 0, engine.log()

    assert http.counts["truncated"] and http.counts["dropped"] and traj.counts["truncated"], http.counts
    assert traj.counts["dropped_all"] and status.counts["dropped_all"]
    m = metrics(engine)
    errors = {k: v for k, v in m.items() if k.startswith("engine/backend/errors_")}
    assert sum(errors.values()) >= 1 and m["engine/backend/retries"] >= 1, m  # counted and retried
    assert_nothing_lost(ledger(trainer, tmp_path / "ckpt", [tmp_path / "engine-spool"]), m["engine/sink/spooled"])
