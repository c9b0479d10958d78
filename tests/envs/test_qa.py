"""The qa suite: the scripted solver searches over several turns and reaches reward 1."""

import pytest
from tidal.envs.qa import FORMAT_PENALTY, QAEnv, load_questions, normalize_answer
from tidal.envs.qa.env import DATA

from tidal import envs


@pytest.fixture
def env():
    return envs.make("qa:Corpus-v0")


async def test_solver_reaches_1_over_multiple_turns_on_every_question(env):
    assert "<search>" in env.instructions and "<answer>" in env.instructions
    every = {q.id for q in load_questions(DATA / "questions.jsonl")}
    seen = set()
    for seed in range(500):
        if seen == every:
            break
        obs, _ = await env.areset(seed)
        solve, observations, rewards = env.solver(), [], []
        while True:
            obs, reward, terminated, truncated, _ = await env.astep(solve(obs))
            observations.append(obs)
            rewards.append(reward)
            if terminated or truncated:
                break
        item = env.item
        assert rewards[-1] == 1.0 and terminated
        assert len(rewards) == len(item.queries) + 1 >= 2
        assert sum(reward == 0.0 for reward in rewards[:-1]) == len(item.queries)  # searching earns nothing
        for doc_id, obs in zip(item.support, observations, strict=False):
            title = next(d.title for d in env.tool.index.docs if d.id == doc_id)
            assert f"(Title: {title})" in obs  # each search surfaced its supporting document
        seen.add(item.id)
    assert seen == every


def test_two_hop_question_needs_the_first_search_to_find_the_second(env):
    env.reset(seed=0)
    env.item = next(q for q in env.questions if q.question.startswith("Which kingdom has its capital"))
    obs, reward, terminated, truncated, info = env.step("<search>river Vell flows through city</search>")
    assert "Orrin" in obs and (reward, terminated, truncated) == (0.0, False, False)
    obs, *_ = env.step("Orrin it is. <search>Orrin capital</search>")
    assert "capital of the Kingdom of Talsa" in obs
    obs, reward, terminated, _, info = env.step("<answer>the Kingdom of Talsa.</answer>")
    assert (reward, terminated, info["correct"], info["searches"]) == (1.0, True, True, 2)


def test_wrong_answer_ends_with_0(env):
    env.reset(seed=1)
    assert env.step("<answer>Atlantis</answer>")[:3] == ("Incorrect.", 0.0, True)


@pytest.mark.parametrize("action", ["", "I think it is Orrin", "<search>unclosed", "x" * 1_000_000])
def test_actions_without_a_tag_get_the_format_penalty(env, action):
    env.reset(seed=2)
    obs, reward, terminated, truncated, info = env.step(action)
    assert reward == FORMAT_PENALTY and not terminated and not truncated and info["format_error"]
    assert "No action found" in obs


def test_running_out_of_turns_truncates():
    env = QAEnv(max_turns=2)
    env.reset(seed=3)
    assert env.step("<search>Talsa</search>")[2:4] == (False, False)
    obs, reward, terminated, truncated, _ = env.step("<search>Orrin</search>")
    assert (reward, terminated, truncated) == (0.0, False, True) and "No turns left" in obs


def test_normalize_answer():
    assert normalize_answer("The  Lantern Race!") == "lantern race"
    assert normalize_answer("61 metres.") == "61 metres"


def test_reset_is_deterministic_and_index_is_shared():
    a, b = QAEnv(), QAEnv()
    assert a.reset(seed=9) == b.reset(seed=9)
    assert a.tool.index is b.tool.index
