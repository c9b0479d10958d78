"""The `sglang` client against scripted SGLang servers on loopback: streaming modes, faults, retries,
abort, pause and weight-update fan-out. The real-model checks are in test_backend_vs_reference.py."""

import asyncio

import msgspec
import pytest
from fake_sglang import FakeSGLang, token_at
from tidal.engine.backends import (
    BackendError,
    BackendTimeout,
    BadResponse,
    HTTPStatusError,
    Request,
    RequestRejected,
    Sampling,
    ServerUnavailable,
    SGLangBackend,
    SGLangConfig,
)
from tidal.engine.backends.sglang import _new_tokens
from tidal.protocol import sglang as wire

PROMPT = [5, 6, 7]


def backend(*servers: FakeSGLang, **cfg) -> SGLangBackend:
    cfg.setdefault("health_interval_s", 60.0)
    return SGLangBackend(SGLangConfig(urls=[s.url for s in servers], **cfg))


async def run(b: SGLangBackend, rid: str, max_new_tokens: int = 5, prompt=PROMPT, **sampling):
    chunks = [c async for c in b.generate(Request(
        input_ids=list(prompt), request_id=rid, sampling=Sampling(max_new_tokens=max_new_tokens, **sampling)))]
    ids = [t for c in chunks for t in c.token_ids]
    logprobs = [lp for c in chunks for lp in c.logprobs]
    return ids, logprobs, chunks


@pytest.mark.parametrize("incremental", [False, True], ids=["cumulative", "incremental"])
async def test_each_token_arrives_once_in_either_streaming_mode(incremental):
    async with FakeSGLang(incremental=incremental) as s, backend(s) as b:
        ids, logprobs, chunks = await run(b, "r0", max_new_tokens=6)
    assert ids == [token_at(PROMPT, i) for i in range(6)]
    assert logprobs == [-(i + 1) / 100 for i in range(6)]
    assert all(c.finish is None for c in chunks[:-1])
    fin = chunks[-1].finish
    assert (fin.reason, fin.completion_tokens, fin.prompt_tokens, fin.retries) == ("length", 6, 3, 0)
    assert fin.server == s.url and chunks[0].weight_version == 0


async def test_stop_token_ends_generation_and_is_kept():
    stop = token_at(PROMPT, 2)
    async with FakeSGLang() as s, backend(s) as b:
        ids, _, chunks = await run(b, "r0", max_new_tokens=50, stop_token_ids=(stop,))
    assert ids == [token_at(PROMPT, i) for i in range(3)]
    assert (chunks[-1].finish.reason, chunks[-1].finish.matched) == ("stop", stop)


EXPECTED = {
    "bad_json": (BadResponse, "stream event"),
    "missing_field": (BadResponse, "meta_info"),
    "wrong_length": (BadResponse, "neither cumulative nor a delta"),
    "http_500": (HTTPStatusError, "HTTP 500: boom"),
    "http_400": (HTTPStatusError, "HTTP 400: unknown field `max_tokens`"),
    "hang": (BackendTimeout, "no stream event within 0.5 s"),
    "drop": (ServerUnavailable, "Payload"),
    "error_event": (RequestRejected, "Duplicate request ID"),
    "no_done": (ServerUnavailable, "stream closed before data: [DONE]"),
    "no_finish": (BadResponse, "no finish_reason"),
}


@pytest.mark.parametrize("fault", sorted(EXPECTED))
async def test_broken_response_gives_a_clear_error_and_others_are_served(fault):
    error, words = EXPECTED[fault]
    async with FakeSGLang(token_delay_s=0.01) as s, backend(s, read_timeout_s=0.5) as b:
        s.faults["bad-1"] = fault
        good = asyncio.create_task(run(b, "good-1", max_new_tokens=30))
        with pytest.raises(error) as info:
            await run(b, "bad-1")
        ids, _, _ = await good
        assert ids == [token_at(PROMPT, i) for i in range(30)]
        assert s.url in str(info.value) and "request bad-1" in str(info.value) and words in str(info.value)
        assert (info.value.url, info.value.request_id) == (s.url, "bad-1")
        assert b.stats()[f"errors_{info.value.kind}"] == 1
        await b.health()
        ids, _, _ = await run(b, "good-2")
        assert len(ids) == 5


