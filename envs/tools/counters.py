"""Counts of what the tools did, for the engine's metrics (JSONL and Prometheus, under `envs/tools/`).

A tool never raises into an episode: a timeout, a killed program, a failed MCP call or an
unreachable retrieval server becomes an observation. These counters are how such events are still
seen. Keys (each a running total since start):
- `python_runs`, `python_timeouts`, `python_killed` (ended by a signal other than the timeout),
  `python_truncated` (output cut to the limit);
- `mcp_calls`, `mcp_errors` (bad call, unknown tool, tool error, timeout, dead server, over a cap),
  `mcp_too_large` (arguments over `max_request_bytes` not sent, a reply over `max_response_bytes` refused);
- `search_queries`, `search_errors` (a remote retrieval server failed, or a size cap refused),
  `search_too_large` (a query over `max_request_bytes` not sent, a reply over `max_response_bytes` refused).
"""

from collections import Counter

__all__ = ["TOOL_COUNTS"]

TOOL_COUNTS: Counter[str] = Counter()
