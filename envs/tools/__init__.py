"""Tools an agent can call from inside an episode: sandboxed Python, search (local BM25 or a GEM
retrieval server), any MCP server.

Each tool has a `name`, says whether running it `blocking`ly waits on a process, and speaks three
methods: `instruction()` (the text that teaches the call format), `parse(action)` (the call found in
the action and the action cut just after it, or None) and `run(call)` (the observation text; a tool
error is text the agent reads, never an exception, and is counted in `TOOL_COUNTS`).
"""

from tidal.envs.tools.counters import TOOL_COUNTS
from tidal.envs.tools.mcp import MCPStartError, MCPTool, ToolCall, ToolSpec, parse_tool_call
from tidal.envs.tools.python import (
    ExecResult,
    PythonTool,
    SandboxLimits,
    extract_code,
    network_isolation,
    run_python,
)
from tidal.envs.tools.search import (
    Document,
    RemoteSearchIndex,
    SearchError,
    SearchIndex,
    SearchTool,
    load_corpus,
)

__all__ = [
    "Document",
    "ExecResult",
    "MCPStartError",
    "MCPTool",
    "PythonTool",
    "RemoteSearchIndex",
    "SandboxLimits",
    "SearchError",
    "SearchIndex",
    "SearchTool",
    "TOOL_COUNTS",
    "ToolCall",
    "ToolSpec",
    "extract_code",
    "load_corpus",
    "network_isolation",
    "parse_tool_call",
    "run_python",
]
