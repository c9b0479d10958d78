"""The games suite: solvers win, seeds fix episodes, bad actions are penalised feedback, never crashes."""

import random

import pytest
from tidal.envs.games.base import FORMAT_ERROR_REWARD
from tidal.envs.games.mastermind import score
from tidal.envs.games.words import wordle_feedback, words

from tidal import envs

GAMES = envs.list("games")


def test_suite_has_the_five_games():
    assert {g.split(":")[1] for g in GAMES} >= {
        "GuessTheNumber-v0", "Mastermind-v0", "Wordle-v0", "Hangman-v0", "Minesweeper-v0",
    }


def play(env, policy, seed):
    obs, _ = env.reset(seed)
    rewards = []
    for _ in range(env.max_turns):
        obs, reward, terminated, truncated, _ = env.step(policy(obs))
        rewards.append(reward)
        if terminated or truncated:
            return rewards, terminated, truncated
    raise AssertionError("episode did not end within max_turns")


@pytest.mark.parametrize("env_id", GAMES)
def test_scripted_solver_reaches_reward_1(env_id):
    for seed in range(20):
        env = envs.make(env_id, difficulty="easy")
        env.reset(seed)
        rewards, terminated, truncated = play(env, env.solver(), seed)
        assert (rewards[-1], terminated, truncated) == (1.0, True, False), (env_id, seed)


@pytest.mark.parametrize("env_id", GAMES)
def test_hard_presets_are_harder_but_solvable(env_id):
    wins = 0
    for seed in range(10):
        env = envs.make(env_id, difficulty="hard")
        env.reset(seed)
        wins += play(env, env.solver(), seed)[0][-1] == 1.0
    assert wins >= 5  # Hangman's short words beat the letter-frequency solver now and then


@pytest.mark.parametrize("env_id", GAMES)
def test_same_seed_same_episode_different_seed_different_puzzle(env_id):
    def transcript(seed):
        env = envs.make(env_id)
        obs, _ = env.reset(seed)
        rng, out = random.Random(7), [obs]
        for _ in range(env.max_turns):
            obs, reward, terminated, truncated, _ = env.step(env.sample_action(rng))
            out.append((obs, reward, terminated, truncated))
            if terminated or truncated:
                break
        return out

    assert transcript(3) == transcript(3)
    assert len({str(transcript(s)) for s in range(6)}) > 1
    random.seed(0)
    first = transcript(5)
    random.seed(12345)  # the global RNG plays no part
    assert transcript(5) == first


BAD_ACTIONS = [
    "",
    "I think the answer is five",
    "\\boxed{}",
    "\\boxed{" + "9" * 10_000 + "}",
    "x" * 1_000_000,
    "\\boxed{\x00\ufffd}",
    "\\boxed{unclosed",
    "\\boxed{-1 -1 -1}",
]


@pytest.mark.parametrize("env_id", GAMES)
@pytest.mark.parametrize("action", BAD_ACTIONS, ids=range(len(BAD_ACTIONS)))
def test_bad_actions_get_feedback_and_penalty_not_exceptions(env_id, action):
    env = envs.make(env_id)
    env.reset(0)
    obs, reward, terminated, truncated, info = env.step(action)
    assert isinstance(obs, str) and len(obs) < 2000
    assert "invalid move" in obs and "\\boxed{" in obs and info["invalid"]
    assert reward == FORMAT_ERROR_REWARD and not terminated and not truncated
    env.reset(0)
    rewards, terminated, _ = play(env, env.solver(), 0)  # the episode is still playable
    assert rewards[-1] == 1.0 and terminated


@pytest.mark.parametrize("env_id", GAMES)
def test_running_out_of_turns_truncates_and_reveals(env_id):
    env = envs.make(env_id, max_turns=2)
    env.reset(0)
    env.step("nothing")
    obs, _, terminated, truncated, _ = env.step("nothing")
    assert (terminated, truncated) == (False, True) and "used all 2 turns" in obs
    assert env.step("\\boxed{1}")[2] is True  # stepping a finished game says so, it does not raise


def test_bad_parameters_are_refused_with_names():
    with pytest.raises(ValueError, match="difficulty must be one of"):
        envs.make("games:Mastermind-v0", difficulty="nightmare")
    with pytest.raises(ValueError, match=r"unknown parameters \['colours'\]"):
        envs.make("games:Mastermind-v0", colours=3)
    with pytest.raises(ValueError, match="high must exceed low"):
        envs.make("games:GuessTheNumber-v0", low=5, high=5)


