"""The gem: adapter, with real gem-llm envs: same episodes as plain GEM, RNG isolated, tools work."""

import asyncio
import json
import random
import subprocess
import sys

import pytest

pytest.importorskip("gem")

from tidal import envs  # noqa: E402

GAME = "game:GuessTheNumber-v0-hard"
SCRIPT = ["\\boxed{25}", "\\boxed{12}", "\\boxed{37}", "\\boxed{6}", "\\boxed{44}", "\\boxed{3}", "\\boxed{48}"]


def transcript(env, seed, actions):
    out = [env.reset(seed)[0]]
    for a in actions:
        obs, reward, terminated, truncated, _ = env.step(a)
        out.append([obs, reward, terminated, truncated])
        if terminated or truncated:
            break
    return out


def test_same_episodes_as_plain_gem_in_a_fresh_process():
    code = f"""
import json, gem
env = gem.make({GAME!r})
out = []
for seed in (0, 1, 2):
    t = [env.reset(seed=seed)[0]]
    for a in {SCRIPT!r}:
        obs, r, te, tr, _ = env.step(a)
        t.append([obs, float(r), bool(te), bool(tr)])
        if te or tr:
            break
    out.append(t)
print(json.dumps(out))
"""
    plain = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    env = envs.make(f"gem:{GAME}")
    assert not env.blocking  # a GEM game is cheap: called inline
    ours = [transcript(env, seed, SCRIPT) for seed in (0, 1, 2)]
    assert ours == plain
    assert len({json.dumps(t) for t in ours}) == 3


@pytest.mark.parametrize("blocking", [False, True], ids=["inline", "offloaded-to-threads"])
async def test_interleaved_episodes_equal_sequential_ones(blocking):
    ids = ["game:GuessTheNumber-v0-hard", "game:Mastermind-v0-easy", "game:Minesweeper-v0-easy"]

    def policy_for(seed):
        rng = random.Random(seed)
        env_for_actions = envs.make(f"gem:{ids[seed % 3]}")
        return lambda obs: env_for_actions.sample_action(rng)

    sequential = []
    for seed in range(9):
        env = envs.make(f"gem:{ids[seed % 3]}")
        sequential.append(await envs.run_episode(env, policy_for(seed), seed=seed, max_turns=6))

    async def one(seed):
        env = envs.make(f"gem:{ids[seed % 3]}", blocking=blocking)
        policy = policy_for(seed)

        async def yielding(obs):
            await asyncio.sleep(0)  # hand the loop to the other episodes between every step
            return policy(obs)

        return await envs.run_episode(env, yielding, seed=seed, max_turns=6)

    random.seed(999)
    interleaved = await asyncio.gather(*(one(s) for s in range(9)))
    for a, b in zip(sequential, interleaved, strict=True):
        assert (a.observations, a.actions, a.rewards) == (b.observations, b.actions, b.rewards)
    assert len({tuple(e.observations) for e in sequential}) == 9


def test_global_rng_is_left_alone():
    env = envs.make(f"gem:{GAME}")
    random.seed(42)
    expected = [random.random() for _ in range(3)]
    random.seed(42)
    got = [random.random()]
    env.reset(7)
    env.step(env.sample_action(random.Random(1)))
    got += [random.random(), random.random()]
    assert got == expected


def test_reasoning_gym_env_scores_the_right_answer():
    env = envs.make("gem:rg:basic_arithmetic")
    question, _ = env.reset(3)
    answer = env.gem_env.data["answer"]
    assert question and env.step(f"so \\boxed{{{answer}}}")[1:4] == (1.0, True, True)
    env.reset(3)
    assert env.step("\\boxed{not a number}")[1] == 0.0


async def test_gem_tool_wrapper_runs_unchanged_and_offloaded():
    env = envs.make("gem:game:GuessTheNumber-v0-easy", wrappers="python_tool_no_int_reward")
    assert env.blocking
    obs, _ = await env.areset(0)
    assert "<python>" in obs
    obs, reward, terminated, truncated, info = await env.astep("<python>print(2+3)</python>")
    assert "Code execution result: 5" in obs and info["use_tool"] and not terminated


def test_unknown_gem_id_names_it():
    with pytest.raises(ValueError, match="gem:game:NoSuchGame-v0"):
        envs.make("gem:game:NoSuchGame-v0")
    assert "gem:game:GuessTheNumber-v0-easy" in envs.list("gem")


async def test_inline_fast_path_keeps_broken_check_and_subclass_overrides():
    env = envs.make(f"gem:{GAME}")
    await env.areset(0)
    env.broken = "step timed out after 1s"
    with pytest.raises(envs.EnvBroken, match="step timed out"):
        await env.astep(SCRIPT[0])
    with pytest.raises(envs.EnvBroken, match="step timed out"):
        await env.areset(0)

    from tidal.envs.adapters.gem import GemEnv

    class Shouting(GemEnv):
        def step(self, action):
            obs, *rest = super().step(action)
            return (obs.upper(), *rest)

    shouting = Shouting(GAME)
    await shouting.areset(0)
    obs = (await shouting.astep(SCRIPT[0]))[0]
    assert obs == obs.upper() and "25" in obs