async def test_request_that_fails_mid_stream_continues_on_another_server_from_received_tokens():
    async with FakeSGLang() as s1, FakeSGLang() as s2, backend(s1, s2) as b:
        s1.faults["r"] = s2.faults["r"] = "drop"
        ids, logprobs, chunks = await run(b, "r", max_new_tokens=8)
        retried = next(req for s in (s1, s2) for req in s.requests("/generate") if req["rid"] == "r@1")
        assert b.stats()["ejections"] == 1 and b.router.healthy != b.router.servers
    first = [token_at(PROMPT, 0), token_at(PROMPT, 1)]
    # the dropped server sent two tokens; the retry extends the prompt by them and asks for 8 - 2 more
    assert retried["input_ids"] == PROMPT + first
    assert retried["sampling_params"]["max_new_tokens"] == 6
    assert ids == first + [token_at(PROMPT + first, i) for i in range(6)]
    assert logprobs == [-0.01, -0.02] + [-(i + 1) / 100 for i in range(6)]
    assert (chunks[-1].finish.reason, chunks[-1].finish.retries, chunks[-1].finish.completion_tokens) == (
        "length", 1, 8)


async def test_connection_lost_after_the_last_chunk_loses_nothing_and_adds_nothing(caplog):
    async with FakeSGLang() as s1, FakeSGLang() as s2, backend(s1, s2) as b:
        s1.faults["r"] = s2.faults["r"] = "drop_after_finish"
        ids, _, chunks = await run(b, "r", max_new_tokens=5)
        assert len(s1.requests("/generate")) + len(s2.requests("/generate")) == 1
    assert ids == [token_at(PROMPT, i) for i in range(5)]
    assert (chunks[-1].finish.reason, chunks[-1].finish.retries) == ("length", 0)
    assert "ignored a fault after the last chunk of r" in caplog.text


async def test_no_retry_when_the_request_itself_is_rejected():
    async with FakeSGLang() as s1, FakeSGLang() as s2, backend(s1, s2) as b:
        s1.faults["r"] = s2.faults["r"] = "http_400"
        with pytest.raises(HTTPStatusError):
            await run(b, "r")
        assert len(s1.requests("/generate")) + len(s2.requests("/generate")) == 1
        assert len(b.router.healthy) == 2


async def test_abort_mid_stream_ends_with_abort_and_partial_tokens():
    async with FakeSGLang(token_delay_s=0.01) as s, backend(s) as b:
        got = []
        async for chunk in b.generate(Request(input_ids=PROMPT, request_id="long",
                                              sampling=Sampling(max_new_tokens=1000))):
            got += chunk.token_ids
            if len(got) >= 3 and not s.requests("/abort_request"):
                await b.abort("long")
            last = chunk
        assert last.finish.reason == "abort" and 3 <= len(got) < 1000
        assert got == [token_at(PROMPT, i) for i in range(len(got))]
        assert s.requests("/abort_request") == [{"rid": "long"}]
        assert b.stats()["aborts"] == 1


async def test_pause_in_abort_mode_resubmits_after_resume_without_losing_tokens():
    async with FakeSGLang(token_delay_s=0.01) as s, backend(s, pause_mode="abort") as b:
        task = asyncio.create_task(run(b, "p", max_new_tokens=40))
        while not s.requests("/generate") or b.stats().get("tokens", 0) < 5:
            await asyncio.sleep(0.01)
        await b.pause()
        while len(s.requests("/generate")) < 2:  # resubmitted; the server holds it until continue
            await asyncio.sleep(0.01)
        assert not task.done()
        await b.resume()
        ids, _, chunks = await task
    first, second = s.requests("/generate")
    k = len(second["input_ids"]) - len(PROMPT)
    assert second["rid"] == "p@1" and second["sampling_params"]["max_new_tokens"] == 40 - k
    assert ids[:k] == second["input_ids"][len(PROMPT):] and len(ids) == 40
    assert chunks[-1].finish.reason == "length" and b.stats()["resubmits"] == 1
    assert s.requests("/pause_generation") == [{"mode": "abort"}] and s.requests("/continue_generation") == [{}]


