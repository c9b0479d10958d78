"""`tidal bench serve`: what the simulated server (`tidal serve --simulate`) costs and sustains.

The load generator of every engine benchmark must not be their bottleneck. Two figures, against a
child `tidal serve --simulate --incremental-streaming-output`, at 64 and 1024 concurrent streams
of `tokens` tokens (one token per event), read by a bare aiohttp + msgspec client in this process:

- `fast` mode (every cost zero): the server's own CPU per streamed token (its /proc CPU time over
  the tokens) and the rate one core of it sustains (1e6 / that);
- `h100` mode (the default cost model): the simulated GPU's utilisation, its busy seconds over the
  wall time. 1.0 means the server's Python work hides under the simulated steps; lower means the
  server (or the client sharing this machine) is slower than the GPU it simulates.
"""

import asyncio
import os
import time

import aiohttp
import msgspec
import uvloop
from tidal.bench.report import bench_parser, emit
from tidal.engine.reference.launch import ReferenceServer

__all__ = ["main"]

FULL = {"tokens": 128, "concurrency": (64, 1024)}
QUICK = {"tokens": 16, "concurrency": (64, 256)}
MODES = {"fast": ["--fast"], "h100": []}


class _Event(msgspec.Struct):
    output_ids: list[int]


_event = msgspec.json.Decoder(_Event)


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, from /proc/PID/stat (fields 14 and 15)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _stream(session: aiohttp.ClientSession, url: str, i: int, tokens: int) -> int:
    body = {"input_ids": [300 + i % 1000, 301, 302, 303], "stream": True, "return_logprob": True,
            "sampling_params": {"max_new_tokens": tokens, "ignore_eos": True}}
    got = 0
    async with session.post(url + "/generate", json=body) as resp:
        async for line in resp.content:
            if line.startswith(b"data: {"):
                got += len(_event.decode(line[6:]).output_ids)
    if got != tokens:
        raise RuntimeError(f"stream {i}: expected {tokens} tokens, got {got}")
    return got


async def _case(srv: ReferenceServer, concurrency: int, tokens: int) -> dict:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def busy() -> float:
            async with session.get(srv.url + "/server_info") as resp:
                return (await resp.json())["internal_states"][0]["sim_gpu_busy_s"]

        busy0, cpu0, wall0 = await busy(), _cpu_s(srv.pid), time.perf_counter()
        counts = await asyncio.gather(*(_stream(session, srv.url, i, tokens) for i in range(concurrency)))
        wall, cpu = time.perf_counter() - wall0, _cpu_s(srv.pid) - cpu0
        gpu = await busy() - busy0
    total = sum(counts)
    return {"concurrency": concurrency, "tokens": total, "wall_s": wall, "server_cpu_s": cpu,
            "server_cpu_us_per_token": 1e6 * cpu / total, "tokens_per_s": total / wall,
            "sim_gpu_busy_s": gpu, "sim_gpu_utilisation": gpu / wall}


async def _bench(sizes: dict) -> list[dict]:
    results = []
    for mode, flags in MODES.items():
        args = [*flags, "--incremental-streaming-output", "--set", "simulate.prefix_cache_tokens=0"]
        async with ReferenceServer(simulate=True, args=args) as srv:
            for concurrency in sizes["concurrency"]:
                results.append({"mode": mode, **await _case(srv, concurrency, sizes["tokens"])})
    return results


def main(argv: list[str]) -> int:
    args = bench_parser("serve", __doc__.splitlines()[0]).parse_args(argv)
    sizes = QUICK if args.quick else FULL
    results = uvloop.run(_bench(sizes))
    top = max(sizes["concurrency"])
    at = {(r["mode"], r["concurrency"]): r for r in results}
    fast = at["fast", top]["server_cpu_us_per_token"]
    summary = {
        f"server_cpu_us_per_token_{top}": fast,
        "server_tokens_per_cpu_s": 1e6 / fast,
        f"sim_gpu_utilisation_{top}": at["h100", top]["sim_gpu_utilisation"],
    }
    emit("serve", {"sizes": {"tokens": sizes["tokens"], "concurrency": list(sizes["concurrency"])},
                   "modes": MODES}, results, summary, args.json_out)
    return 0
