"""Plain-aiohttp helpers for the reference server tests: they read the wire format as it is."""

import asyncio
import json

import aiohttp


async def post(url: str, body, *, raw: bytes | None = None, headers=None) -> tuple[int, object]:
    """POST JSON (or raw bytes); return (status, parsed JSON or text)."""
    async with aiohttp.ClientSession() as session:
        data = raw if raw is not None else json.dumps(body).encode()
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        async with session.post(url, data=data, headers=hdrs) as resp:
            text = await resp.text()
            try:
                return resp.status, json.loads(text)
            except ValueError:
                return resp.status, text


async def get(url: str, headers=None) -> tuple[int, object]:
    async with aiohttp.ClientSession() as session:
        async with session.get(url, headers=headers) as resp:
            text = await resp.text()
            try:
                return resp.status, json.loads(text)
            except ValueError:
                return resp.status, text


def parse_sse(payload: str) -> tuple[list[dict], bool]:
    """Split an SSE body into its JSON events; also whether it ended with `data: [DONE]`."""
    events, done = [], False
    for block in payload.split("\n\n"):
        if not block:
            continue
        assert block.startswith("data: "), f"not an SSE data event: {block!r}"
        data = block[len("data: "):]
        assert not done, "event after [DONE]"
        if data == "[DONE]":
            done = True
        else:
            events.append(json.loads(data))
    return events, done


async def stream(url: str, body) -> tuple[int, list[dict], bool]:
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json=body) as resp:
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            events, done = parse_sse(await resp.text())
            return resp.status, events, done


class LiveStream:
    """A streaming `/generate` read event by event while the test does other things.

    `first` is set once the first event arrived; `events`/`done` fill in as they come.
    """

    def __init__(self, url: str, body: dict):
        self.url, self.body = url, {**body, "stream": True}
        self.events: list[dict] = []
        self.done = False
        self.first = asyncio.Event()
        self.task: asyncio.Task | None = None

    async def _run(self) -> list[dict]:
        async with aiohttp.ClientSession() as session:
            async with session.post(self.url + "/generate", json=self.body) as resp:
                assert resp.status == 200
                async for line in resp.content:
                    line = line.decode().rstrip("\n")
                    if not line:
                        continue
                    assert line.startswith("data: ")
                    if line == "data: [DONE]":
                        self.done = True
                        break
                    self.events.append(json.loads(line[len("data: "):]))
                    self.first.set()
        self.first.set()
        return self.events

    async def __aenter__(self) -> "LiveStream":
        self.task = asyncio.create_task(self._run())
        async with asyncio.timeout(60):
            await self.first.wait()
        return self

    async def finish(self, timeout: float = 60) -> list[dict]:
        async with asyncio.timeout(timeout):
            return await self.task

    async def __aexit__(self, *exc) -> None:
        if not self.task.done():
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass


async def wait_running(url: str, n: int = 1, timeout: float = 30) -> None:
    """Poll /server_info until at least n requests are running (not queued)."""
    async with asyncio.timeout(timeout):
        while True:
            _, info = await get(url + "/server_info")
            if info["internal_states"][0]["num_running_reqs"] >= n:
                return
            await asyncio.sleep(0.02)