async def test_weight_update_fans_out_and_reports_each_version():
    async with FakeSGLang() as s1, FakeSGLang() as s2, backend(s1, s2) as b:
        versions = await b.update_weights_from_disk("/ckpt/step-5", 5)
        assert versions == {s1.url: 5, s2.url: 5}
        for s in (s1, s2):
            assert [p for p, _ in s.bodies] == ["/pause_generation", "/update_weights_from_disk",
                                                "/continue_generation"]
            assert s.requests("/update_weights_from_disk") == [{"model_path": "/ckpt/step-5",
                                                                "weight_version": "5", "flush_cache": False}]
        ids, _, chunks = await run(b, "after")
        assert chunks[0].weight_version == 5


@pytest.mark.parametrize("reported, version", [("default", 0), ("", 0), ("0", 0), ("17", 17)])
async def test_versions_are_ints_and_a_server_never_updated_serves_version_0(reported, version):
    async with FakeSGLang(version=reported) as s, backend(s) as b:
        _, _, chunks = await run(b, "r")
        assert {c.weight_version for c in chunks} == {version}
        assert await b.weight_version() == {s.url: version}


async def test_a_server_naming_its_version_otherwise_is_a_bad_response():
    async with FakeSGLang(version="v7") as s, backend(s) as b:
        with pytest.raises(BadResponse, match=f"{s.url} reports weight version 'v7'.*--weight-version") as info:
            await b.weight_version()
        assert info.value.url == s.url
        with pytest.raises(BadResponse, match="weight version 'v7'") as info:
            await run(b, "r")
        assert (info.value.url, info.value.request_id) == (s.url, "r")
        with pytest.raises(ValueError, match="weight version '5': expected the policy version, an int >= 0"):
            await b.update_weights_from_disk("/ckpt/step-5", "5")
        assert not s.requests("/update_weights_from_disk")


async def test_a_version_relabelled_mid_stream_loses_no_token():
    """The chunk naming no policy version is refused whole: its tokens go to the retry, not the caller."""
    async with FakeSGLang() as s1, FakeSGLang() as s2, backend(s1, s2) as b:
        s1.faults["r"] = s2.faults["r"] = "relabel"
        ids, logprobs, chunks = await run(b, "r", max_new_tokens=6)
        bad = s1 if s1.version == "v7" else s2
        assert {s1.version, s2.version} == {"v7", "default"}
        retried = next(req for s in (s1, s2) for req in s.requests("/generate") if req["rid"] == "r@1")
    first = [token_at(PROMPT, 0)]  # the relabelled chunk carried the second token
    assert retried["input_ids"] == PROMPT + first
    assert ids == first + [token_at(PROMPT + first, i) for i in range(5)]
    assert logprobs == [-0.01] + [-(i + 1) / 100 for i in range(5)]
    assert {c.weight_version for c in chunks} == {0} and chunks[-1].finish.retries == 1
    assert chunks[-1].finish.server != bad.url and b.stats()["errors_bad_response"] == 1


async def test_ejected_server_is_readmitted_with_the_latest_weights():
    async with FakeSGLang() as s1, FakeSGLang() as s2, backend(s1, s2, health_interval_s=0.05) as b:
        s2.healthy = False
        while len(b.router.healthy) != 1:
            await asyncio.sleep(0.02)
        await b.update_weights_from_disk("/ckpt/step-1", 1)
        assert s2.version == "default"
        s2.healthy = True
        while len(b.router.healthy) != 2:
            await asyncio.sleep(0.02)
        assert s2.version == "1" and b.stats()["readmissions"] == 1


