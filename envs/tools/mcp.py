"""Offer the tools of any MCP server to the agent, through the `mcp` package's client over stdio.

The server is a child process that lives as long as the tool. Its session runs on a private event
loop in one background thread, so the tool can be called from a blocking env on the offload pool,
from any event loop (`arun`), or from a script, and no caller's loop ever owns the connection.
A call is bounded by `call_timeout_s`; a tool error, an unknown tool or bad arguments come back as
an observation that says what was wrong, never as an exception into the episode.

Size caps: a call whose arguments encode to more than `max_request_bytes` (JSON) is not sent, and a
reply whose text is longer than `max_response_bytes` (UTF-8) does not reach the agent; either is an
observation naming the cap, counted in `TOOL_COUNTS["mcp_too_large"]` besides `mcp_errors`. The mcp
package reads the server's stdout a whole JSON-RPC line at a time, so the reply cap bounds what enters
an episode (its tokens, the trajectory), not the client's memory while that line is read.

Call format (GEM's MCPTool, plus the Hermes/Qwen JSON form that chat templates emit):
    <tool_call><tool_name>add</tool_name><arguments>{"a": 1}</arguments></tool_call>
    <tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>
"""

import asyncio
import json
import re
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

import msgspec
from tidal.envs.answers import clip
from tidal.envs.tools.counters import TOOL_COUNTS
from tidal.envs.tools.tags import first_tagged
from tidal.protocol.errors import TidalError

__all__ = ["MCPTool", "MCPStartError", "ToolCall", "ToolSpec", "parse_tool_call"]

MAX_REQUEST_BYTES = 1 << 20
"""Default cap on a call's arguments, JSON-encoded: far above any real call, below a runaway action."""
MAX_RESPONSE_BYTES = 1 << 20
"""Default cap on a reply's text: more than a context window holds, so more is a broken server."""

_GEM_CALL = re.compile(r"\s*<tool_name>([^<]+)</tool_name>\s*<arguments>(.*?)</arguments>\s*", re.DOTALL)
"""The inside of GEM's `<tool_call>` element."""


class ToolSpec(msgspec.Struct, frozen=True):
    """One tool the server offers, as `tools/list` describes it."""

    name: str
    description: str
    input_schema: dict[str, Any]


class ToolCall(msgspec.Struct, frozen=True):
    """A parsed call; `error` is set (and the call not made) when the arguments are not a JSON object."""

    name: str
    arguments: dict[str, Any]
    error: str | None = None


def parse_tool_call(action: str) -> tuple[ToolCall, str] | None:
    """The first tool call in `action` and the action cut just after it, or None if there is none.

    The first complete `<tool_call>...</tool_call>` element is the call (found in linear time, see
    tags.py); one that is neither format comes back as a ToolCall with `error` set.
    """
    tagged = first_tagged(action, "tool_call")
    if tagged is None:
        return None
    inner, cut = tagged[0], action[: tagged[2]]
    gem = _GEM_CALL.fullmatch(inner)
    if gem is not None:
        name, raw = gem.group(1).strip(), gem.group(2).strip() or "{}"
    elif inner.strip().startswith("{"):
        try:
            body = json.loads(inner)
        except json.JSONDecodeError as exc:
            return ToolCall("", {}, f"tool call is not valid JSON: {exc}"), cut
        if not isinstance(body, dict) or not isinstance(body.get("name"), str):
            return ToolCall("", {}, 'tool call needs a "name" string'), cut
        name, raw = body["name"], body.get("arguments", {})
    else:
        return ToolCall("", {}, "write <tool_name>NAME</tool_name><arguments>{...}</arguments> inside "
                                "<tool_call>, or a JSON object with \"name\" and \"arguments\""), cut
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            return ToolCall(name, {}, f"arguments of {clip(name)!r} are not valid JSON: {exc}"), cut
    if not isinstance(raw, dict):
        return ToolCall(name, {}, f"arguments of {clip(name)!r} must be a JSON object, got {type(raw).__name__}"), cut
    return ToolCall(name, raw), cut


class MCPStartError(TidalError, ConnectionError):
    """The MCP server could not be started or did not complete the handshake."""


