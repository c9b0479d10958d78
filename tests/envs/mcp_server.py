"""A tiny MCP server spoken to over stdio by tests/envs/test_tools_mcp.py."""

import os

import anyio
from mcp.server.mcpserver import MCPServer

app = MCPServer("tidal-test", log_level="CRITICAL")


@app.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@app.tool()
def shout(text: str) -> str:
    """Upper-case a text."""
    return text.upper()


@app.tool()
async def slow(seconds: float) -> str:
    """Sleeps, to show a call that outlives its timeout is reported, not waited on."""
    await anyio.sleep(seconds)
    return "woke up"


@app.tool()
def crash() -> str:
    """Kills the server process, to show a dead server is an observation, not a hang."""
    os._exit(3)


@app.tool()
def fail(reason: str) -> str:
    """Always raises, to show tool errors reach the agent as text."""
    raise ValueError(reason)


if __name__ == "__main__":
    app.run()
