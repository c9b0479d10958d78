"""The `sglang` and `openai` clients against the CPU reference server (`tidal serve`) over real HTTP,
serving the tiny random Llama; expected values come from a direct transformers forward pass here.

One server for the module (it takes seconds to start); tests that change its weights put them back.
"""

import asyncio
from datetime import timedelta

import pytest
from tidal.engine.backends import OpenAIBackend, OpenAIConfig, Request, Sampling, SGLangBackend, SGLangConfig
from tidal.engine.reference.launch import ReferenceServer
from tidal.engine.reference.tiny import build_tiny_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow

PROMPT = [30, 31, 32, 33, 34]


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with ReferenceServer(tiny_model_dir) as srv:
        yield srv


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory):
    """Same architecture, other random weights: what a weight update switches to."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-seed1"), seed=1)


def load(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def forward_logprobs(model, prompt: list[int], generated: list[int], temperature: float):
    """log softmax(logits / T) of each generated token given everything before it (docs/sglang.md §1.4)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + generated])).logits[0]
    lp = torch.log_softmax(logits / (temperature or 1.0), dim=-1)
    rows = lp[len(prompt) - 1: len(prompt) - 1 + len(generated)]
    return rows[torch.arange(len(generated)), torch.tensor(generated)].tolist(), rows.argmax(-1).tolist()


async def generate(b, rid: str, **sampling):
    chunks = [c async for c in b.generate(Request(input_ids=PROMPT, request_id=rid,
                                                  sampling=Sampling(**sampling)))]
    return [t for c in chunks for t in c.token_ids], [lp for c in chunks for lp in c.logprobs], chunks


def client(server, **cfg) -> SGLangBackend:
    return SGLangBackend(SGLangConfig(urls=[server.url], health_interval_s=60.0, **cfg))


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
async def test_greedy_tokens_and_logprobs_match_a_forward_pass(server, tiny_model_dir, stream):
    async with client(server, stream=stream) as b:
        ids, logprobs, chunks = await generate(b, f"greedy-{stream}", max_new_tokens=12, temperature=0.0)
    expected, argmax = forward_logprobs(load(tiny_model_dir), PROMPT, ids, 0.0)
    assert len(ids) == 12 and ids == argmax
    assert logprobs == pytest.approx(expected, abs=1e-4)
    assert (chunks[-1].finish.reason, chunks[-1].finish.completion_tokens) == ("length", 12)
    assert len(chunks) == (12 if stream else 1)


async def test_sampled_logprobs_are_of_the_tempered_full_distribution(server, tiny_model_dir):
    async with client(server) as b:
        ids, logprobs, _ = await generate(b, "sampled", max_new_tokens=10, temperature=0.7, top_k=5, seed=3)
    expected, _ = forward_logprobs(load(tiny_model_dir), PROMPT, ids, 0.7)
    assert logprobs == pytest.approx(expected, abs=1e-4)


async def test_stop_token_ends_generation_and_is_kept(server):
    async with client(server) as b:
        ids, _, _ = await generate(b, "free", max_new_tokens=8, temperature=0.0)
        stop = ids[3]
        first = ids.index(stop)
        cut, _, chunks = await generate(b, "stopped", max_new_tokens=8, temperature=0.0, stop_token_ids=(stop,))
    assert cut == ids[: first + 1]
    assert (chunks[-1].finish.reason, chunks[-1].finish.matched) == ("stop", stop)


async def test_abort_mid_stream(server):
    async with client(server) as b:
        got, last = [], None
        async for chunk in b.generate(Request(input_ids=PROMPT, request_id="to-abort",
                                              sampling=Sampling(max_new_tokens=3000, temperature=0.0))):
            got += chunk.token_ids
            if len(got) >= 3 and not b.stats().get("abort_sent"):
                b.counters["abort_sent"] += 1
                await b.abort("to-abort")
            last = chunk
    assert last.finish.reason == "abort" and 3 <= len(got) < 3000
    assert last.finish.completion_tokens == len(got)


