"""AgentGym clients run whole episodes against servers that speak each family's real shapes."""

import asyncio

import pytest
from agentgym_servers import start_server
from tidal.envs.adapters.agentgym import AGENTGYM_COUNTS, FAMILIES, AgentGymError, BabyAIEnv
from tidal.envs.check import acheck_env

from tidal import envs

# family -> (actions of a scripted episode, expected rewards per step, kwargs for make)
EPISODES = {
    "babyai": (["Thought: turn first.\nAction: turn left", "Thought: the ball is ahead.\nAction: go to red ball 1"],
               [0.0, 0.8875]),
    "textcraft": (["Action: get 1 oak log", "Thought: planks.\nAction: craft 4 oak planks using 1 oak log",
                   "Action: look", "Action: craft 1 crafting table using 4 oak planks"],
                  [0.0, 0.0, 0.0, 1.0]),
    "sciworld": (["Thought: heat it.\nAction: activate stove", "Action: focus on water</s>"], [50.0, 100.0]),
    "searchqa": (["<think>I need facts.</think><search>capital of Talsa</search>", "<answer>Paris</answer>",
                  "<answer>Orrin</answer>"], [0.0, 0.0, 1.0]),
    "webarena": (["Let's think step-by-step. In summary, the next action I will perform is ```click [12]```",
                  "In summary, the next action I will perform is ```stop [$42]```"], [0.0, 1.0]),
}


@pytest.fixture
async def served(request):
    fake, server = await start_server(request.param)
    yield request.param, fake, str(server.make_url("")).rstrip("/")
    await server.close()


@pytest.mark.parametrize("served", list(EPISODES), indirect=True)
async def test_scripted_episode_reaches_the_servers_reward(served):
    family, fake, url = served
    actions, rewards = EPISODES[family]
    env = envs.make(f"agentgym:{family}", url=url, timeout_s=10)
    assert env.instructions and env.conversation_start[0] == env.instructions
    assert env.conversation_start[1] in ("OK. I'll follow your instructions and try my best to solve the task.", "Ok.")
    obs, info = await env.areset(seed=7)
    assert obs and info["item_id"] == 7
    got = []
    for action in actions:
        obs, reward, terminated, truncated, _ = await env.astep(action)
        got.append(reward)
    assert got == rewards and terminated and not truncated
    await env.aclose()
    assert fake.closed == [0] and not fake.envs
    id_field = FAMILIES[family].id_field
    assert all(id_field in body for route, body in fake.calls if route != "/create")


@pytest.mark.parametrize("served", ["babyai"], indirect=True)
async def test_babyai_sends_the_sanitised_action_line_and_reset_index(served):
    _, fake, url = served
    env = BabyAIEnv(url)
    await env.areset(seed=41)
    assert fake.calls[1] == ("/reset", {"data_idx": 41, "id": 0})
    await env.astep("Thought: go!\nAction: go to red ball 1!!")
    assert fake.calls[-1] == ("/step", {"action": "go to red ball 1", "id": 0})
    await env.aclose()


@pytest.mark.parametrize("served", ["babyai"], indirect=True)
async def test_local_error_turns_make_no_request(served):
    _, fake, url = served
    env = envs.make("agentgym:babyai", url=url)
    await env.areset(seed=0)
    before, local_errors = len(fake.calls), AGENTGYM_COUNTS["local_errors"]
    obs, reward, terminated, _, info = await env.astep("Action: turn left\nAction: turn right")
    assert "only one 'Action:'" in obs and (reward, terminated, info["local_error"]) == (0.0, False, True)
    obs, *_ = await env.astep("I will just think about it.")
    assert "no action found" in obs
    obs, *_ = await env.astep("Action: !!!")
    assert "no action found" in obs
    obs, *_ = await env.astep("Action: turn left\n" + "x" * 1_000_000)
    assert "characters long" in obs
    assert len(fake.calls) == before and AGENTGYM_COUNTS["local_errors"] == local_errors + 4
    await env.aclose()


@pytest.mark.parametrize("served", ["babyai"], indirect=True)
async def test_http_200_error_key_becomes_an_episode_error(served):
    _, fake, url = served
    env = envs.make("agentgym:babyai", url=url)
    await env.areset(seed=0)
    await env.astep("Action: go to red ball 1")
    with pytest.raises(AgentGymError, match="has finished") as err:
        await env.astep("Action: turn left")
    assert url in str(err.value) and "/step" in str(err.value)

    actions = iter(["Action: go to red ball 1", "Action: turn left"])
    episode = await envs.run_episode(_NeverDone(env), lambda obs: next(actions), seed=1)
    assert episode.finish_reason == "env_error" and episode.error.type == "AgentGymError"
    assert "has finished" in episode.error.message and episode.error.phase == "step"

    env.env_id = 99
    with pytest.raises(AgentGymError, match="The id 99 is not valid"):
        await env.astep("Action: turn left")
    env.env_id = 0
    await env.aclose()


class _NeverDone(envs.Wrapper):
    """Hides `terminated` so the episode runner steps a finished BabyAI env once more."""

    async def astep(self, action):
        obs, reward, _, truncated, info = await self.env.astep(action)
        return obs, reward, False, truncated, info


