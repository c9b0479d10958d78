"""How many concurrent episodes one engine process holds: `tidal bench engine`'s concurrency levels.

Per level N, a fresh `tidal serve --simulate` and a fresh engine child with rollout.max_concurrent = N.
The server is slow on purpose (every running sequence gets one token per `step_s`, no per-sequence
cost, no queue: max_running = N), so episodes stay in flight as agentic ones do: `turns` turns with
lognormal responses (median `length_median`, capped at `max_new_tokens`), streamed 16 tokens per event,
and an env whose every reset and step awaits a lognormal latency around `env_latency_s` with
observations of `obs_chars` characters. Once the engine reports N episodes in flight and as many
generation requests sent (its metrics JSONL: every episode has reset and reached the server, so the
admission burst of N resets, first renders and new connections is over; at 10,000 it lasts several
seconds), this waits `SETTLE_S` and then watches it for `window_s`: its event-loop lag, its resident
memory (VmRSS of /proc/PID/status, the peak of samples every half second), its CPU share, and the
share of the window its loop thread spent runnable but waiting for a CPU (other processes: the
server shares the machine, and on a busy one that wait shows up as lag too).

Loop lag: the engine's own `engine/loop_lag_ms` (the worst delay of a periodic wake-up in each metrics
period) where its JSONL has it; otherwise how late each metrics record came after its period (the same
measure taken from outside: the daemon writes a record after every `every_s` sleep). A level holds when
in-flight episodes reached N and the 90th percentile of those per-period worst lags stays within
`LAG_LIMIT_MS`; levels rise until one does not. The window falls in the episodes' first turns (all
start together), so contexts are a few hundred tokens: RSS per episode is mostly its fixed cost
(task, transcript, stream, env), and grows with the tokens an episode holds. Each connection is a file descriptor in both the engine
and the server, so the backend's connection pool is capped below the file limit (what exceeds it waits
for a connection, still in flight).
"""

from __future__ import annotations

import asyncio
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tidal.bench.engine_child import EngineChild, engine_config
from tidal.bench.report import case
from tidal.bench.standin import Standin
from tidal.engine.reference.launch import ReferenceServer

__all__ = ["HoldSizes", "hold_levels", "LAG_LIMIT_MS"]

LAG_LIMIT_MS = 50.0
"""Loop lag (90th percentile of per-period worst wake-up delays) beyond which a level does not hold."""
SETTLE_S = 2.0
"""Wait after the N episodes' first requests are out before the window opens."""
RESERVED_FDS = 512
"""File descriptors kept free of connections in each process (spool, sockets, libraries)."""
EVERY_S = 0.25
"""The engine's metrics period in these runs: one lag figure per period."""


@dataclass(frozen=True)
class HoldSizes:
    levels: tuple[int, ...]
    """rollout.max_concurrent of each level, rising."""
    window_s: float
    """How long each level is watched once it holds N episodes."""
    ramp_s: float
    """How long a level may take to reach N episodes in flight."""
    step_s: float = 0.2
    """The server's decode step: each stream gets a token every step_s (5 tokens/s)."""
    turns: int = 4
    length_median: float = 64.0
    max_new_tokens: int = 512
    env_latency_s: float = 1.0
    obs_chars: int = 256
    group_size: int = 8


def _file_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _lags(records: list[dict]) -> list[float]:
    """Per-period worst loop lag, ms: the engine's own probe, or the lateness of each record."""
    own = [r["engine/loop_lag_ms"] for r in records if r.get("engine/loop_lag_ms") is not None]
    if own:
        return own
    times = [r["time"] for r in records]
    return [max(0.0, 1e3 * (b - a - EVERY_S)) for a, b in zip(times, times[1:], strict=False)]