def _describe(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"


class MCPTool:
    """The tools of one MCP server reached over stdio: `command args...` is the server to start.

    >>> tool = MCPTool("python", ["my_server.py"])     # doctest: +SKIP
    >>> tool.run(ToolCall("add", {"a": 2, "b": 3}))     # doctest: +SKIP
    '5'
    """

    name = "mcp"
    blocking = False
    """`arun` awaits the tool's own loop, so ToolUse never needs a thread for it (`run` does wait)."""

    def __init__(
        self,
        command: str,
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        call_timeout_s: float = 30.0,
        start_timeout_s: float = 60.0,
        max_request_bytes: int = MAX_REQUEST_BYTES,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
    ):
        if max_request_bytes < 1 or max_response_bytes < 1:
            raise ValueError(f"MCPTool caps must be >= 1 byte, got max_request_bytes = {max_request_bytes}, "
                             f"max_response_bytes = {max_response_bytes}")
        self.max_request_bytes, self.max_response_bytes = max_request_bytes, max_response_bytes
        try:
            from mcp import StdioServerParameters
        except ImportError:
            raise ImportError("the MCP tool needs the mcp package: pip install 'tidal[envs]'") from None
        self._params = StdioServerParameters(command=command, args=list(args), env=env, cwd=cwd)
        self.call_timeout_s = call_timeout_s
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tidal-mcp", daemon=True)
        self._thread.start()
        self._session: Any = None
        self._stop: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        ready: Future[list[ToolSpec]] = Future()
        self._owner = asyncio.run_coroutine_threadsafe(self._serve(ready), self._loop)
        try:
            self.tools: list[ToolSpec] = ready.result(timeout=start_timeout_s)
        except BaseException as exc:
            self.close()
            server = " ".join([command, *args])
            if isinstance(exc, TimeoutError):
                raise MCPStartError(f"MCP server `{server}` did not start within {start_timeout_s:g} s") from None
            raise MCPStartError(f"MCP server `{server}` failed to start: {_describe(exc)}") from exc

    async def _serve(self, ready: "Future[list[ToolSpec]]") -> None:
        """Own the connection: anyio's contexts must be entered and left by one task, this one."""
        from mcp import ClientSession, stdio_client

        self._stop = asyncio.Event()
        self._task = asyncio.current_task()
        try:
            async with stdio_client(self._params) as (read, write), ClientSession(read, write) as session:
                await session.initialize()
                listed = await session.list_tools()
                self._session = session
                ready.set_result([ToolSpec(t.name, t.description or "", dict(t.input_schema)) for t in listed.tools])
                await self._stop.wait()
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc)
            raise

    def instruction(self) -> str:
        specs = "\n".join(
            json.dumps({"type": "function", "function": {"name": t.name, "description": t.description,
                                                         "parameters": t.input_schema}})
            for t in self.tools
        )
        return (
            "You can call these tools:\n<tools>\n" + specs + "\n</tools>\nCall one as "
            "<tool_call><tool_name>NAME</tool_name><arguments>{JSON object}</arguments></tool_call>"
        )

    def parse(self, action: str) -> tuple[ToolCall, str] | None:
        return parse_tool_call(action)

    def run(self, call: ToolCall) -> str:
        """Make the call and return its text, or a message saying why it could not be made."""
        future = self._start(call)
        return self._count(*(future if isinstance(future, tuple) else future.result()))

    async def arun(self, call: ToolCall) -> str:
        """`run` for callers on an event loop: awaits the tool's loop, holding no thread."""
        future = self._start(call)
        return self._count(*(future if isinstance(future, tuple) else await asyncio.wrap_future(future)))

    def _start(self, call: ToolCall) -> "tuple[str, bool] | Future[tuple[str, bool]]":
        """The call scheduled on the tool's loop, or (message, False) when it cannot be made."""
        if call.error is not None:
            return f"[tool call error: {call.error}]", False
        known = [t.name for t in self.tools]
        if call.name not in known:
            return f"[tool call error: tool {clip(call.name)!r} not found; available tools: {', '.join(known)}]", False
        size = len(json.dumps(call.arguments).encode())
        if size > self.max_request_bytes:
            TOOL_COUNTS["mcp_too_large"] += 1
            return (f"[tool call error: the arguments of {call.name!r} are {size} bytes, over the tool's "
                    f"max_request_bytes ({self.max_request_bytes}); not sent]"), False
        try:
            return asyncio.run_coroutine_threadsafe(self._call(call), self._loop)
        except RuntimeError:  # the loop is closed: the tool was closed
            return f"[tool call error: the MCP tool is closed; {call.name!r} was not called]", False

    @staticmethod
    def _count(text: str, ok: bool) -> str:
        TOOL_COUNTS["mcp_calls"] += 1
        TOOL_COUNTS["mcp_errors"] += not ok
        return text

    async def _call(self, call: ToolCall) -> tuple[str, bool]:
        """Runs on the tool's loop; never raises: a timeout, an error reply or a dead server is text."""
        try:
            async with asyncio.timeout(self.call_timeout_s):
                result = await self._session.call_tool(call.name, call.arguments)
        except TimeoutError:
            return f"[tool call error: {call.name!r} did not answer within {self.call_timeout_s:g} s]", False
        except Exception as exc:  # a dead server or a broken reply: the agent sees it, the episode goes on
            return f"[tool call error: {call.name!r} failed: {type(exc).__name__}: {exc}]", False
        text = "\n".join(getattr(block, "text", f"[{block.type} content]") for block in result.content)
        size = len(text.encode())
        if size > self.max_response_bytes:
            TOOL_COUNTS["mcp_too_large"] += 1
            return (f"[tool call error: {call.name!r} answered {size} bytes, over the tool's max_response_bytes "
                    f"({self.max_response_bytes}); refused]"), False
        if result.is_error:
            return f"[tool {call.name!r} reported an error: {text}]", False
        return text, True

    async def _shutdown(self) -> None:
        """Let the owner leave its contexts (which ends the server process); cancel it if it hangs."""
        task = self._task
        if task is None or task.done():
            return
        if self._session is not None:
            self._stop.set()
        else:
            task.cancel()
        done, _ = await asyncio.wait({task}, timeout=15)
        if not done:
            task.cancel()
            await asyncio.wait({task}, timeout=5)

    def close(self) -> None:
        """Stop the server process and the background loop. Safe to call twice."""
        if self._loop.is_closed():
            return
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=30)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()

    def __enter__(self) -> "MCPTool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
