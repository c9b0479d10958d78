"""`tidal bench async-vs-sync`: wall-clock per trained batch with the engine asynchronous vs synchronous.

The same workload in both modes, with the real engine (a `tidal engine` child process), one
`tidal serve --simulate` (its continuous-batching cost model, H100 + 7B defaults, engine/reference/
simulate.py) and a trainer stand-in over the real channels (bench/standin.py) whose step takes a
fixed time per trained token:
- `sync`: rollout.mode = "sync", the stand-in's max_staleness 0: a whole batch is generated under one
  version, handed over, trained, and the next starts once the server serves the new version;
- `async`: rollout.mode = "async" with max_staleness `staleness`: episodes keep starting within the
  staleness budget while the trainer trains and the weights update mid-rollout.

Default workload: `groups` x `group_size` = 64 x 8 episodes per batch, 3 turns per episode of
synthetic:Turns-v0, responses lognormal with median 256 tokens (sigma 1.0) capped at 4096 (the tail),
every env reset and step awaiting a lognormal latency around 50 ms, 16 tokens per stream event,
rollout.max_concurrent = two batches in both modes (sync never has more than one in flight). The trainer's time per batch is `train_fraction`
(0.8) of the time the server needs to generate a batch at full occupancy, from the cost model:

    t_gen   = E[tokens generated per batch] x step(max_running) / max_running + prefill per batch
    t_train = train_fraction x t_gen, spread over the expected tokens of a batch (per-token cost)

where step(B) = step_base_s + step_per_seq_s x B. `ideal_speedup` is the measured sync time per batch
over max(t_gen, t_train): what a pipeline that keeps the server full would reach.

Server utilisation is busy slots over capacity in the measured window, from the server's decode-step
batch-size histogram (/server_info): sum over steps of B x step(B), over max_running x wall seconds.
`throughput_fraction` is generated tokens per second over max_running / step(max_running);
`prefill_share` the simulated GPU's prefill time over wall time; `server_runqueue_wait_share` the
share of the window the server's event-loop thread waited for a CPU (on a shared machine the simulated
GPU idles while its scheduler cannot run: time neither mode's engine can win back). The engine's default pause_mode,
in_place, keeps the server's KV and prefix cache across a weight update; `--pause-mode retract`
drops and flushes them, as SGLang does, so every episode in flight prefills its whole context again:
with one update per batch that is most of `prefill_share` in async mode.
The sync window starts at the first admitted episode; the async one after `warmup` batches.
"""

from __future__ import annotations

import asyncio
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import aiohttp
import uvloop
from tidal.bench.engine_child import EngineChild, engine_config, proc_runqueue_wait_s, tokenizer_dir
from tidal.bench.report import bench_parser, case, emit
from tidal.bench.standin import Standin
from tidal.engine.chat import ChatTokenizer
from tidal.engine.reference.launch import ReferenceServer
from tidal.engine.reference.simulate import SimulateConfig

__all__ = ["main", "Workload", "FULL", "QUICK", "cost_model"]

_SIM = SimulateConfig()


@dataclass(frozen=True)
class Workload:
    groups: int = 64
    group_size: int = 8
    turns: int = 3
    length_median: float = 256.0
    length_sigma: float = 1.0
    max_new_tokens: int = 4096
    env_latency_s: float = 0.05
    env_latency_sigma: float = 0.5
    obs_chars: int = 64
    staleness: int = 4
    """The async mode's max_staleness (sync is 0)."""
    train_fraction: float = 0.8
    concurrency: int = 2
    """rollout.max_concurrent in batches (both modes; sync never has more than one batch in flight).
    Admission counts a group until its last member ends, so the long tail holds slots: one batch
    in flight keeps fewer than that many episodes generating."""
    stream_interval: int = 16
    sync_batches: int = 2
    """Sync batches measured (from the first admitted episode)."""
    async_batches: int = 3
    """Async batches measured, after `warmup`."""
    warmup: int = 1
    step_base_s: float = _SIM.step_base_s
    step_per_seq_s: float = _SIM.step_per_seq_s
    prefill_per_token_s: float = _SIM.prefill_per_token_s
    max_running: int = _SIM.max_running
    prefix_cache_tokens: int = _SIM.prefix_cache_tokens
    pause_mode: str = "in_place"
    """The backend's pause_mode around weight updates (the engine's default, in_place, keeps the
    server's KV and prefix cache; retract flushes them at every update, so everything in flight
    prefills again)."""

    @property
    def batch(self) -> int:
        return self.groups * self.group_size

    def step_s(self, running: int) -> float:
        return self.step_base_s + self.step_per_seq_s * running


