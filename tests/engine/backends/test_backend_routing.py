"""Routing: the pure `Router` policy, then the `sglang` client over three simulated reference servers
(affinity across turns; a server killed mid-stream loses no request and duplicates no token; it is
re-admitted after a restart)."""

import asyncio

import pytest
from tidal.engine.backends import Request, Router, Sampling, SGLangBackend, SGLangConfig
from tidal.engine.reference.launch import ReferenceServer

# --- the policy --------------------------------------------------------------------------------


def test_least_loaded_server_takes_a_new_session():
    r = Router(["http://a", "http://b", "http://c"], balance="tokens")
    a, b, c = r.servers
    r.acquire(a, 100)
    r.acquire(b, 50)
    assert r.pick("s1") is c
    r.acquire(c, 500)
    assert r.pick("s2") is b


def test_affinity_holds_until_the_holder_is_overloaded_by_more_than_slack():
    r = Router(["http://a", "http://b"], balance="tokens", slack=1000)
    held = r.pick("s")
    other = next(s for s in r.servers if s is not held)
    r.acquire(held, 1000)  # 1000 more than the other: within slack
    assert r.pick("s") is held
    r.acquire(held, 1)  # 1001 more: the cache hit is not worth the queue
    assert r.pick("s") is other and r.holder("s") is other


def test_requests_balance_counts_requests_not_tokens():
    r = Router(["http://a", "http://b"], balance="requests", affinity=False)
    a, b = r.servers
    r.acquire(a, 10_000)
    r.acquire(b, 1)
    r.acquire(b, 1)
    assert r.pick() is a


def test_equal_loads_rotate():
    r = Router(["http://a", "http://b", "http://c"], affinity=False)
    assert {r.pick().url for _ in range(3)} == {"http://a", "http://b", "http://c"}


def test_ejected_server_gets_nothing_and_its_sessions_move():
    r = Router(["http://a", "http://b"], eject_after=2)
    held = r.pick("s")
    assert not r.failed(held)  # one 5xx is not yet an ejection
    assert r.failed(held) and not held.healthy
    moved = r.pick("s")
    assert moved is not held and r.holder("s") is moved
    assert r.pick("t", exclude=[moved]) is None
    assert r.admit(held) and held.healthy and held.failures == 0


def test_lost_connection_ejects_at_once_and_table_is_bounded():
    r = Router(["http://a", "http://b"], capacity=2)
    a = r.servers[0]
    assert r.failed(a, hard=True) and not a.healthy
    for key in ("s1", "s2", "s3"):
        r.pick(key)
    assert r.holder("s1") is None and r.holder("s3") is not None


# --- three simulated servers ---------------------------------------------------------------------

SIM = ["--set", "simulate.lengths=max_new_tokens", "--set", "simulate.step_base_s=0.004",
       "--set", "simulate.step_per_seq_s=0", "--set", "simulate.prefill_per_token_s=0"]


@pytest.fixture(scope="module")
def servers():
    started = []
    try:
        for i in range(3):  # one streams deltas: a retry may cross streaming modes
            mode = ["--incremental-streaming-output"] if i == 1 else []
            started.append(ReferenceServer(simulate=True, args=SIM + mode).start())
        yield started
    finally:
        for srv in started:
            srv.terminate()


def client(servers, **cfg) -> SGLangBackend:
    cfg.setdefault("health_interval_s", 0.1)
    return SGLangBackend(SGLangConfig(urls=[s.url for s in servers], **cfg))


async def turn(b, key: str, prompt: list[int], n: int, rid: str):
    ids, logprobs, last = [], [], None
    async for chunk in b.generate(Request(input_ids=prompt, request_id=rid, session_key=key,
                                          sampling=Sampling(max_new_tokens=n, ignore_eos=True))):
        ids += chunk.token_ids
        logprobs += chunk.logprobs
        last = chunk
    return ids, logprobs, last.finish


async def test_later_turns_of_a_session_go_to_the_server_holding_its_prefix(servers):
    async with client(servers) as b:
        async def episode(k: int):
            prompt, where = [300 + k] * 8, []
            for t in range(3):
                ids, _, fin = await turn(b, f"traj-{k}", prompt, 6, f"traj-{k}-turn-{t}")
                where.append(fin.server)
                prompt = prompt + ids + [400 + t] * 3  # the observation after the model's tokens
            return where

        placements = await asyncio.gather(*(episode(k) for k in range(9)))
    assert all(len(set(w)) == 1 for w in placements)
    assert {w[0] for w in placements} == {s.url for s in servers}  # and the load spread over all three


async def test_server_killed_mid_stream_loses_nothing_and_is_readmitted_after_restart(servers):
    victim = servers[0]
    async with client(servers) as b:
        tasks = [asyncio.create_task(turn(b, f"k{k}", [500 + k] * 6, 80, f"k{k}")) for k in range(12)]
        while b.router.servers[0].requests == 0 or b.stats().get("tokens", 0) < 12 * 5:
            await asyncio.sleep(0.01)
        await asyncio.to_thread(victim.kill)
        results = await asyncio.gather(*tasks)
        for ids, logprobs, fin in results:
            assert (fin.reason, len(ids), len(logprobs), fin.completion_tokens) == ("length", 80, 80, 80)
        moved = [fin for _, _, fin in results if fin.retries]
        assert moved and all(fin.server != victim.url for fin in moved)
        assert b.stats()["ejections"] == 1 and not b.router.servers[0].healthy
        await asyncio.to_thread(victim.restart)
        while not b.router.servers[0].healthy:
            await asyncio.sleep(0.05)
        assert b.stats()["readmissions"] == 1
        fresh = await asyncio.gather(*(turn(b, f"f{k}", [9] * 4, 4, f"f{k}") for k in range(3)))
        assert victim.url in {fin.server for _, _, fin in fresh}  # back in rotation