@pytest.mark.parametrize("served", ["babyai", "textcraft", "sciworld", "searchqa"], indirect=True)
async def test_broken_response_shapes_and_statuses_are_clear_errors(served):
    family, fake, url = served
    env = envs.make(f"agentgym:{family}", url=url)
    await env.areset(seed=0)
    action = EPISODES[family][0][0]
    fake.broken = "shape"
    errors = AGENTGYM_COUNTS["server_errors"]
    with pytest.raises(AgentGymError, match="unexpected body"):
        await env.astep(action)
    fake.broken = "status"
    with pytest.raises(AgentGymError, match="HTTP 500"):
        await env.astep(action)
    assert AGENTGYM_COUNTS["server_errors"] == errors + 2
    fake.broken = None
    assert (await env.astep(action))[1] == EPISODES[family][1][0]
    await env.aclose()


@pytest.mark.parametrize("served", ["textcraft"], indirect=True)
async def test_a_hanging_server_is_a_timeout_error(served):
    _, fake, url = served
    env = envs.make("agentgym:textcraft", url=url, timeout_s=0.5)
    await env.areset(seed=0)
    fake.broken = "hang"
    with pytest.raises(AgentGymError, match=r"/step .*no answer within 0.5 s"):
        await env.astep("Action: inventory")
    fake.broken = None
    await env.aclose()
    assert fake.closed == [0]


@pytest.mark.parametrize("served", ["sciworld"], indirect=True)
async def test_sciworld_first_observation_and_invalid_action(served):
    _, _, url = served
    env = envs.make("agentgym:sciworld", url=url)
    obs, _ = await env.areset(seed=3)
    assert obs.startswith("Your task is to boil water.\nThis room is called the kitchen.")
    obs, reward, terminated, _, _ = await env.astep("I think I should activate the stove")
    assert obs == "Invalid Action.\n\n" + env.observation and (reward, terminated) == (0.0, False)
    await env.aclose()


@pytest.mark.parametrize("served", ["webarena"], indirect=True)
async def test_webarena_needs_backticks_and_reports_reset_timeouts(served):
    _, fake, url = served
    env = envs.make("agentgym:webarena", url=url)
    obs, _ = await env.areset(seed=5)
    assert obs.startswith("OBJECTIVE:") and fake.calls[1] == ("/reset", {"seed": 0, "idx": 5, "env_idx": 0})
    assert fake.calls[2] == ("/observation", {"env_idx": "0"})
    obs, reward, terminated, _, info = await env.astep("click [12]")
    assert "triple backticks" in obs and info["local_error"] and not terminated
    obs, reward, terminated, _, _ = await env.astep("```stop [$41]```")
    assert (reward, terminated) == (0.0, True)
    with pytest.raises(AgentGymError, match="timed out loading item 999"):
        await env.areset(seed=999)
    await env.aclose()


@pytest.mark.parametrize("served", ["textcraft"], indirect=True)
async def test_textcraft_create_carries_custom_recipes(served):
    _, fake, url = served
    env = envs.make("agentgym:textcraft", url=url, goal="blue dye", commands="craft 1 blue dye using 1 lapis lazuli")
    await env.areset(seed=0)
    assert fake.calls[0] == ("/create", {"minecraft_dir": "agentenv_textcraft/", "goal": "blue dye",
                                         "commands": "craft 1 blue dye using 1 lapis lazuli"})
    assert env.observation.endswith("Goal: craft blue dye.")
    await env.aclose()


@pytest.mark.parametrize("served", ["textcraft"], indirect=True)
async def test_sync_api_for_scripts(served):
    _, fake, url = served

    def play() -> float:
        env = envs.make("agentgym:textcraft", url=url)
        env.reset(seed=0)
        rewards = [env.step(f"Action: {a}")[1] for a in ("get 1 oak log", "craft 4 oak planks using 1 oak log",
                                                       "craft 1 crafting table using 4 oak planks")]
        env.close()
        return sum(rewards)

    assert await asyncio.to_thread(play) == 1.0
    assert fake.closed == [0]


async def test_unreachable_server_is_a_clear_error_after_retries():
    import socket

    with socket.socket() as s:  # a port that was just bound and released: nothing listens on it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = envs.make("agentgym:babyai", url=f"http://127.0.0.1:{port}", create_retries=2, retry_delay_s=0.01)
    with pytest.raises(AgentGymError, match=r"/create .*after 2 attempts"):
        await env.areset(seed=0)
    await env.aclose()


def test_ids_and_arguments():
    assert envs.list("agentgym") == [f"agentgym:{f}" for f in FAMILIES]
    with pytest.raises(ValueError, match="needs the server URL"):
        envs.make("agentgym:textcraft")
    with pytest.raises(envs.EnvNotFound, match="unknown server family"):
        envs.make("agentgym:minecraft", url="http://127.0.0.1:1")
    with pytest.raises(ValueError, match="url must be"):
        envs.make("agentgym:babyai", url="127.0.0.1:1")


@pytest.mark.parametrize("served", list(EPISODES), indirect=True)
async def test_check_env_passes_against_each_server(served):
    family, fake, url = served
    env = envs.make(f"agentgym:{family}", url=url)
    try:
        warnings = await acheck_env(env)
    finally:
        await env.aclose()
    assert all("blocking" in w for w in warnings)  # timing an HTTP round trip, not loop-blocking work
    assert fake.closed == [0]
    assert sum(route == "/step" for route, _ in fake.calls) >= 8  # sampled actions are well-formed
