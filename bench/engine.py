"""`tidal bench engine`: the engine process's CPU per generated token and per turn, and the most episodes it holds.

Everything runs as the user runs it: `tidal serve --simulate` in its own process, `tidal engine` as a
child process (bench/engine_child.py), and a trainer stand-in over the real channels in this process
(bench/standin.py), which counts what it receives. The engine plays `synthetic:Turns-v0` (a fixed number
of turns, envs/synthetic.py) with the default chat agent, the tiny byte-level tokenizer and its chat
template (the server's token ids beyond that vocabulary decode to nothing, which costs the same).

CPU cases (`--fast` server, each response exactly `tokens` long, `concurrency` episodes in flight):
- `engine`, at 1 and at 16 tokens per stream event (the backend's `stream_interval`): the engine
  child's CPU time (utime + stime from /proc/PID/stat) from its `ready` event until the stand-in has
  received every trajectory, over the tokens generated and over the turns played. That is all of its
  work: admission, envs, chat template and tokenizer, HTTP streams, transcripts, trajectories, spool
  and sends;
- `floor`, the same number of concurrent /generate streams of the same lengths and the same growing
  prompts, read by a bare aiohttp + msgspec client in a child process measured the same way
  (bench/engine_floor.py), which only splits the SSE events and decodes them into token ids and
  logprobs: the parse floor any client pays;
- `turns`: the engine again with `turn_tokens`-token turns, so its CPU is the per-turn cost (request,
  template delta, env step, and a share of the per-episode trajectory, spool and send).
At 16 tokens per event the engine and floor cases run `repeats` times, alternating; the summary's figures
are the medians (each run is a row with its `run` number). Every case has a fresh server.

Concurrency (bench/engine_hold.py): engines with rollout.max_concurrent raised level by level against a
slow simulated server, until the engine's event-loop lag passes `LAG_LIMIT_MS`; each level's resident
memory (VmRSS) and lag while it holds that many episodes.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import uvloop
from tidal.bench.engine_child import EngineChild, engine_config, proc_cpu_s, tokenizer_dir
from tidal.bench.engine_hold import LAG_LIMIT_MS, HoldSizes, hold_levels
from tidal.bench.report import bench_parser, case, emit
from tidal.bench.standin import Standin
from tidal.engine.reference.launch import ReferenceServer

__all__ = ["main", "CpuSizes", "FULL", "QUICK"]

INTERVALS = (1, 16)
"""Tokens per stream event in the two `engine`/`floor` cases; the summary's figure is at 16."""


@dataclass(frozen=True)
class CpuSizes:
    episodes: int
    """Episodes per case; every one is received before the case ends."""
    concurrency: int
    """Episodes in flight (rollout.max_concurrent; the floor's concurrent streams)."""
    turns: int
    """Turns per episode (synthetic:Turns-v0's `turns`)."""
    tokens: int
    """Tokens per response in the `engine` and `floor` cases."""
    turn_tokens: int
    """Tokens per response in the `turns` case."""
    repeats: int = 1
    """Runs of the `engine` and `floor` cases at 16 tokens per event, alternating; the summary takes the
    median of each (one run's figure moves by 20-30% with how the two cores happen to be shared)."""
    group_size: int = 8


FULL = (CpuSizes(episodes=1024, concurrency=256, turns=3, tokens=256, turn_tokens=4, repeats=3),
        HoldSizes(levels=(1000, 2000, 5000, 10000, 20000), window_s=20.0, ramp_s=240.0))
QUICK = (CpuSizes(episodes=128, concurrency=64, turns=3, tokens=64, turn_tokens=4),
         HoldSizes(levels=(256, 1024), window_s=3.0, ramp_s=60.0))


# --- the floor and the engine, each a child process measured from outside -------------------------


