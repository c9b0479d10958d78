"""ProcessEnv: an env in its own worker process, killed on timeout, restarted after a crash."""

import os
from pathlib import Path

import pytest
from tidal.envs.core import EnvError
from tidal.envs.process import ProcessEnv, RemoteEnvError
from tidal.envs.wrappers import StepTimeout

from tidal import envs


@pytest.fixture
async def misbehaving(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    env = ProcessEnv(entry_point="hanging_env:Misbehaving")
    yield env
    await env.aclose()


async def test_same_episode_as_in_process():
    actions = ["\\boxed{5}", "\\boxed{2}", "\\boxed{8}", "\\boxed{7}"]
    local, remote = envs.make("games:GuessTheNumber-v0"), envs.make("games:GuessTheNumber-v0", offload="process")
    try:
        assert (await remote.areset(3)) == local.reset(3)
        assert remote.instructions == local.instructions
        for a in actions:
            assert list(await remote.astep(a)) == list(local.step(a))
    finally:
        await remote.aclose()
    assert remote.proc is None


async def test_timeout_kills_worker_and_next_reset_starts_a_new_one(misbehaving):
    env = StepTimeout(misbehaving, timeout_s=0.5)
    _, info = await misbehaving.areset(0)  # unbounded: starting a worker on a loaded machine can take a while
    first_pid = info["pid"]
    obs, reward, terminated, truncated, info = await env.astep("hang")
    assert truncated and not terminated and info["truncated_reason"] == "step_timeout"
    await misbehaving.proc.wait()
    assert misbehaving.proc.returncode is not None  # killed, not left sleeping
    with pytest.raises(EnvError, match="step before reset"):
        await env.astep("ok")
    _, info = await misbehaving.areset(0)
    assert info["pid"] != first_pid and misbehaving.restarts == 1 and misbehaving.broken is None
    assert (await env.astep("stop"))[:3] == ("did stop", 1.0, True)


async def test_crash_is_an_episode_error_and_env_recovers(misbehaving):
    ep = await envs.run_episode(misbehaving, lambda obs: "crash", seed=0)
    assert ep.finish_reason == "env_error" and "died during step (exit code 3)" in ep.error.message
    ep = await envs.run_episode(misbehaving, lambda obs: "stop", seed=0)
    assert ep.finish_reason == "terminated" and ep.rewards == [1.0]


async def test_remote_exception_carries_its_traceback_and_stdout_noise_is_harmless(misbehaving):
    await misbehaving.areset(1)
    assert (await misbehaving.astep("print"))[0] == "did print"
    with pytest.raises(RemoteEnvError, match="RuntimeError: deliberate failure in step") as err:
        await misbehaving.astep("raise")
    assert "hanging_env.py" in str(err.value)
    assert (await misbehaving.astep("again"))[0] == "did again"  # the worker lives on


def test_bad_offload_choice_is_refused():
    with pytest.raises(ValueError, match="offload must be 'auto' or 'process'"):
        envs.make("games:Wordle-v0", offload="gpu")


async def test_process_env_passes_check_env():
    env = envs.make("games:Mastermind-v0", offload="process")
    assert await envs.acheck_env(env) == []
    assert env.proc is None  # aclose reaped the worker


async def test_a_worker_past_its_memory_cap_fails_the_call_and_is_replaced(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    env = ProcessEnv(entry_point="hanging_env:Misbehaving", worker_memory_mb=600)
    try:
        _, info = await env.areset(0)
        await env.astep("leak")  # about 170 MB + 256 MB: under the cap
        with pytest.raises(RemoteEnvError, match="MemoryError"):
            await env.astep("leak")
        _, again = await env.areset(0)  # a fresh worker, without the leak
        assert again["pid"] != info["pid"] and env.restarts == 1
        assert (await env.astep("leak"))[0] == "did leak"
    finally:
        await env.aclose()