FULL = Workload()
QUICK = Workload(groups=4, group_size=4, turns=2, length_median=32.0, max_new_tokens=256, env_latency_s=0.01,
                 staleness=2, sync_batches=3, async_batches=4, step_base_s=0.002, step_per_seq_s=0.00025,
                 prefill_per_token_s=0.00001, max_running=8)


def _phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def mean_length(median: float, sigma: float, cap: int) -> float:
    """E[min(ceil(X), cap)] for X lognormal (median, sigma): the simulator's mean response length."""
    mu = math.log(median)
    if sigma == 0:
        return float(min(math.ceil(median), cap))
    z = (math.log(cap) - mu) / sigma
    capped = math.exp(mu + sigma**2 / 2) * _phi(z - sigma) + cap * (1 - _phi(z))
    return min(capped + 0.5, float(cap))  # ceil adds half a token on average


def cost_model(w: Workload, prompt_tokens: int, observation_tokens: int) -> dict:
    """What the server needs per batch at full occupancy, and the trainer's time per batch and per token."""
    length = mean_length(w.length_median, w.length_sigma, w.max_new_tokens)
    generated = w.batch * w.turns * length
    prefill = w.batch * (prompt_tokens + (w.turns - 1) * observation_tokens)  # later turns hit the prefix cache
    full_step = w.step_s(w.max_running)
    t_gen = generated * full_step / w.max_running + w.prefill_per_token_s * prefill
    t_train = w.train_fraction * t_gen
    tokens = generated + prefill  # every token of the batch's trajectories
    return {"mean_response_tokens": length, "generated_tokens_per_batch": generated,
            "prefill_tokens_per_batch": prefill, "tokens_per_batch": tokens,
            "full_occupancy_tokens_per_s": w.max_running / full_step, "gen_s_per_batch": t_gen,
            "train_s_per_batch": t_train, "train_s_per_token": t_train / tokens}


def _prompt_sizes(model: Path, w: Workload) -> tuple[int, int]:
    """Tokens of the first prompt and of one observation's delta, as the engine's chat layer renders them."""
    tok = ChatTokenizer.load(model)
    obs = "x" * w.obs_chars
    first = len(tok.encode(tok.render([{"role": "user", "content": obs}], add_generation_prompt=True)))
    two = tok.render([{"role": "user", "content": obs}, {"role": "assistant", "content": ""},
                      {"role": "user", "content": obs}], add_generation_prompt=True)
    one = tok.render([{"role": "user", "content": obs}, {"role": "assistant", "content": ""}],
                     add_generation_prompt=False)
    return first, len(tok.encode(two)) - len(tok.encode(one))


async def _server_state(url: str) -> tuple[float, dict]:
    async with aiohttp.ClientSession() as session, session.get(url + "/server_info") as resp:
        info = await resp.json()
    return time.monotonic(), info["internal_states"][0]