async def test_pause_holds_in_flight_requests_and_continue_finishes_them(server):
    async with client(server, pause_mode="retract") as b:
        received = []

        async def consume():
            async for chunk in b.generate(Request(input_ids=PROMPT, request_id="held",
                                                  sampling=Sampling(max_new_tokens=60, temperature=0.0,
                                                                    ignore_eos=True))):
                received.extend(chunk.token_ids)
                last = chunk
            return last

        task = asyncio.create_task(consume())
        while len(received) < 3:
            await asyncio.sleep(0.005)
        await b.pause()
        await asyncio.sleep(0.05)
        held = len(received)
        await asyncio.sleep(0.3)
        assert len(received) == held and not task.done()
        await b.resume()
        last = await task
    assert last.finish.reason == "length" and len(received) == 60
    ids, _, _ = await generate_again(server)
    assert received == ids  # retract recomputes under the same weights: the greedy continuation is unchanged


async def generate_again(server):
    async with client(server) as b:
        return await generate(b, "reference-run", max_new_tokens=60, temperature=0.0, ignore_eos=True)


async def test_weight_update_from_disk_changes_outputs_and_version(server, tiny_model_dir, other_model_dir):
    async with client(server) as b:
        before, _, _ = await generate(b, "w0", max_new_tokens=8, temperature=0.0)
        assert await b.update_weights_from_disk(str(other_model_dir), 1) == {server.url: 1}
        after, logprobs, chunks = await generate(b, "w1", max_new_tokens=8, temperature=0.0)
        assert after != before and {c.weight_version for c in chunks} == {1}
        expected, argmax = forward_logprobs(load(other_model_dir), PROMPT, after, 0.0)
        assert after == argmax and logprobs == pytest.approx(expected, abs=1e-4)
        assert await b.update_weights_from_disk(str(tiny_model_dir), 2) == {server.url: 2}
        restored, _, _ = await generate(b, "w2", max_new_tokens=8, temperature=0.0)
    assert restored == before


async def test_distributed_weight_update_over_gloo(server, tiny_model_dir, other_model_dir):
    dist = torch.distributed
    new = load(other_model_dir).state_dict()
    names = list(new)
    store = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False)
    async with client(server) as b:
        before, _, _ = await generate(b, "d0", max_new_tokens=8, temperature=0.0)

        def join():
            prefix = dist.PrefixStore("cpu/", dist.PrefixStore("weight_update_group/", store))
            return dist.ProcessGroupGloo(prefix, 0, 2, timedelta(seconds=60))

        pg, world = await asyncio.gather(asyncio.to_thread(join),
                                         b.init_weights_group("127.0.0.1", store.port, backend="gloo"))
        assert world == 2

        def send():
            for name in names:
                pg.broadcast(new[name].contiguous(), 0).wait()

        versions, _ = await asyncio.gather(
            b.update_weights_from_distributed(names, [str(new[n].dtype).removeprefix("torch.") for n in names],
                                              [list(new[n].shape) for n in names], 3),
            asyncio.to_thread(send))
        assert versions == {server.url: 3}
        after, _, chunks = await generate(b, "d1", max_new_tokens=8, temperature=0.0)
        await b.destroy_weights_group()
        await b.update_weights_from_disk(str(tiny_model_dir), 4)
    _, argmax = forward_logprobs(load(other_model_dir), PROMPT, after, 0.0)
    assert after == argmax and after != before and chunks[0].weight_version == 3


async def test_openai_backend_streams_the_same_tokens_and_logprobs(server):
    async with client(server) as b:
        ids, logprobs, _ = await generate(b, "native", max_new_tokens=10, temperature=0.0)
        served = await b.weight_version()  # 0 on a fresh server, else what an earlier test left
    async with OpenAIBackend(OpenAIConfig(urls=[server.url])) as o:
        oids, ologprobs, chunks = await generate(o, "compat", max_new_tokens=10, temperature=0.0)
        health = await o.health()
    assert oids == ids and ologprobs == pytest.approx(logprobs, abs=1e-5)
    assert (chunks[-1].finish.reason, chunks[-1].finish.completion_tokens) == ("length", 10)
    assert chunks[-1].weight_version == served[server.url] and health == {server.url: True}


async def test_openai_backend_abort_ends_the_stream(server):
    async with OpenAIBackend(OpenAIConfig(urls=[server.url])) as o:
        got, last = [], None
        async for chunk in o.generate(Request(input_ids=PROMPT, request_id="oa",
                                              sampling=Sampling(max_new_tokens=3000, temperature=0.0))):
            got += chunk.token_ids
            if len(got) >= 2 and not o.counters["abort_sent"]:
                o.counters["abort_sent"] += 1
                await o.abort("oa")
            last = chunk
    assert last.finish.reason == "abort" and len(got) < 3000
