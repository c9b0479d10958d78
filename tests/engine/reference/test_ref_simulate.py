"""`tidal serve --simulate`: the same protocol on the cost model, at many concurrent streams."""

import asyncio
import subprocess
import sys

import aiohttp
import pytest
from refserver_http import get, parse_sse, post
from tidal.engine.reference.launch import ReferenceServer
from tidal.engine.reference.simulate import SimulateConfig, Simulator

COSTS = ["--set", "simulate.step_base_s=0.002", "--set", "simulate.step_per_seq_s=1e-5",
         "--set", "simulate.prefill_per_token_s=1e-6", "--set", "simulate.max_running=128",
         "--set", "simulate.length_median=30"]


@pytest.fixture(scope="module")
def sim_server():
    with ReferenceServer(simulate=True, args=COSTS) as srv:
        yield srv


def test_step_cost_is_the_documented_formula():
    cfg = SimulateConfig(step_base_s=0.01, step_per_seq_s=0.001, prefill_per_token_s=0.0001)
    # 0.01 + 0.001 * 8 + 0.0001 * 50 = 0.023
    assert Simulator(cfg).step_cost(8, 50) == pytest.approx(0.023)
    assert Simulator(SimulateConfig(fast=True)).step_cost(8, 50) == 0.0


async def test_many_concurrent_streams_complete_with_forced_lengths(sim_server):
    n, length = 300, 20
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one(i: int):
            body = {"input_ids": [300 + i, 301, 302], "rid": f"s{i}", "stream": True, "return_logprob": True,
                    "sampling_params": {"max_new_tokens": length, "ignore_eos": True}}
            async with session.post(sim_server.url + "/generate", json=body) as resp:
                return parse_sse(await resp.text())

        results = await asyncio.gather(*(one(i) for i in range(n)))
    for i, (events, done) in enumerate(results):
        last = events[-1]
        assert done and last["meta_info"]["id"] == f"s{i}"
        assert last["meta_info"]["finish_reason"] == {"type": "length", "length": length}
        assert len(last["output_ids"]) == length == last["meta_info"]["completion_tokens"]
        lps = last["meta_info"]["output_token_logprobs"]
        assert [t[1] for t in lps] == last["output_ids"] and all(t[0] <= 0 for t in lps)
        assert all(256 <= t < 152064 for t in last["output_ids"])
    _, info = await get(sim_server.url + "/server_info")
    state = info["internal_states"][0]
    assert state["max_batch_size_seen"] == 128, "the batch fills up to max_running; the rest queue"
    assert state["num_decode_steps"] < n * length / 50, "one scheduler tick advances the whole batch"


async def test_lognormal_lengths_end_with_eos(sim_server):
    replies = await asyncio.gather(*(post(sim_server.url + "/generate", {
        "text": "hello", "sampling_params": {"max_new_tokens": 4000}}) for _ in range(20)))
    lengths = set()
    for status, body in replies:
        assert status == 200
        fin = body["meta_info"]["finish_reason"]
        if fin["type"] == "stop":
            assert fin["matched"] == 2 and body["output_ids"][-1] == 2
        lengths.add(len(body["output_ids"]))
        assert body["meta_info"]["prompt_tokens"] == 5
    assert len(lengths) > 5, "lengths are drawn, not fixed"


async def test_auth_keys():
    args = ["--fast", "--api-key", "user-key", "--admin-api-key", "admin-key"]
    async with ReferenceServer(simulate=True, args=args) as srv:
        body = {"input_ids": [300], "sampling_params": {"max_new_tokens": 2}}
        assert await post(srv.url + "/generate", body) == (401, {"error": "Unauthorized"})
        user = {"Authorization": "Bearer user-key"}
        admin = {"Authorization": "Bearer admin-key"}
        assert (await post(srv.url + "/generate", body, headers=user))[0] == 200
        assert await post(srv.url + "/pause_generation", {}, headers=user) == (403, {"error": "Forbidden"})
        assert (await post(srv.url + "/pause_generation", {}, headers=admin))[0] == 200
        assert (await post(srv.url + "/continue_generation", {}, headers=admin))[0] == 200
        assert (await get(srv.url + "/health"))[0] == 200
        assert (await get(srv.url + "/model_info"))[0] == 401


