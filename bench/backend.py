"""`tidal bench backend`: CPU cost of the inference clients per streamed token and per request.

The server is `tidal serve --simulate --fast` (a child process: zero model cost, forced response
lengths, deltas streamed one token per event), so what is measured is the client: CPU time of this
process (`time.process_time`, the server's CPU is not in it) divided by the tokens or requests it
handled, at 1, 64 and 1024 concurrent streams. Clients, in the same run against the same server:

- `tidal-sglang`: our `sglang` backend on the native /generate (`--incremental-streaming-output`);
- `tidal-openai`: our `openai` backend on /v1/completions;
- `openai-pkg`: the `openai` package's `AsyncOpenAI` streaming the same /v1/completions (token ids
  and logprobs requested the same way), its connection limit raised to the concurrency.

Per token: all the client's CPU in streams of `tokens` tokens over the tokens; per request: the same
for as many one-token requests; per chunk: the marginal cost of one more streamed token (the
difference of the two runs over the extra tokens; with --quick's 4-token streams it is within the
noise, and the openai package's per-request cost at 1024 streams varies more than its streams cost).
`tokens_per_cpu_s` is the
rate one core sustains when the client alone is the limit (1e6 / cpu_us_per_token); `tokens_per_s`
is the wall rate of this run, bounded by the server sharing the machine. Every client's output is
checked (token count, one logprob per token) so a fast wrong client cannot win.
"""

from __future__ import annotations

import asyncio
import gc
import time

import uvloop
from rich.console import Console
from rich.progress import Progress
from tidal.bench.report import bench_parser, emit
from tidal.engine.backends import (
    Chunk,
    OpenAIBackend,
    OpenAIConfig,
    Request,
    Sampling,
    SGLangBackend,
    SGLangConfig,
)
from tidal.engine.reference.launch import ReferenceServer

__all__ = ["main"]

CLIENTS = ("tidal-sglang", "tidal-openai", "openai-pkg")
CONCURRENCY = (1, 64, 1024)
FULL = {"tokens": 64, "streams": {1: 128, 64: 1024, 1024: 2048}}
QUICK = {"tokens": 4, "streams": {1: 16, 64: 64, 1024: 1024}}
"""Per concurrency level, `streams` streams of `tokens` tokens, then as many one-token requests."""
PROMPT = list(range(300, 332))


class _OpenAIPackage:
    """The `openai` package's async client, streaming /v1/completions like our `openai` backend."""

    def __init__(self, url: str, connections: int):
        import httpx2
        import openai

        self.client = openai.AsyncOpenAI(
            base_url=url + "/v1", api_key="none", max_retries=0, timeout=600.0,
            http_client=openai.DefaultAsyncHttpx2Client(
                limits=httpx2.Limits(max_connections=connections, max_keepalive_connections=connections),
                timeout=600.0))

    async def generate(self, request: Request):
        s = request.sampling
        stream = await self.client.completions.create(
            model="default", prompt=request.input_ids, max_tokens=s.max_new_tokens, temperature=s.temperature,
            stream=True, logprobs=0, extra_body={"return_token_ids": True, "ignore_eos": s.ignore_eos})
        async for chunk in stream:
            for choice in chunk.choices:
                yield Chunk((choice.model_extra or {}).get("token_ids") or [], choice.logprobs.token_logprobs, "")

    async def close(self) -> None:
        await self.client.close()


async def _stream(client, i: int, tokens: int) -> tuple[int, int]:
    request = Request(input_ids=PROMPT, request_id=f"b{i}",
                      sampling=Sampling(max_new_tokens=tokens, temperature=1.0, ignore_eos=True))
    n = m = 0
    async for chunk in client.generate(request):
        n += len(chunk.token_ids)
        m += len(chunk.logprobs)
    return n, m


async def _run(client, count: int, concurrency: int, tokens: int) -> tuple[float, float, int]:
    """`count` streams, `concurrency` at a time; returns (client CPU s, wall s, tokens)."""
    slots = asyncio.Semaphore(concurrency)
    total = 0

    async def one(i: int):
        nonlocal total
        async with slots:
            n, m = await _stream(client, i, tokens)
        if n != tokens or m != tokens:
            raise RuntimeError(f"{type(client).__name__}: stream {i} gave {n} tokens and {m} logprobs, "
                               f"expected {tokens}")
        total += n

    gc.collect()
    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(count)))
    return time.process_time() - cpu, time.perf_counter() - wall, total


def _client(name: str, url: str, connections: int):
    if name == "tidal-sglang":
        return SGLangBackend(SGLangConfig(urls=[url], max_connections=connections, health_interval_s=3600))
    if name == "tidal-openai":
        return OpenAIBackend(OpenAIConfig(urls=[url], max_connections=connections))
    return _OpenAIPackage(url, connections)


async def _bench(sizes: dict, url: str) -> list[dict]:
    results = []
    cases = [(c, name) for c in CONCURRENCY for name in CLIENTS]
    with Progress(console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("bench backend", total=len(cases))
        for concurrency, name in cases:
            progress.update(task, description=f"{name} x {concurrency}")
            results.append(await _case(sizes, url, name, concurrency))
            progress.advance(task)
    return results


async def _case(sizes: dict, url: str, name: str, concurrency: int) -> dict:
    """One client at one concurrency: warm up, then the streams, then as many one-token requests."""
    client = _client(name, url, max(concurrency, 16))
    try:
        await _run(client, min(concurrency, 16), concurrency, 2)  # connections up, code warm
        count = sizes["streams"][concurrency]
        cpu, wall, tokens = await _run(client, count, concurrency, sizes["tokens"])
        rcpu, _, _ = await _run(client, count, concurrency, 1)
    finally:
        await client.close()
    return {
        "client": name, "concurrency": concurrency, "tokens": tokens,
        "cpu_us_per_token": 1e6 * cpu / tokens, "cpu_us_per_request": 1e6 * rcpu / count,
        "cpu_us_per_chunk": 1e6 * (cpu - rcpu) / (tokens - count),
        "tokens_per_cpu_s": tokens / cpu, "tokens_per_s": tokens / wall,
    }


def main(argv: list[str]) -> int:
    parser = bench_parser("backend", __doc__.splitlines()[0])
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    server_args = ["--fast", "--incremental-streaming-output", "--set", "simulate.lengths=max_new_tokens",
                   "--set", "simulate.max_running=8192"]
    with ReferenceServer(simulate=True, args=server_args) as server:
        results = uvloop.run(_bench(sizes, server.url))
    at = {(r["client"], r["concurrency"]): r for r in results}
    ours, theirs = at["tidal-sglang", 1024]["cpu_us_per_token"], at["openai-pkg", 1024]["cpu_us_per_token"]
    summary = {
        "client_cpu_us_per_token_1024": ours,
        "openai_cpu_us_per_token_1024": theirs,
        "cpu_ratio_vs_openai": ours / theirs,
        "client_cpu_us_per_request_1024": at["tidal-sglang", 1024]["cpu_us_per_request"],
        "client_tokens_per_cpu_s_1024": at["tidal-sglang", 1024]["tokens_per_cpu_s"],
    }
    config = {"server": "tidal serve --simulate " + " ".join(server_args), "event_loop": "uvloop",
              "prompt_tokens": len(PROMPT), **sizes}
    emit("backend", config, results, summary, args.json_out)
    return 0
