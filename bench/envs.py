"""`tidal bench envs`: env steps per second under asyncio concurrency, against direct calls and GEM.

Cases, all in one run:
- every registered env (`envs.list()`, so suites added later are measured too) at 1, 64 and 1024
  concurrent asyncio episodes, each driven by its env's random policy (`sample_action`);
- on GEM's `game:GuessTheNumber-v0-easy` with 1024 envs and one random action list shared by all
  drivers: a direct synchronous loop, GEM's SyncVectorEnv, GEM's AsyncVectorEnv (a thread pool),
  and our `gem:` adapter under 1024 asyncio episodes; and the same direct-vs-asyncio pair for our
  own `games:GuessTheNumber-v0`.
An asyncio episode yields to the loop once per step (`sleep(0)`), as it does in the engine while it
awaits the model, so "1024 concurrent" means 1024 interleaved episodes, not one run to the end.
GEM baselines run first, before the adapter touches GEM's modules (see envs/adapters/gem.py).

summary: `overhead_vs_direct` = direct steps/s / adapter steps/s at 1024 (target <= 1.5);
`vs_gem_async_1024` = adapter steps/s / GEM AsyncVectorEnv steps/s at 1024 (target >= 3).
"""

import asyncio
import importlib.util
import random
import time
from collections.abc import Callable

from rich.progress import Progress

import envs
from bench.report import bench_parser, emit
from envs.core import Env

__all__ = ["main"]

GEM_ID = "game:GuessTheNumber-v0-easy"
OUR_ID = "games:GuessTheNumber-v0"
CONCURRENCY = (1, 64, 1024)
VEC_ENVS = 1024


def _random_actions(n: int = 4096) -> list[str]:
    """The random policy of the GEM comparison: guesses in 1..10, the env's range, drawn once."""
    rng = random.Random(0)
    return [f"\\boxed{{{rng.randint(1, 10)}}}" for _ in range(n)]


async def _drive(make: Callable[[], Env], concurrency: int, seconds: float, actions: list[str] | None) -> dict:
    """Run `concurrency` episodes for `seconds`; each steps, resets when done, and yields per step."""
    pool = [make() for _ in range(concurrency)]
    for i, env in enumerate(pool):
        await env.areset(i)
    steps = episodes = errors = 0
    stop = False

    async def episode(i: int, env: Env) -> None:
        nonlocal steps, episodes, errors
        rng, k = random.Random(i), i
        while not stop:
            if actions is None:
                action = env.sample_action(rng)
            else:
                action, k = actions[k & 4095], k + 7
            try:
                _, _, terminated, truncated, _ = await env.astep(action)
            except Exception:  # counted, and the episode starts over, as the engine would do
                errors += 1
                terminated = True
            steps += 1
            if terminated or truncated:
                episodes += 1
                await env.areset()
            await asyncio.sleep(0)

    tasks = [asyncio.create_task(episode(i, env)) for i, env in enumerate(pool)]
    start = time.perf_counter()
    await asyncio.sleep(seconds)
    stop = True
    elapsed, done = time.perf_counter() - start, steps
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for env in pool:
        env.close()
    return {"steps_per_s": done / elapsed, "episodes": episodes, "errors": errors}


def _direct(pool: list, actions: list[str], seconds: float, reset: Callable) -> float:
    """A plain synchronous loop over `pool`: the floor any driver is measured against."""
    for i, env in enumerate(pool):
        reset(env, i)
    steps, k = 0, 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for env in pool:
            _, _, terminated, truncated, _ = env.step(actions[k & 4095])
            k += 7
            if terminated or truncated:
                reset(env, None)
        steps += len(pool)
    return steps / (time.perf_counter() - start)