def _utilization(w: Workload, a: tuple[float, dict], b: tuple[float, dict]) -> dict:
    (t0, s0), (t1, s1) = a, b
    h0, h1 = s0["batch_size_histogram"], s1["batch_size_histogram"]
    slot_s = sum(int(k) * (n - h0.get(k, 0)) * w.step_s(int(k)) for k, n in h1.items())
    decode_s = sum((n - h0.get(k, 0)) * w.step_s(int(k)) for k, n in h1.items())
    wall = t1 - t0
    tokens = s1["num_generated_tokens"] - s0["num_generated_tokens"]
    busy = s1["sim_gpu_busy_s"] - s0["sim_gpu_busy_s"]
    lookups = s1.get("prefix_cache_lookups", 0) - s0.get("prefix_cache_lookups", 0)
    hits = s1.get("prefix_cache_hit_tokens", 0) - s0.get("prefix_cache_hit_tokens", 0)
    return {"utilization": slot_s / (w.max_running * wall),
            "throughput_fraction": tokens / wall / (w.max_running / w.step_s(w.max_running)),
            "gpu_busy_fraction": busy / wall, "prefill_share": (busy - decode_s) / wall,
            "cached_tokens_per_request": hits / max(lookups, 1), "tokens_per_s": tokens / wall}


async def _mode(mode: str, model: Path, work: Path, w: Workload, train_s_per_token: float) -> dict:
    staleness = 0 if mode == "sync" else w.staleness
    warmup, batches = (0, w.sync_batches) if mode == "sync" else (w.warmup, w.async_batches)
    args = ["--incremental-streaming-output", "--set", f"simulate.step_base_s={w.step_base_s}",
            "--set", f"simulate.step_per_seq_s={w.step_per_seq_s}",
            "--set", f"simulate.prefill_per_token_s={w.prefill_per_token_s}",
            "--set", f"simulate.max_running={w.max_running}", "--set", f"simulate.length_median={w.length_median}",
            "--set", f"simulate.length_sigma={w.length_sigma}", "--set", "simulate.vocab_size=512",
            "--set", f"simulate.prefix_cache_tokens={w.prefix_cache_tokens}"]
    env = {"turns": w.turns, "latency_s": w.env_latency_s, "latency_sigma": w.env_latency_sigma,
           "obs_chars": w.obs_chars}
    async with ReferenceServer(simulate=True, args=args) as server, \
            Standin(batch_size=w.batch, group_size=w.group_size, max_staleness=staleness, weights_path=str(model),
                    train_s_per_token=train_s_per_token, keep=False) as trainer:
        cfg = engine_config(model, server.url, trainer.endpoints, work,
                            tasks=[{"env": "synthetic:Turns-v0", "kwargs": env}],
                            backend={"stream_interval": w.stream_interval, "pause_mode": w.pause_mode,
                                     "max_connections": max(w.concurrency * w.batch, 64)},
                            agent={"max_turns": w.turns, "max_new_tokens": w.max_new_tokens},
                            rollout={"group_size": w.group_size, "max_concurrent": w.concurrency * w.batch,
                                     "mode": mode},
                            metrics={"every_s": 1.0})
        with EngineChild(work, cfg) as engine:
            await asyncio.to_thread(engine.start)
            start = None
            while len(trainer.batch_times) < warmup + batches:
                if not engine.alive():
                    raise RuntimeError(f"tidal engine exited with {engine.proc.returncode}:\n{engine.log()}")
                if start is None and (trainer.started() > 0 if warmup == 0 else len(trainer.batch_times) >= warmup):
                    start = await _server_state(server.url), engine.cpu_s(), proc_runqueue_wait_s(server.pid)
                await asyncio.sleep(0.05)
            end = await _server_state(server.url), engine.cpu_s(), proc_runqueue_wait_s(server.pid)
    t0 = start[0][0] if warmup == 0 else trainer.batch_times[warmup - 1]
    seconds = (trainer.batch_times[warmup + batches - 1] - t0) / batches
    return {"mode": mode, "max_staleness": staleness, "batches": batches, "seconds_per_batch": seconds,
            **_utilization(w, start[0], end[0]), "engine_cpu_share": (end[1] - start[1]) / (end[0][0] - start[0][0]),
            "server_runqueue_wait_share": (end[2] - start[2]) / (end[0][0] - start[0][0]),
            "train_s_per_batch": sum(trainer.train_seconds[warmup:warmup + batches]) / batches,
            "stale": trainer.stale, "violations": len(trainer.violations)}