def _floor(url: str, sizes: CpuSizes, tokens: int, interval: int) -> tuple[float, int]:
    """(CPU seconds, tokens read) of bench/engine_floor.py reading every episode's streams."""
    argv = [url, sizes.episodes, sizes.concurrency, sizes.turns, tokens, interval]
    proc = subprocess.Popen([sys.executable, "-m", "tidal.bench.engine_floor", *map(str, argv)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the parse floor failed to start (exit {proc.wait()})")
        cpu = proc_cpu_s(proc.pid)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        cpu = proc_cpu_s(proc.pid) - cpu
        if not line:
            raise RuntimeError(f"the parse floor failed (exit {proc.wait()})")
        proc.stdin.write("exit\n")
        proc.stdin.flush()
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return cpu, json.loads(line)["tokens"]


# --- the engine ------------------------------------------------------------------------------------


async def _engine(model: Path, url: str, work: Path, sizes: CpuSizes, tokens: int, interval: int) -> dict:
    """Run `episodes` episodes through a fresh engine child; its CPU over what the stand-in received."""
    n = sizes.episodes
    async with Standin(batch_size=n, group_size=sizes.group_size, max_staleness=0, auto_train=False,
                       keep=False) as trainer:  # a budget of exactly n episodes: the engine then idles
        cfg = engine_config(
            model, url, trainer.endpoints, work,
            tasks=[{"env": "synthetic:Turns-v0", "kwargs": {"turns": sizes.turns}}],
            backend={"stream_interval": interval, "max_connections": sizes.concurrency},
            agent={"max_new_tokens": tokens, "max_turns": sizes.turns},
            rollout={"group_size": sizes.group_size, "max_concurrent": sizes.concurrency},
            metrics={"every_s": 1.0})
        with EngineChild(work, cfg) as engine:
            await asyncio.to_thread(engine.start)
            cpu, wall = engine.cpu_s(), time.monotonic()
            while trainer.consumed < n:
                if not engine.alive():
                    raise RuntimeError(f"tidal engine exited with {engine.proc.returncode}:\n{engine.log()}")
                await asyncio.sleep(0.01)
            cpu, wall = engine.cpu_s() - cpu, time.monotonic() - wall
            rss = engine.rss_mib()
    if trainer.generated != n * sizes.turns * tokens or trainer.turns != n * sizes.turns:
        raise RuntimeError(f"engine: received {trainer.generated} tokens in {trainer.turns} turns, expected "
                           f"{n * sizes.turns * tokens} in {n * sizes.turns}")
    return {"cpu_s": cpu, "wall_s": wall, "tokens": trainer.generated, "turns": trainer.turns, "rss_mib": rss}


async def _cpu_cases(model: Path, work: Path, sizes: CpuSizes) -> list[dict]:
    """Each measured case gets a fresh simulated server: one server's CPU per token rose by a third
    over five cases in a row, and the engine's with it (a slower server puts fewer events in a read)."""
    args = ["--fast", "--incremental-streaming-output", "--set", "simulate.lengths=max_new_tokens",
            "--set", f"simulate.max_running={sizes.concurrency}", "--set", "simulate.vocab_size=512"]

    def server():
        return ReferenceServer(simulate=True, args=args)

    rows = []
    for interval in INTERVALS:
        for run in range(sizes.repeats if interval == INTERVALS[-1] else 1):
            name = f"{interval} token(s) per event" + (f", run {run + 1}" if run else "")
            with case("engine", f"engine, {name}"):
                async with server() as srv:
                    e = await _engine(model, srv.url, work / f"cpu-{interval}-{run}", sizes, sizes.tokens, interval)
            with case("engine", f"parse floor, {name}"):
                async with server() as srv:
                    floor_cpu, floor_tokens = await asyncio.to_thread(_floor, srv.url, sizes, sizes.tokens, interval)
            rows.append({**_row("engine", interval, sizes.tokens, e), "run": run})
            rows.append({"case": "floor", "tokens_per_event": interval, "tokens_per_turn": sizes.tokens,
                         "tokens": floor_tokens, "turns": sizes.episodes * sizes.turns,
                         "cpu_us_per_token": 1e6 * floor_cpu / floor_tokens,
                         "cpu_us_per_turn": 1e6 * floor_cpu / (sizes.episodes * sizes.turns), "run": run})
    with case("engine", f"engine, {sizes.turn_tokens}-token turns"):
        async with server() as srv:
            e = await _engine(model, srv.url, work / "cpu-turns", sizes, sizes.turn_tokens, INTERVALS[-1])
    rows.append(_row("turns", INTERVALS[-1], sizes.turn_tokens, e))
    return rows


def _row(name: str, interval: int, tokens: int, e: dict) -> dict:
    return {"case": name, "tokens_per_event": interval, "tokens_per_turn": tokens, "tokens": e["tokens"],
            "turns": e["turns"], "cpu_us_per_token": 1e6 * e["cpu_s"] / e["tokens"],
            "cpu_us_per_turn": 1e6 * e["cpu_s"] / e["turns"], "tokens_per_s": e["tokens"] / e["wall_s"],
            "rss_mib": e["rss_mib"]}


# --- the report ------------------------------------------------------------------------------------


def _summary(cpu: list[dict], hold: list[dict]) -> dict:
    """Per (case, tokens per event): the median over its runs (one run unless `repeats`)."""
    runs: dict[tuple[str, int], list[dict]] = {}
    for r in cpu:
        runs.setdefault((r["case"], r["tokens_per_event"]), []).append(r)
    at = {key: {"cpu_us_per_token": float(np.median([r["cpu_us_per_token"] for r in rs])),
                "cpu_us_per_turn": float(np.median([r["cpu_us_per_turn"] for r in rs]))} for key, rs in runs.items()}
    top = INTERVALS[-1]
    held = [r for r in hold if r["held"]]
    best = held[-1] if held else None
    return {
        "engine_cpu_us_per_token": at["engine", top]["cpu_us_per_token"],
        "vs_parse_floor": at["engine", top]["cpu_us_per_token"] / at["floor", top]["cpu_us_per_token"],
        "max_concurrent_episodes": best["episodes"] if best else 0,
        "rss_mib_at_max": best["rss_mib"] if best else 0.0,
        "engine_cpu_us_per_token_1": at["engine", 1]["cpu_us_per_token"],
        "vs_parse_floor_1": at["engine", 1]["cpu_us_per_token"] / at["floor", 1]["cpu_us_per_token"],
        "parse_floor_us_per_token": at["floor", top]["cpu_us_per_token"],
        "engine_cpu_us_per_turn": at["turns", top]["cpu_us_per_turn"],
        "loop_lag_p90_ms_at_max": best["loop_lag_p90_ms"] if best else 0.0,
    }


async def _run(quick: bool, work: Path) -> tuple[list[dict], list[dict]]:
    cpu_sizes, hold_sizes = QUICK if quick else FULL
    model = await asyncio.to_thread(tokenizer_dir, work / "model")
    cpu = await _cpu_cases(model, work, cpu_sizes)
    hold = await hold_levels(model, work, hold_sizes)
    return cpu, hold


def main(argv: list[str]) -> int:
    parser = bench_parser("engine", __doc__.splitlines()[0])
    args = parser.parse_args(argv)
    cpu_sizes, hold_sizes = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory(prefix="tidal-bench-engine-") as tmp:
        cpu, hold = uvloop.run(_run(args.quick, Path(tmp)))
    results = cpu + [{"case": "hold", **r} for r in hold]
    config = {"cpu": asdict(cpu_sizes), "hold": asdict(hold_sizes), "lag_limit_ms": LAG_LIMIT_MS,
              "intervals": list(INTERVALS), "env": "synthetic:Turns-v0", "agent": "chat",
              "cpu_server": "tidal serve --simulate --fast --incremental-streaming-output, lengths = max_new_tokens",
              "event_loop": "uvloop"}
    emit("engine", config, results, _summary(cpu, hold), args.json_out)
    return 0