def test_simulate_and_launch_never_import_torch():
    code = ("import sys; from tidal.engine.reference.launch import ReferenceServer; "
            "from tidal.engine.reference.server import build_stepper, build_state; "
            "from tidal.engine.reference.config import ServeConfig; "
            "build_state(ServeConfig(mode='simulate'), build_stepper(ServeConfig(mode='simulate'))); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


async def test_client_disconnect_aborts_the_request(sim_server):
    _, before = await get(sim_server.url + "/server_info")
    aborted = before["internal_states"][0]["num_aborted_reqs"]
    body = {"input_ids": [300], "stream": True, "rid": "gone", "sampling_params": {"max_new_tokens": 100000,
                                                                                  "ignore_eos": True}}
    async with aiohttp.ClientSession() as session:
        async with session.post(sim_server.url + "/generate", json=body) as resp:
            assert (await resp.content.readline()).startswith(b"data: {")
    async with asyncio.timeout(20):
        while True:
            _, info = await get(sim_server.url + "/server_info")
            state = info["internal_states"][0]
            if state["num_aborted_reqs"] > aborted and state["num_running_reqs"] == 0:
                break
            await asyncio.sleep(0.1)
    status, reply = await post(sim_server.url + "/generate", {**body, "stream": False,
                                                               "sampling_params": {"max_new_tokens": 1}})
    assert status == 200, "the rid was released with the aborted request"


async def test_batch_stream_interleaves_with_index(sim_server):
    async with aiohttp.ClientSession() as session:
        async with session.post(sim_server.url + "/generate", json={
                "input_ids": [[300], [301, 302]], "stream": True, "rid": "pair",
                "sampling_params": {"max_new_tokens": 5, "ignore_eos": True}}) as resp:
            events, done = parse_sse(await resp.text())
    assert done and {e["index"] for e in events} == {0, 1}
    finals = {e["index"]: e for e in events if e["meta_info"]["finish_reason"] is not None}
    assert {i: e["meta_info"]["id"] for i, e in finals.items()} == {0: "pair_0", 1: "pair_1"}
    assert all(len(e["output_ids"]) == 5 for e in finals.values())


async def test_abort_in_waiting_queue_has_two_keys(sim_server):
    assert (await post(sim_server.url + "/pause_generation", {"mode": "in_place"}))[0] == 200
    queued = asyncio.create_task(post(sim_server.url + "/generate", {
        "input_ids": [300], "rid": "queued", "return_logprob": True, "sampling_params": {"max_new_tokens": 5}}))
    async with asyncio.timeout(30):
        while (await get(sim_server.url + "/server_info"))[1]["internal_states"][0]["num_waiting_reqs"] < 1:
            await asyncio.sleep(0.02)
    assert not queued.done()
    assert (await post(sim_server.url + "/abort_request", {"rid": "queued"}))[0] == 200
    status, body = await queued
    assert (await post(sim_server.url + "/continue_generation", {}))[0] == 200
    meta = body["meta_info"]
    assert status == 200 and meta["finish_reason"] == {"type": "abort", "message": "Abort in waiting queue"}
    assert body["output_ids"] == [] and meta["completion_tokens"] == 0
    assert "prompt_tokens" not in meta and "cached_tokens" not in meta


async def test_weight_update_sessions():
    args = ["--fast", "--set", "server.require_weight_update_session=true"]
    async with ReferenceServer(simulate=True, args=args) as srv:
        update = {"serialized_named_tensors": [], "weight_version": "9"}
        status, reply = await post(srv.url + "/update_weights_from_tensor", update)
        assert status == 400 and reply["success"] is False
        assert "between begin_weight_update() and end_weight_update()" in reply["message"]
        assert (await post(srv.url + "/begin_weight_update", {"selector": "all"}))[0] == 200
        assert await post(srv.url + "/begin_weight_update", {}) == (
            400, {"success": False, "message": "a weight-update session is already open"})
        status, reply = await post(srv.url + "/update_weights_from_tensor", update)
        assert status == 200 and reply["success"] is True
        assert (await post(srv.url + "/end_weight_update", {}))[0] == 200
        assert (await post(srv.url + "/end_weight_update", {}))[0] == 400
        assert (await get(srv.url + "/model_info"))[1]["weight_version"] == "9"


async def test_prefix_cache_counts_the_previous_turn(sim_server):
    prompt = list(range(300, 340))
    params = {"max_new_tokens": 9, "ignore_eos": True}
    _, first = await post(sim_server.url + "/generate", {"input_ids": prompt, "sampling_params": params})
    turn2 = prompt + first["output_ids"] + [500]
    _, second = await post(sim_server.url + "/generate", {"input_ids": turn2, "sampling_params": params})
    assert (first["meta_info"]["cached_tokens"], second["meta_info"]["cached_tokens"]) == (0, 48)


async def test_full_queue_is_a_503():
    args = ["--fast", "--set", "server.max_queued_requests=2"]
    async with ReferenceServer(simulate=True, args=args) as srv:
        assert (await post(srv.url + "/pause_generation", {"mode": "in_place"}))[0] == 200
        body = {"input_ids": [300], "sampling_params": {"max_new_tokens": 1}}
        queued = [asyncio.create_task(post(srv.url + "/generate", body)) for _ in range(2)]
        async with asyncio.timeout(30):
            while (await get(srv.url + "/server_info"))[1]["internal_states"][0]["num_waiting_reqs"] < 2:
                await asyncio.sleep(0.02)
        assert await post(srv.url + "/generate", body) == (503, {"error": {"message": "The request queue is full."}})
        async with aiohttp.ClientSession() as session:
            async with session.post(srv.url + "/generate", json={**body, "stream": True}) as resp:
                events, done = parse_sse(await resp.text())
        assert resp.status == 200 and done and events[0]["error"]["code"] == 503 and events[0]["error"]["retryable"]
        assert (await post(srv.url + "/continue_generation", {}))[0] == 200
        assert [(await q)[0] for q in queued] == [200, 200]


async def test_flush_cache_timeout_while_requests_hold_kv(sim_server):
    body = {"input_ids": [300], "sampling_params": {"max_new_tokens": 100000, "ignore_eos": True}}
    task = asyncio.create_task(post(sim_server.url + "/generate", body))
    async with asyncio.timeout(30):
        while (await get(sim_server.url + "/server_info"))[1]["internal_states"][0]["num_running_reqs"] < 1:
            await asyncio.sleep(0.02)
    assert (await post(sim_server.url + "/pause_generation", {"mode": "in_place"}))[0] == 200
    assert await get(sim_server.url + "/flush_cache?timeout=0.2") == (400, "Timed out waiting for idle state.\n")
    assert (await post(sim_server.url + "/abort_request", {"abort_all": True}))[0] == 200
    status, reply = await get(sim_server.url + "/flush_cache?timeout=5")
    assert status == 200 and reply.startswith("Cache flushed.")
    assert (await post(sim_server.url + "/continue_generation", {}))[0] == 200
    assert (await task)[1]["meta_info"]["finish_reason"]["type"] == "abort"