async def _run(w: Workload, work: Path) -> tuple[dict, list[dict]]:
    model = await asyncio.to_thread(tokenizer_dir, work / "model")
    model_costs = cost_model(w, *_prompt_sizes(model, w))
    rows = []
    for mode in ("sync", "async"):
        with case("async-vs-sync", f"{mode} ({w.batch} episodes per batch)"):
            rows.append(await _mode(mode, model, work / mode, w, model_costs["train_s_per_token"]))
    return model_costs, rows


def _parser():
    p = bench_parser("async-vs-sync", __doc__.splitlines()[0])
    d = FULL
    p.add_argument("--groups", type=int, help=f"groups per batch (default {d.groups}; --quick {QUICK.groups})")
    p.add_argument("--group-size", type=int, help=f"episodes per group (default {d.group_size})")
    p.add_argument("--turns", type=int, help=f"turns per episode (default {d.turns})")
    p.add_argument("--length-median", type=float, help=f"median response tokens (default {d.length_median:g})")
    p.add_argument("--length-sigma", type=float, help=f"sigma of log(response tokens) (default {d.length_sigma:g})")
    p.add_argument("--max-new-tokens", type=int, help=f"response cap, the tail (default {d.max_new_tokens})")
    p.add_argument("--env-latency", dest="env_latency_s", type=float,
                   help=f"median env step latency, s (default {d.env_latency_s:g})")
    p.add_argument("--staleness", type=int, help=f"async max_staleness (default {d.staleness})")
    p.add_argument("--train-fraction", type=float,
                   help=f"trainer time per batch over generation time at full occupancy (default {d.train_fraction:g})")
    p.add_argument("--concurrency", type=int, help=f"rollout.max_concurrent in batches (default {d.concurrency})")
    p.add_argument("--pause-mode", choices=("retract", "in_place"),
                   help="the backend's pause_mode around weight updates (default in_place, the engine's: it "
                        "keeps the KV and prefix cache; retract flushes them, so what is in flight prefills again)")
    p.add_argument("--max-running", type=int, help=f"server batch slots (default {d.max_running})")
    p.add_argument("--sync-batches", type=int, help=f"sync batches measured (default {d.sync_batches})")
    p.add_argument("--async-batches", type=int, help=f"async batches measured after warm-up (default {d.async_batches})")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    options = {k: v for k, v in vars(args).items() if k not in ("json_out", "quick") and v is not None}
    w = replace(QUICK if args.quick else FULL, **options)
    if min(w.batch, w.turns, w.sync_batches, w.async_batches, w.concurrency, w.max_running) < 1 or w.staleness < 0:
        print("tidal bench async-vs-sync: --groups, --group-size, --turns, --concurrency, --max-running and the "
              "batch counts must be >= 1, --staleness >= 0", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="tidal-bench-async-") as tmp:
        costs, rows = uvloop.run(_run(w, Path(tmp)))
    at = {r["mode"]: r for r in rows}
    speedup = at["sync"]["seconds_per_batch"] / at["async"]["seconds_per_batch"]
    ideal = at["sync"]["seconds_per_batch"] / max(costs["gen_s_per_batch"], costs["train_s_per_batch"])
    summary = {"speedup": speedup, "ideal_speedup": ideal, "fraction_of_ideal": speedup / ideal,
               "async_utilization": at["async"]["utilization"], "sync_utilization": at["sync"]["utilization"],
               "sync_s_per_batch": at["sync"]["seconds_per_batch"], "async_s_per_batch": at["async"]["seconds_per_batch"],
               "model_gen_s_per_batch": costs["gen_s_per_batch"], "model_train_s_per_batch": costs["train_s_per_batch"]}
    config = {"workload": {**asdict(w), "batch": w.batch}, "cost_model": costs,
              "server": "tidal serve --simulate --incremental-streaming-output", "env": "synthetic:Turns-v0"}
    emit("async-vs-sync", config, rows, summary, args.json_out)
    return 0