async def test_an_update_while_every_server_is_out_fails_and_the_first_back_is_given_it():
    """No server in rotation: the update is not done (nobody serves it), yet it is what a returning
    server must load. (`tidal run` found this: the engine took an update to no server for success, and
    its restarted server was re-admitted with the version before, all of whose tokens were stale.)"""
    async with FakeSGLang() as s1, backend(s1, health_interval_s=0.05) as b:
        await b.update_weights_from_disk("/ckpt/step-4", 4)
        s1.healthy = False
        while b.router.healthy:
            await asyncio.sleep(0.02)
        with pytest.raises(ServerUnavailable, match="no server in rotation to take version 5"):
            await b.update_weights_from_disk("/ckpt/step-5", 5)
        assert b.stats()["weight_updates"] == 1
        s1.healthy = True
        while not b.router.healthy:
            await asyncio.sleep(0.02)
        assert s1.version == "5" and s1.requests("/update_weights_from_disk")[-1]["model_path"] == "/ckpt/step-5"


async def test_a_load_whose_continue_failed_still_counts_as_the_servers_latest_version():
    """The server loaded version 3 and then failed its continue (it died): the version a returning
    server must serve is 3, and one back serving 3 (restarted from that checkpoint) is not set back to 2."""
    async with FakeSGLang() as s1, backend(s1, health_interval_s=0.05) as b:
        await b.update_weights_from_disk("/ckpt/step-2", 2)
        s1.failing = {"/continue_generation"}
        with pytest.raises(BackendError, match="continue failed on 1 of 1 servers"):
            await b.update_weights_from_disk("/ckpt/step-3", 3)
        assert s1.version == "3"
        s1.failing, s1.healthy, s1.paused = set(), False, False  # it died; it comes back serving 3
        while b.router.healthy:
            await asyncio.sleep(0.02)
        loads = len(s1.requests("/update_weights_from_disk"))
        s1.healthy = True
        while not b.router.healthy:
            await asyncio.sleep(0.02)
        assert s1.version == "3" and len(s1.requests("/update_weights_from_disk")) == loads


async def test_a_server_caught_up_to_a_version_superseded_meanwhile_is_not_readmitted_until_current():
    """Its catch-up (a replay of version 1) is still loading when version 2 reaches the others: admitting
    it then would serve version 1 beside 2 (tests/faults found this)."""
    async with FakeSGLang() as s1, FakeSGLang() as s2, backend(s1, s2, health_interval_s=0.05) as b:
        s2.healthy = False
        while len(b.router.healthy) != 1:
            await asyncio.sleep(0.02)
        await b.update_weights_from_disk("/ckpt/step-1", 1)
        entered, gate, post = asyncio.Event(), asyncio.Event(), b._post

        async def slow_catch_up(server, path, msg):
            if server.url == s2.url and path == "/update_weights_from_disk" and msg.weight_version == "1":
                entered.set()
                await gate.wait()
            return await post(server, path, msg)

        b._post = slow_catch_up
        s2.healthy = True
        await asyncio.wait_for(entered.wait(), 30)
        await b.update_weights_from_disk("/ckpt/step-2", 2)  # s2 is not in rotation: s1 alone takes it
        gate.set()
        while len(b.router.healthy) != 2:
            await asyncio.sleep(0.02)
        assert s2.version == "2" and b.stats()["readmissions_refused"] >= 1


async def test_failed_update_names_the_server_and_leaves_no_server_paused():
    async with FakeSGLang() as s1, FakeSGLang() as s2, backend(s1, s2) as b:
        s2.failing.add("/pause_generation")
        with pytest.raises(BackendError, match=f"pause failed on 1 of 2 servers: .*{s2.url}"):
            await b.update_weights_from_disk("/ckpt/step-3", 3)
        assert s1.requests("/continue_generation") == [{}] and not s1.paused
        assert not s1.requests("/update_weights_from_disk")  # nothing loaded while one server could not pause
        s2.failing = {"/update_weights_from_disk"}
        with pytest.raises(BackendError, match=f"update_weights_from_disk failed on 1 of 2 servers: HTTP 400: "
                                               f"/update_weights_from_disk: /update_weights_from_disk failed "
                                               f"\\(server {s2.url}\\)"):
            await b.update_weights_from_disk("/ckpt/step-3", 3)
        assert not s1.paused and not s2.paused
        assert b.stats()["errors_pause"] == 1 and b.stats()["errors_update_weights_from_disk"] == 1
        # s1 serves version 3 and s2 does not: s2 is out of rotation until the update is replayed on it
        assert [s.healthy for s in b.router.servers] == [True, False] and b.stats()["ejections"] == 1