def test_feedback_rules_worked_by_hand():
    # secret APPLE, guess PAPER: P->Y (a P remains), A->Y, P->G, E->Y, R->X
    assert wordle_feedback("apple", "paper") == "YYGYX"
    # a repeated guess letter is yellow only as often as the secret has it spare: SPEED vs EERIE
    assert wordle_feedback("speed", "eerie") == "YYXXX"
    # (1 2 3 4) vs (1 3 2 5): 1 exact; 3 and 2 misplaced
    assert score((1, 2, 3, 4), (1, 3, 2, 5)) == (1, 2)
    assert score((1, 1, 2, 2), (2, 1, 1, 1)) == (1, 2)
    assert len(words(3)) > 500 and all(len(w) == 5 for w in words(5))


def test_guess_the_number_hints_point_at_target():
    env = envs.make("games:GuessTheNumber-v0", difficulty="hard")
    env.reset(11)
    low = 1 if env.target > 1 else 2
    assert f"higher than {low}" in env.step(f"\\boxed{{{low}}}")[0] or env.target == low
    obs, reward, terminated, *_ = env.step(f"Final: \\boxed{{{env.target}}}")
    assert "Correct" in obs and reward == 1.0 and terminated


def test_minesweeper_first_reveal_is_safe_and_floods():
    for seed in range(10):
        env = envs.make("games:Minesweeper-v0")
        env.reset(seed)
        obs, reward, terminated, *_ = env.step("\\boxed{reveal 0 0}")
        assert not terminated and len(env.revealed) >= 4  # a corner with clear neighbours opens its 2x2
        assert (0, 0) not in env.mine_cells and len(env.mine_cells) == env.mines
    obs, *_ = env.step("\\boxed{reveal 9 9}")
    assert "off the 5x5 board" in obs


# --- moves="bare" and terse=True: one-token moves and few-word observations for small models


@pytest.mark.parametrize("env_id", GAMES)
def test_bare_moves_are_the_whole_action(env_id):
    env = envs.make(env_id, moves="bare")
    for seed in range(5):
        env.reset(seed)
        rewards, terminated, truncated = play(env, env.solver(), seed)
        assert (rewards[-1], terminated, truncated) == (1.0, True, False), (env_id, seed)
    assert "\\boxed" not in env.sample_action(random.Random(0)) and "\\boxed" not in env.instructions
    env.reset(0)
    obs, reward, terminated, _, info = env.step(env._move("definitely not a move") + " ")
    assert reward == FORMAT_ERROR_REWARD and not terminated and info["invalid"]
    assert "invalid move" in obs and "\\boxed" not in obs


def test_terse_guess_the_number_speaks_single_words():
    env = envs.make("games:GuessTheNumber-v0", low=1, high=8, moves="bare", terse=True)
    obs, info = env.reset(3)
    assert obs == "guess 1-8" and info == {}          # no suffix: nothing but the words
    target = env.target
    below, above = max(target - 1, 0), target + 1       # 0 and 9 are outside 1-8: still answered truly
    assert env.step(str(below))[:4] == ("higher", 0.0, False, False)
    assert env.step(f" {above}\n")[:4] == ("lower", 0.0, False, False)
    obs, reward, terminated, truncated, info = env.step("seven")
    assert (obs, reward, terminated, truncated, info["invalid"]) == ("invalid", FORMAT_ERROR_REWARD, False, False, True)
    assert env.step(str(target))[:4] == ("correct", 1.0, True, False)


def test_terse_running_out_of_turns_gives_the_last_hint_only():
    env = envs.make("games:GuessTheNumber-v0", low=1, high=8, max_turns=1, moves="bare", terse=True)
    env.reset(0)
    wrong = 1 if env.target != 1 else 2
    assert env.step(str(wrong))[:4] == ("higher" if env.target > wrong else "lower", 0.0, False, True)


def test_terse_boxed_solver_and_every_target_within_four_turns():
    for moves in ("boxed", "bare"):
        env = envs.make("games:GuessTheNumber-v0", low=1, high=8, moves=moves, terse=True)
        targets = set()
        for seed in range(40):
            env.reset(seed)
            targets.add(env.target)
            rewards, terminated, _ = play(env, env.solver(), seed)
            assert rewards[-1] == 1.0 and terminated and len(rewards) <= 4, (moves, seed)
        assert targets == set(range(1, 9))


def test_terse_and_moves_are_checked():
    with pytest.raises(ValueError, match="terse=True is not supported"):
        envs.make("games:Mastermind-v0", terse=True)
    with pytest.raises(ValueError, match="moves must be 'boxed' or 'bare'"):
        envs.make("games:GuessTheNumber-v0", moves="plain")


def test_bare_terse_variant_passes_check_env():
    from tidal.envs.check import check_env

    warnings = check_env(envs.make("games:GuessTheNumber-v0", low=1, high=8, moves="bare", terse=True))
    assert all("blocking" in w for w in warnings)
