"""The MCP adapter lists and calls the tools of a real MCP server started over stdio."""

import asyncio
import sys
import threading
from pathlib import Path

import pytest
from tidal.envs.tools import TOOL_COUNTS, MCPStartError, MCPTool, ToolCall, parse_tool_call

SERVER = Path(__file__).with_name("mcp_server.py")


@pytest.fixture(scope="module")
def tool():
    with MCPTool(sys.executable, [str(SERVER)]) as tool:
        yield tool


def test_lists_the_servers_tools(tool):
    assert sorted(t.name for t in tool.tools) == ["add", "crash", "fail", "shout", "slow"]
    add = next(t for t in tool.tools if t.name == "add")
    assert add.description == "Add two integers."
    assert add.input_schema["required"] == ["a", "b"]
    assert '"name": "add"' in tool.instruction()


def test_calls_a_tool_in_both_call_formats(tool):
    call, cut = tool.parse('x <tool_call><tool_name>add</tool_name><arguments>{"a": 2, "b": 40}</arguments></tool_call> y')
    assert cut.endswith("</tool_call>") and tool.run(call) == "42"
    call, _ = tool.parse('<tool_call>{"name": "shout", "arguments": {"text": "hi"}}</tool_call>')
    assert tool.run(call) == "HI"


async def test_arun_awaits_many_calls_holding_no_thread(tool):
    assert await tool.arun(ToolCall("add", {"a": 1, "b": 1})) == "2"
    threads = threading.active_count()
    calls = [asyncio.create_task(tool.arun(ToolCall("slow", {"seconds": 0.5}))) for _ in range(16)]
    await asyncio.sleep(0.2)
    in_flight = threading.active_count()
    assert await asyncio.gather(*calls) == ["woke up"] * 16
    assert in_flight <= threads + 1  # to_thread per call would have added up to 16


def test_errors_come_back_as_observations(tool):
    before = TOOL_COUNTS.copy()
    assert "reported an error" in tool.run(ToolCall("fail", {"reason": "nope"}))
    assert "reported an error" in tool.run(ToolCall("add", {"a": "x"}))
    assert "'missing' not found; available tools: add, shout, slow, crash, fail" in tool.run(ToolCall("missing", {}))
    bad, _ = parse_tool_call("<tool_call><tool_name>add</tool_name><arguments>{oops</arguments></tool_call>")
    assert bad.error is not None and "not valid JSON" in tool.run(bad)
    listed, _ = parse_tool_call('<tool_call>{"name": "add", "arguments": [1, 2]}</tool_call>')
    assert "must be a JSON object" in tool.run(listed)
    assert TOOL_COUNTS["mcp_errors"] - before["mcp_errors"] == TOOL_COUNTS["mcp_calls"] - before["mcp_calls"] == 5
    assert parse_tool_call("no call here") is None


def test_a_call_that_outlives_its_timeout_is_reported_and_the_session_goes_on(tool):
    tool.call_timeout_s = 0.5
    try:
        assert tool.run(ToolCall("slow", {"seconds": 10})) == "[tool call error: 'slow' did not answer within 0.5 s]"
    finally:
        tool.call_timeout_s = 30.0
    assert tool.run(ToolCall("add", {"a": 1, "b": 2})) == "3"


def test_a_server_that_dies_mid_episode_is_an_observation_not_a_hang():
    with MCPTool(sys.executable, [str(SERVER)]) as tool:
        assert tool.run(ToolCall("add", {"a": 1, "b": 2})) == "3"
        assert "failed: MCPError" in tool.run(ToolCall("crash", {}))
        assert "failed: MCPError" in tool.run(ToolCall("add", {"a": 1, "b": 2}))


def test_a_server_that_dies_at_start_is_a_clear_error():
    with pytest.raises(MCPStartError, match="failed to start"):
        MCPTool(sys.executable, ["-c", "raise SystemExit(1)"], start_timeout_s=20)


def test_calls_and_replies_over_the_size_caps_are_refused_naming_the_cap(tool):
    tool.max_request_bytes, tool.max_response_bytes = 64, 8
    before = TOOL_COUNTS.copy()
    try:
        assert tool.run(ToolCall("shout", {"text": "x" * 100})) == (
            "[tool call error: the arguments of 'shout' are 112 bytes, over the tool's max_request_bytes (64); "
            "not sent]")
        assert tool.run(ToolCall("shout", {"text": "nine char"})) == (
            "[tool call error: 'shout' answered 9 bytes, over the tool's max_response_bytes (8); refused]")
        assert tool.run(ToolCall("shout", {"text": "eight ch"})) == "EIGHT CH"  # at the cap: fine
    finally:
        tool.max_request_bytes, tool.max_response_bytes = 1 << 20, 1 << 20
    assert TOOL_COUNTS["mcp_too_large"] - before["mcp_too_large"] == 2
    assert TOOL_COUNTS["mcp_errors"] - before["mcp_errors"] == 2
    with pytest.raises(ValueError, match="max_response_bytes = 0"):
        MCPTool(sys.executable, [str(SERVER)], max_response_bytes=0)