async def test_a_disk_update_no_server_took_ejects_none():
    async with FakeSGLang() as s1, FakeSGLang() as s2, backend(s1, s2) as b:
        s1.failing = s2.failing = {"/update_weights_from_disk"}
        with pytest.raises(BackendError, match="update_weights_from_disk failed on 2 of 2 servers"):
            await b.update_weights_from_disk("/ckpt/step-3", 3)
        # both still serve version 0, as they say: both stay (ejecting them all would stop generation)
        assert len(b.router.healthy) == 2 and await b.weight_version() == {s1.url: 0, s2.url: 0}


async def test_a_distributed_update_failing_midway_ejects_every_server_holding_part_of_it():
    async with FakeSGLang() as s1, FakeSGLang() as s2, backend(s1, s2, health_interval_s=0.05) as b:
        with pytest.raises(BackendError, match=f"update_weights_from_distributed failed on 1 of 2 servers.*{s2.url}"):
            async with b.distributed_update(4, 2):
                s2.failing = {"/update_weights_from_distributed"}
                await b.update_weights_from_distributed(["a"], ["float32"], [[2]], 4)
                await b.update_weights_from_distributed(["b"], ["float32"], [[2]], 4)
        # s1 took bucket 1 of 2 (the second was never sent) and s2 failed it: both hold weights of no
        # version, still labelled 0
        assert len(s1.requests("/update_weights_from_distributed")) == 1
        assert [s.healthy for s in b.router.servers] == [False, False] and b.stats()["ejections"] == 2
        assert s1.paused and s2.paused and not s1.requests("/continue_generation")  # held, not resumed
        s1.failing = s2.failing = set()
        while b.stats().get("readmissions_refused", 0) < 4:  # healthy, but version 0 is not theirs
            await asyncio.sleep(0.02)
        assert not b.router.healthy
        async with b.distributed_update(5, 1):
            assert await b.update_weights_from_distributed(["a", "b"], ["float32"] * 2, [[2], [2]], 5) == {
                s1.url: 5, s2.url: 5}
        assert len(b.router.healthy) == 2 and b.stats()["readmissions"] == 2 and not (s1.paused or s2.paused)
        ids, _, chunks = await run(b, "after")
        assert chunks[0].weight_version == 5


async def test_a_server_that_took_every_bucket_stays_when_another_failed_the_last():
    async with FakeSGLang() as s1, FakeSGLang() as s2, backend(s1, s2) as b:
        with pytest.raises(BackendError, match="update_weights_from_distributed failed on 1 of 2"):
            async with b.distributed_update(4, 2):
                await b.update_weights_from_distributed(["a"], ["float32"], [[2]], 4)
                s2.failing = {"/update_weights_from_distributed"}
                await b.update_weights_from_distributed(["b"], ["float32"], [[2]], 4)
        assert [s.healthy for s in b.router.servers] == [True, False]
        assert not s1.paused and s2.paused and await b.weight_version() == {s1.url: 4}


async def test_wait_holds_new_requests_between_the_buckets_of_a_distributed_update():
    async with FakeSGLang() as s, backend(s, weight_update="wait") as b:
        async with b.distributed_update(2, 2):
            await b.update_weights_from_distributed(["a"], ["float32"], [[2]], 2)
            held = asyncio.create_task(run(b, "between"))
            await asyncio.sleep(0.1)
            assert not s.requests("/generate") and not held.done()  # it would run on half the new weights
            await b.update_weights_from_distributed(["b"], ["float32"], [[2]], 2)
        _, _, chunks = await held
    assert {c.weight_version for c in chunks} == {2} and not s.requests("/pause_generation")