def _gem_vector(async_mode: bool, actions: list[str], seconds: float) -> float:
    import gem

    vec = gem.make_vec([GEM_ID] * VEC_ENVS, async_mode=async_mode, seed=0)
    vec.reset(seed=0)
    steps, k = 0, 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        vec.step([actions[(k + i) & 4095] for i in range(VEC_ENVS)])
        k += 7
        steps += VEC_ENVS
    rate = steps / (time.perf_counter() - start)
    close = getattr(vec, "close", None)
    if close is not None:
        close()
    return rate


def _run_async(coro):
    if importlib.util.find_spec("uvloop") is not None:
        import uvloop

        return uvloop.run(coro)
    return asyncio.run(coro)


def main(argv: list[str]) -> int:
    parser = bench_parser("envs", __doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, help="measuring time per case (default 2, --quick 0.25)")
    args = parser.parse_args(argv)
    seconds = args.seconds or (0.25 if args.quick else 2.0)
    actions = _random_actions()
    have_gem = importlib.util.find_spec("gem") is not None
    ids = envs.list()
    results: list[dict] = []

    with Progress(transient=True) as progress:
        todo = len(ids) * len(CONCURRENCY) + (5 if have_gem else 2)
        bar = progress.add_task("bench envs", total=todo)

        def record(row: dict) -> None:
            results.append(row)
            progress.advance(bar)

        if have_gem:
            import gem

            pool = [gem.make(GEM_ID) for _ in range(VEC_ENVS)]
            rate = _direct(pool, actions, seconds, lambda e, s: e.reset(seed=s))
            record({"case": "gem_direct", "env": GEM_ID, "concurrency": VEC_ENVS, "steps_per_s": rate})
            for name, mode in (("gem_sync_vector", False), ("gem_async_vector", True)):
                rate = _gem_vector(mode, actions, seconds)
                record({"case": name, "env": GEM_ID, "concurrency": VEC_ENVS, "steps_per_s": rate})
            for c in (1, VEC_ENVS):
                row = _run_async(_drive(lambda: envs.make(f"gem:{GEM_ID}"), c, seconds, actions))
                record({"case": "tidal_gem_adapter", "env": f"gem:{GEM_ID}", "concurrency": c, **row})

        pool = [envs.make(OUR_ID) for _ in range(VEC_ENVS)]
        rate = _direct(pool, actions, seconds, lambda e, s: e.reset(s))
        record({"case": "direct", "env": OUR_ID, "concurrency": VEC_ENVS, "steps_per_s": rate})
        row = _run_async(_drive(lambda: envs.make(OUR_ID), VEC_ENVS, seconds, actions))
        record({"case": "tidal_asyncio_fixed_actions", "env": OUR_ID, "concurrency": VEC_ENVS, **row})

        for env_id in ids:
            blocking = envs.make(env_id).blocking
            for c in CONCURRENCY:
                row = _run_async(_drive(lambda env_id=env_id: envs.make(env_id), c, seconds, None))
                record({"case": "suite", "env": env_id, "concurrency": c, "blocking": blocking, **row})

    def rate(case: str, env: str, c: int = VEC_ENVS) -> float | None:
        return next((r["steps_per_s"] for r in results if (r["case"], r["env"], r["concurrency"]) == (case, env, c)), None)

    summary: dict = {}
    ours_gem = rate("tidal_gem_adapter", f"gem:{GEM_ID}")
    if have_gem and ours_gem:
        summary["overhead_vs_direct"] = rate("gem_direct", GEM_ID) / ours_gem
        summary["vs_gem_async_1024"] = ours_gem / rate("gem_async_vector", GEM_ID)
        summary["vs_gem_sync_1024"] = ours_gem / rate("gem_sync_vector", GEM_ID)
    summary["games_overhead_vs_direct"] = rate("direct", OUR_ID) / rate("tidal_asyncio_fixed_actions", OUR_ID)
    config = {"seconds_per_case": seconds, "concurrency": list(CONCURRENCY), "vector_envs": VEC_ENVS,
              "gem_env": GEM_ID, "gem_installed": have_gem, "envs": ids, "quick": args.quick}
    emit("envs", config, results, summary, args.json_out)
    return 0