async def test_offloaded_thread_draws_from_its_own_env_while_the_loop_steps_others():
    """A blocking env resetting in a worker thread and inline envs resetting on the loop at once
    each see their own Random: the per-thread slot is not shared across threads."""
    seeds = range(6)
    expected = [envs.make(f"gem:{GAME}").reset(s)[0] for s in seeds]
    offloaded = [envs.make(f"gem:{GAME}", blocking=True) for _ in seeds]
    inline = [envs.make(f"gem:{GAME}") for _ in seeds]
    for _ in range(3):
        got = await asyncio.gather(*(e.areset(s) for e, s in zip(offloaded, seeds, strict=True)),
                                   *(e.areset(s) for e, s in zip(inline, seeds, strict=True)))
        assert [obs for obs, _ in got] == expected * 2


def test_marking_an_inline_env_blocking_gives_each_thread_its_own_rng():
    """In a fresh process the proxy starts as one slot (inline envs only); marking an env blocking
    after it was built switches to one slot per thread before the env can run in a worker thread."""
    code = f"""
import asyncio, json
from tidal import envs
from tidal.envs.adapters import gem as adapter

async def main():
    seeds = range(6)
    expected = [envs.make("gem:{GAME}").reset(s)[0] for s in seeds]
    assert type(adapter._proxy).__name__ == "_RandomProxy"
    offloaded = [envs.make("gem:{GAME}") for _ in seeds]
    for env in offloaded:
        env.blocking = True
    assert type(adapter._proxy).__name__ == "_ThreadRandomProxy"
    inline = [envs.make("gem:{GAME}") for _ in seeds]
    ok = True
    for _ in range(3):
        got = await asyncio.gather(*(e.areset(s) for e, s in zip(offloaded, seeds)),
                                   *(e.areset(s) for e, s in zip(inline, seeds)))
        ok = ok and [obs for obs, _ in got] == expected * 2
    print(json.dumps(ok))

asyncio.run(main())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) is True


async def test_inline_calls_give_the_same_episodes_as_awaiting():
    direct, awaited = envs.make(f"gem:{GAME}"), envs.make(f"gem:{GAME}")
    reset, step = direct.inline_calls()
    assert reset(3) == await awaited.areset(3)
    for action in SCRIPT:
        assert (got := step(action)) == await awaited.astep(action)
        if got[2] or got[3]:
            break
    direct.blocking = True  # offloaded from now on: awaited, never called on the loop
    assert direct.inline_calls() is None
    direct.blocking = False
    direct.broken = "abandoned"
    assert direct.inline_calls() is None
    assert envs.make(f"gem:{GAME}", wrappers="python_tool_no_int_reward").inline_calls() is None


def test_a_bare_step_that_draws_uses_its_own_rng_and_is_swapped_from_then_on():
    """Inline steps are GEM's own methods, without the RNG swap, until their code draws: Minesweeper
    draws its mines at the first reveal. That draw still comes from the env's own Random (found on
    the stack), so a bare env, a swapped one and plain GEM in a fresh process give one episode;
    GuessTheNumber, whose step never draws, stays bare; plain GEM in the same process is untouched."""
    mines, actions = "game:Minesweeper-v0-easy", ["\\\\boxed{reveal 2 2}", "\\\\boxed{reveal 0 0}", "\\\\boxed{flag 4 4}",
                                                "\\\\boxed{reveal 4 0}", "\\\\boxed{reveal 0 4}"]
    episode = f"""
def episode(reset, step, seed):
    out = [reset(seed)[0]]
    for a in {actions!r}:
        obs, r, te, tr, _ = step(a)
        out.append([obs, float(r), bool(te), bool(tr)])
        if te or tr:
            break
    return out
"""
    plain = episode + f"""
import json, gem
env = gem.make({mines!r})
print(json.dumps([episode(lambda s: env.reset(seed=s), env.step, seed) for seed in (3, 4)]))
"""
    ours = episode + f"""
import json, random, gem, envs

bare, swapped = envs.make("gem:{mines}"), envs.make("gem:{mines}")
reset, step = bare.inline_calls()
was_bare = step.__self__ is bare.gem_env
random.seed(5)
first = episode(reset, step, 3)  # draws in the bare step: caught, from bare's own Random
outside = random.random()
random.seed(5)
untouched = outside == random.random()
now_swapped = bare.inline_calls()[1] == bare.step and swapped.inline_calls()[1] == swapped.step
second = episode(*bare.inline_calls(), 4)
by_swap = [episode(swapped.reset, swapped.step, seed) for seed in (3, 4)]
guess = envs.make("gem:{GAME}")
for seed in range(5):
    episode(*guess.inline_calls(), seed)
stays_bare = guess.inline_calls()[1].__self__ is guess.gem_env
raw = gem.make({mines!r})
raw_episode = episode(lambda s: raw.reset(seed=s), raw.step, 3)
print(json.dumps([was_bare, untouched, now_swapped, stays_bare, [first, second], by_swap, raw_episode]))
"""

    def run(code):
        return json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)

    expected = run(plain)
    was_bare, untouched, now_swapped, stays_bare, bare_episodes, swapped_episodes, raw_episode = run(ours)
    assert was_bare and now_swapped and stays_bare and untouched
    assert bare_episodes == swapped_episodes == expected
    assert raw_episode == expected[0]
    assert any("Game over" in o[0] or "revealed" in o[0] for o in expected[0][1:])  # the reveals ran
