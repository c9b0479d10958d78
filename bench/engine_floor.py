"""The parse floor of `tidal bench engine`: a bare aiohttp + msgspec reader of the engine's streams.

Run as a child process (`python -m tidal.bench.engine_floor URL EPISODES CONCURRENCY TURNS TOKENS
INTERVAL`), so its CPU is measured from /proc exactly as the engine's is, in a process that imports
nothing else. It plays the token-in/token-out skeleton of the engine's episodes and nothing more:
`episodes` episodes, `concurrency` at a time, each `turns` /generate streams in a row whose prompt is
the last prompt plus the tokens read and an observation's worth of ids; it splits the SSE events
and decodes each into token ids and logprobs with one typed msgspec decoder. No chat template, env,
transcript, retries, routing or trajectories: what any client pays to read the same tokens.

It prints `ready` once its connections are open and its code is warm, waits for a line on stdin,
runs, checks every episode got `turns` x `tokens` tokens, prints one JSON line of counts, and exits
at the next line (so the parent reads its CPU time while it still runs).
"""

from __future__ import annotations

import asyncio
import json
import sys

import aiohttp
import msgspec
import uvloop

__all__ = ["PROMPT_TOKENS", "OBSERVATION_TOKENS", "main"]

PROMPT_TOKENS = 72
"""The first prompt, about what the chat template makes of the synthetic env's first observation."""
OBSERVATION_TOKENS = 72
"""Tokens appended after each turn, about the template's delta for one observation."""


class _Logprob(msgspec.Struct, array_like=True, gc=False):
    logprob: float
    token_id: int
    text: None = None


class _Meta(msgspec.Struct, gc=False):
    output_token_logprobs: list[_Logprob] = []
    finish_reason: dict | None = None


class _Event(msgspec.Struct, gc=False):
    meta_info: _Meta
    output_ids: list[int] = []


_event = msgspec.json.Decoder(_Event)
_encode = msgspec.json.Encoder().encode
_JSON = {"Content-Type": "application/json"}


async def _episode(session: aiohttp.ClientSession, url: str, i: int, turns: int, tokens: int, interval: int) -> int:
    ids, logprobs = list(range(300, 300 + PROMPT_TOKENS)), []
    for turn in range(turns):
        body = _encode({"input_ids": ids, "rid": f"floor-{i}-{turn}", "stream": True, "return_logprob": True,
                        "sampling_params": {"max_new_tokens": tokens, "temperature": 1.0,
                                            "stream_interval": interval}})
        async with session.post(url + "/generate", data=body, headers=_JSON) as resp:
            buf, done = b"", False
            async for data in resp.content.iter_any():
                buf += data
                *events, buf = buf.split(b"\n\n")
                for event in events:
                    payload = event[6:]  # after "data: "
                    if payload == b"[DONE]":
                        done = True
                        break
                    ev = _event.decode(payload)
                    ids += ev.output_ids
                    logprobs += [e.logprob for e in ev.meta_info.output_token_logprobs]
            if not done:
                raise RuntimeError(f"floor stream {i}/{turn} ended without [DONE]")
        ids += range(400, 400 + OBSERVATION_TOKENS)
    return len(logprobs)


async def _run(url: str, episodes: int, concurrency: int, turns: int, tokens: int, interval: int) -> dict:
    slots = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:

        async def one(i: int) -> int:
            async with slots:
                return await _episode(session, url, i, turns, tokens, interval)

        await asyncio.gather(*(one(-1 - i) for i in range(min(concurrency, 16))))  # connections up, code warm
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        counts = await asyncio.gather(*(one(i) for i in range(episodes)))
    if any(n != turns * tokens for n in counts):
        raise RuntimeError(f"an episode read {min(counts)}..{max(counts)} tokens, expected {turns * tokens}")
    return {"tokens": sum(counts), "turns": episodes * turns}


def main(argv: list[str] | None = None) -> int:
    url, *numbers = sys.argv[1:] if argv is None else argv
    print(json.dumps(uvloop.run(_run(url, *map(int, numbers)))), flush=True)
    sys.stdin.readline()
    return 0


if __name__ == "__main__":
    sys.exit(main())