async def _level(model: Path, work: Path, sizes: HoldSizes, n: int) -> dict:
    connections = max(1, min(n, _file_limit() - RESERVED_FDS))
    args = ["--incremental-streaming-output", "--set", f"simulate.step_base_s={sizes.step_s}",
            "--set", "simulate.step_per_seq_s=0", "--set", "simulate.prefill_per_token_s=0",
            "--set", f"simulate.max_running={n}", "--set", f"simulate.length_median={sizes.length_median}",
            "--set", "simulate.vocab_size=512", "--set", f"server.max_queued_requests={max(n, 1024)}"]
    kwargs = {"turns": sizes.turns, "latency_s": sizes.env_latency_s, "obs_chars": sizes.obs_chars}
    async with ReferenceServer(simulate=True, args=args) as server, \
            Standin(batch_size=n, group_size=sizes.group_size, max_staleness=1, keep=False) as trainer:
        cfg = engine_config(model, server.url, trainer.endpoints, work,
                            tasks=[{"env": "synthetic:Turns-v0", "kwargs": kwargs}],
                            backend={"stream_interval": 16, "max_connections": connections},
                            agent={"max_new_tokens": sizes.max_new_tokens, "max_turns": sizes.turns},
                            rollout={"group_size": sizes.group_size, "max_concurrent": n},
                            metrics={"every_s": EVERY_S})
        with EngineChild(work, cfg) as engine:
            await asyncio.to_thread(engine.start)
            idle_rss = engine.rss_mib()
            start, in_flight, requests = time.monotonic(), 0, 0
            while time.monotonic() - start < sizes.ramp_s and (in_flight < n or requests < n):
                if not engine.alive():
                    raise RuntimeError(f"tidal engine exited with {engine.proc.returncode}:\n{engine.log()}")
                rows = engine.metrics()
                if rows:
                    in_flight, requests = int(rows[-1]["engine/episodes_in_flight"]), int(rows[-1]["engine/requests"])
                await asyncio.sleep(0.2)
            ramp = time.monotonic() - start
            await asyncio.sleep(SETTLE_S)
            seen, cpu, t0, waited = len(engine.metrics()), engine.cpu_s(), time.monotonic(), engine.runqueue_wait_s()
            rss = engine.rss_mib()
            while time.monotonic() - t0 < sizes.window_s:
                await asyncio.sleep(0.5)
                rss = max(rss, engine.rss_mib())
            cpu, wall, waited = engine.cpu_s() - cpu, time.monotonic() - t0, engine.runqueue_wait_s() - waited
            window = engine.metrics()[seen:]
    lags = _lags(window) or [0.0]
    flight = [r["engine/episodes_in_flight"] for r in window] or [0]
    tokens = window[-1]["engine/tokens"] - window[0]["engine/tokens"] if len(window) > 1 else 0.0
    span = window[-1]["time"] - window[0]["time"] if len(window) > 1 else 1.0
    p90 = float(np.percentile(lags, 90))
    reached = in_flight >= n
    return {
        "episodes": n, "reached": reached, "in_flight_mean": float(np.mean(flight)), "rss_mib": rss,
        "kib_per_episode": 1024 * (rss - idle_rss) / n, "loop_lag_p50_ms": float(np.percentile(lags, 50)),
        "loop_lag_p90_ms": p90, "loop_lag_max_ms": max(lags), "engine_cpu_share": cpu / wall,
        "runqueue_wait_share": waited / wall, "tokens_per_s": tokens / span, "held": reached and p90 <= LAG_LIMIT_MS,
        "connections": connections, "ramp_s": ramp, "idle_rss_mib": idle_rss, "delivered": trainer.consumed,
        "lag_source": "engine/loop_lag_ms" if any("engine/loop_lag_ms" in r for r in window) else "record gaps",
    }


async def hold_levels(model: Path, work: Path, sizes: HoldSizes) -> list[dict]:
    """Every level up to and including the first that does not hold."""
    rows = []
    for n in sizes.levels:
        with case("engine", f"holding {n} concurrent episodes"):
            row = await _level(model, work / f"hold-{n}", sizes, n)
        rows.append(row)
        if not row["held"]:
            break
    return rows
