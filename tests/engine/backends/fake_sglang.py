"""A small SGLang-speaking aiohttp server that plays scripted faults (docs/contributing.md, "Faults are scripted").

It generates a deterministic token sequence (token i of a prompt p is `7 + (sum(p) + i) % 200`, logprob
`-(i + 1) / 100`), streams it per docs/sglang.md §1.6 in cumulative or incremental mode, and records every
request body it receives. `faults[rid]` makes one request misbehave; everything else keeps working, so
tests can check that one broken response does not disturb the others.
"""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

__all__ = ["FakeSGLang", "token_at"]

FAULTS = ("bad_json", "missing_field", "wrong_length", "http_500", "http_400", "hang", "drop",
          "error_event", "no_done", "no_finish", "drop_after_finish", "relabel")


def token_at(prompt: list[int], i: int) -> int:
    return 7 + (sum(prompt) + i) % 200


class FakeSGLang:
    """`async with FakeSGLang() as s:` serves on 127.0.0.1, port 0; `s.url` is read back after bind."""

    def __init__(self, *, incremental: bool = False, token_delay_s: float = 0.0, version: str = "default",
                 weight_sessions: bool = False):
        self.incremental = incremental
        self.token_delay_s = token_delay_s
        self.version = version
        """The `weight_version` it reports, as on the wire: SGLang's "default" until an update names one."""
        self.faults: dict[str, str] = {}
        """rid -> fault; a key ending in "*" matches every rid that ends with the rest (an engine's rids
        start with its run's epoch, unknown to the test)."""
        self.bodies: list[tuple[str, bytes]] = []
        """(path, raw body) of every request, in arrival order."""
        self.routing_keys: list[str | None] = []
        """The `X-SMG-Routing-Key` header of every /generate (sglang-router's affinity key)."""
        self.failing: set[str] = set()
        """Control paths that answer 400 {"success": false} (a failed pause, a bad checkpoint...)."""
        self.finishes: dict[str, str] = {}
        """rid -> how its stream ended (abort, length, stop)."""
        self.healthy = True
        self.paused = False
        self._resumed = asyncio.Event()
        self._resumed.set()
        self._aborted: set[str] = set()
        self._inflight: set[str] = set()
        self.url = ""
        app = web.Application()
        app.router.add_post("/generate", self._generate)
        for path in ("/abort_request", "/pause_generation", "/continue_generation", "/update_weights_from_disk",
                     "/init_weights_update_group", "/update_weights_from_distributed",
                     "/destroy_weights_update_group"):
            app.router.add_post(path, self._control)
        if weight_sessions:  # 0.5.23 has them; older servers answer 404 (docs/sglang.md §3.5)
            app.router.add_post("/begin_weight_update", self._control)
            app.router.add_post("/end_weight_update", self._control)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_get("/health", self._health)
        app.router.add_get("/model_info", self._model_info)
        self._runner = web.AppRunner(app, shutdown_timeout=0.2)  # a "hang" handler never ends by itself

    async def __aenter__(self) -> FakeSGLang:
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        return self

    async def __aexit__(self, *exc) -> None:
        await self._runner.cleanup()

    def requests(self, path: str) -> list[dict]:
        return [json.loads(body) for p, body in self.bodies if p == path]

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.healthy else 503)

    async def _model_info(self, request: web.Request) -> web.Response:
        return web.json_response({"model_path": "fake", "weight_version": self.version})

    async def _control(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.bodies.append((request.path, body))
        msg = json.loads(body)
        if request.path in self.failing:
            return web.json_response({"success": False, "message": f"{request.path} failed"}, status=400)
        match request.path:
            case "/abort_request":
                self._aborted.update(r for r in self._inflight if r.startswith(msg.get("rid") or "\0"))
                return web.Response(status=200)
            case "/pause_generation":
                self.paused = True
                self._resumed.clear()
                if msg.get("mode", "abort") == "abort":
                    self._aborted.update(self._inflight)
                return web.json_response({"message": "Generation paused successfully.", "status": "ok"})
            case "/continue_generation":
                self.paused = False
                self._resumed.set()
                return web.json_response({"message": "Generation continued successfully.", "status": "ok"})
            case "/update_weights_from_disk" | "/update_weights_from_distributed":
                if msg.get("weight_version") is not None:
                    self.version = msg["weight_version"]
                return web.json_response({"success": True, "message": "Succeeded to update model weights."})
        return web.json_response({"success": True, "message": "ok"})

    def _event(self, rid: str, ids: list[int], seen: int, n: int, finish: dict | None,
               index: int | None = None) -> bytes:
        """One chunk: `ids[:n]` generated so far, `seen` of them already sent; `index`: a batch item's."""
        out = ids[seen:n] if self.incremental else ids[:n]
        first = seen if self.incremental else 0
        meta = {"id": rid, "finish_reason": finish, "prompt_tokens": 3, "completion_tokens": n,
                "cached_tokens": 0, "weight_version": self.version,
                "output_token_logprobs": [[-(first + i + 1) / 100, t, None] for i, t in enumerate(out)],
                "output_token_logprobs_length": n}
        event = {"text": "", "output_ids": out, "meta_info": meta}
        if index is not None:
            event["index"] = index
        return b"data: " + json.dumps(event).encode() + b"\n\n"

    def fault_for(self, rid: str) -> str | None:
        if rid in self.faults:
            return self.faults[rid]
        return next((f for key, f in self.faults.items() if key.endswith("*") and rid.endswith(key[:-1])), None)

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.bodies.append((request.path, body))
        self.routing_keys.append(request.headers.get("X-SMG-Routing-Key"))
        req = json.loads(body)
        rid, prompt, params = req["rid"], req["input_ids"], req.get("sampling_params", {})
        if isinstance(rid, list):
            return await self._batch(request, req)
        fault = self.fault_for(rid)
        if fault == "http_500":
            return web.json_response({"object": "error", "message": "boom", "type": "500", "param": None,
                                      "code": 500}, status=500)
        if fault == "http_400":
            return web.json_response({"error": "unknown field `max_tokens`"}, status=400)
        await self._resumed.wait()
        if not req.get("stream"):
            return await self._whole(rid, prompt, params)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if await self._stream(resp, rid, prompt, params, fault):
            return resp
        if fault == "drop_after_finish":
            resp._req.transport.close()
            return resp
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def _batch(self, request: web.Request, req: dict) -> web.StreamResponse:
        """A streaming batch (§1.5): one rid, prompt and sampling object per item, events tagged with
        `index`, interleaved. Faults are played by requests alone."""
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await self._resumed.wait()
        await asyncio.gather(*(self._stream(resp, rid, prompt, params, None, index=i) for i, (rid, prompt, params)
                               in enumerate(zip(req["rid"], req["input_ids"], req["sampling_params"], strict=True))))
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def _stream(self, resp: web.StreamResponse, rid: str, prompt: list[int], params: dict,
                      fault: str | None, index: int | None = None) -> bool:
        """Generate and send one request's events; True when a fault ended the response."""
        budget, stops = params.get("max_new_tokens", 128), set(params.get("stop_token_ids") or ())
        ids: list[int] = []
        sent, finish = 0, None
        self._inflight.add(rid)
        try:
            while finish is None:
                if self.token_delay_s:
                    await asyncio.sleep(self.token_delay_s)
                if rid in self._aborted:
                    finish = {"type": "abort", "message": "Aborted", "status_code": None, "err_type": None}
                elif len(ids) >= budget:
                    finish = {"type": "length", "length": budget}
                else:
                    ids.append(token_at(prompt, len(ids)))
                    if ids[-1] in stops:
                        finish = {"type": "stop", "matched": ids[-1]}
                if len(ids) == 2 and fault is not None:
                    if await self._misbehave(fault, resp, rid, ids, sent):
                        return True
                await resp.write(self._event(rid, ids, sent, len(ids), finish, index))
                sent = len(ids)
            self.finishes[rid] = finish["type"]
        finally:
            self._inflight.discard(rid)
            self._aborted.discard(rid)
        return False

    async def _whole(self, rid: str, prompt: list[int], params: dict) -> web.Response:
        """A non-streaming response (§1.3): the whole generation at once."""
        ids = [token_at(prompt, i) for i in range(params.get("max_new_tokens", 128))]
        finish = {"type": "length", "length": len(ids)}
        return web.Response(body=self._event(rid, ids, 0, len(ids), finish)[6:-2], content_type="application/json")

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        """OpenAI-style deltas with `token_ids` (docs/sglang.md §5); fault `no_token_ids` leaves them out,
        `drop` closes the connection after two tokens, `http_500` answers 500."""
        body = await request.read()
        self.bodies.append((request.path, body))
        req = json.loads(body)
        prompt, budget, rid = req["prompt"], req.get("max_tokens", 16), req.get("rid", "")
        if self.fault_for(rid) == "http_500":
            return web.json_response({"error": {"message": "scripted failure", "code": 500}}, status=500)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(budget):
            if i == 2 and self.fault_for(rid) == "drop":
                resp._req.transport.close()
                return resp
            if self.token_delay_s:
                await asyncio.sleep(self.token_delay_s)
            t = token_at(prompt, i)
            choice = {"index": 0, "text": "x", "finish_reason": "length" if i == budget - 1 else None,
                      "logprobs": {"tokens": ["x"], "token_logprobs": [-(i + 1) / 100], "top_logprobs": None,
                                   "text_offset": [-1]}}
            if self.fault_for(rid) != "no_token_ids":
                choice["token_ids"] = [t]
            chunk = {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "fake",
                     "choices": [choice]}
            if i == budget - 1:
                chunk["metadata"] = {"weight_version": self.version}
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def _misbehave(self, fault: str, resp: web.StreamResponse, rid: str, ids: list[int], sent: int) -> bool:
        """Play `fault` at the second token; True when the response is over."""
        match fault:
            case "bad_json":
                await resp.write(b'data: {"text": "a", "output_ids": [1,\n\n')
            case "missing_field":
                await resp.write(b'data: {"text": "a", "output_ids": [1, 2]}\n\n')
            case "wrong_length":
                event = json.loads(self._event(rid, ids, sent, len(ids), None)[6:])
                event["output_ids"].append(99)
                event["output_ids"].append(98)
                await resp.write(b"data: " + json.dumps(event).encode() + b"\n\n")
            case "error_event":
                await resp.write(b'data: {"error":{"message":"Duplicate request ID detected: x",'
                                 b'"type":"invalid_request_error","code":400,"retryable":false}}\n\n')
                await resp.write(b"data: [DONE]\n\n")
            case "hang":
                await resp.write(self._event(rid, ids, sent, len(ids), None))
                await asyncio.sleep(3600)
            case "drop":
                await resp.write(self._event(rid, ids, sent, len(ids), None))
                request_transport = resp._req.transport
                request_transport.close()
            case "no_done":
                await resp.write(self._event(rid, ids, sent, len(ids), None))
            case "no_finish":
                await resp.write(self._event(rid, ids, sent, len(ids), None))
                await resp.write(b"data: [DONE]\n\n")
            case "relabel":  # as /update_weight_version with a name that is no policy version
                self.version = "v7"
                return False
            case _:
                return False
        return True