async def test_behind_a_router_generation_goes_to_the_router_and_control_to_its_workers():
    async with FakeSGLang(token_delay_s=0.01) as router, FakeSGLang() as w1, FakeSGLang() as w2:
        b = SGLangBackend(SGLangConfig(urls=[router.url], control_urls=[w1.url, w2.url], health_interval_s=60))
        async with b:
            ids, _, _ = await run(b, "via-router", max_new_tokens=3)
            assert len(ids) == 3 and [r["rid"] for r in router.requests("/generate")] == ["via-router"]
            assert await b.update_weights_from_disk("/ckpt/step-2", 2) == {w1.url: 2, w2.url: 2}
            task = asyncio.create_task(run(b, "long", max_new_tokens=500))
            while len(router.requests("/generate")) < 2:
                await asyncio.sleep(0.005)
            await b.abort("long")
            ids, _, chunks = await task
            assert chunks[-1].finish.reason == "abort" and len(ids) < 500
    for w in (w1, w2):
        assert [p for p, _ in w.bodies] == ["/pause_generation", "/update_weights_from_disk",
                                            "/continue_generation", "/abort_request"]
        assert w.requests("/abort_request") == [{"rid": "long"}]
    assert [p for p, _ in router.bodies] == ["/generate", "/generate"]


def _event(output_ids, total, logprobs, lp_total=None):
    meta = {"id": "r", "completion_tokens": total,
            "output_token_logprobs": [[lp, t, None] for lp, t in logprobs]}
    if lp_total is not None:
        meta["output_token_logprobs_length"] = lp_total
    body = {"meta_info": meta} if output_ids is None else {"output_ids": output_ids, "meta_info": meta}
    return msgspec.json.decode(msgspec.json.encode(body), type=wire.GenerateResponse)


@pytest.mark.parametrize("case, ev, seen, expected", [
    # 0.5.23 default: everything cumulative; 2 of 3 already received
    ("cumulative", _event([5, 6, 7], 3, [(-1.0, 5), (-2.0, 6), (-3.0, 7)]), 2, ([7], [-3.0])),
    # --incremental-streaming-output: ids and logprobs are deltas, counters cumulative
    ("incremental", _event([7], 3, [(-3.0, 7)]), 2, ([7], [-3.0])),
    # coalesced deltas (a slow reader): two new tokens in one event
    ("coalesced", _event([6, 7], 3, [(-2.0, 6), (-3.0, 7)]), 1, ([6, 7], [-2.0, -3.0])),
    # old --stream-output: delta ids, cumulative logprobs
    ("old-stream-output", _event([7], 3, [(-1.0, 5), (-2.0, 6), (-3.0, 7)], 3), 2, ([7], [-3.0])),
    # very old servers: no output_ids, the ids come from the logprob triples
    ("no-output-ids", _event(None, 2, [(-1.0, 5), (-2.0, 6)]), 1, ([6], [-2.0])),
    ("nothing-new", _event([5, 6], 2, [(-1.0, 5), (-2.0, 6)]), 2, ([], [])),
])
def test_new_tokens_in_every_streaming_mode(case, ev, seen, expected):
    assert _new_tokens(ev, seen, "http://s", "r") == expected


@pytest.mark.parametrize("ev, seen, words", [
    (_event([5, 6, 7, 8], 3, [(-1.0, 5)] * 4), 1, "output_ids has 4 ids, completion_tokens is 3"),
    (_event([6], 2, [(-1.0, 5), (-1.0, 6), (-1.0, 9)]), 1, "output_token_logprobs has 3 entries"),
    (_event([6], 2, [(-1.0, 9)]), 1, "do not pair with the 1 new output_ids"),
    (_event([6], 2, [(None, 6)]), 1, "logprob is null"),
])
def test_new_tokens_rejects_inconsistent_events(ev, seen, words):
    with pytest.raises(BadResponse, match=words):
        _new_tokens(ev, seen, "http://s", "r")
