"""task_model.py: a word-level task model that the engine, `tidal serve` and the env all read alike.

One token per move: every word of terse GuessTheNumber is one token, the chat template extends its
own renders exactly (no transcript divergences), and a one-token generation from `tidal serve` decodes
to a word the env accepts when it is a digit.
"""

import subprocess
import sys

import pytest
from refserver_http import post
from tidal.engine.chat import ChatTokenizer, Transcript
from tidal.engine.reference.launch import ReferenceServer
from tidal.engine.reference.task_model import GUESS_MOVES, GUESS_WORDS, SPECIAL_TOKENS, build_task_model
from tidal.envs.games.guess_the_number import GuessTheNumber

TERSE = {"low": 1, "high": 8, "max_turns": 4, "moves": "bare", "terse": True}


@pytest.fixture(scope="module")
def task_model_dir(tmp_path_factory):
    return build_task_model(tmp_path_factory.mktemp("task-model") / "model")


def test_vocabulary_is_the_specials_unk_and_the_words(task_model_dir):
    tok = ChatTokenizer.load(task_model_dir)
    assert tok.vocab_size == len(SPECIAL_TOKENS) + 1 + len(GUESS_WORDS) == 20
    assert [tok.decode([i], skip_special_tokens=False) for i in range(5)] == list(SPECIAL_TOKENS)
    assert tok.eos_token_ids == (SPECIAL_TOKENS.index("<|end|>"),)
    for word in GUESS_WORDS:
        (i,) = tok.encode(word)                      # exactly one token each
        assert tok.decode([i]) == word
    assert tok.encode("guess 1-8") == [tok.encode(w)[0] for w in ("guess", "1", "-", "8")]
    assert tok.encode("banana 9") == [len(SPECIAL_TOKENS)] * 2       # unknown words and digits are [UNK]
    assert tok.decode([len(SPECIAL_TOKENS)], skip_special_tokens=False) == "[UNK]"


def test_chat_tokenizer_loads_it_without_torch(task_model_dir):
    code = ("import sys; from tidal.engine.chat import ChatTokenizer; "
            f"t = ChatTokenizer.load({str(task_model_dir)!r}); "
            "print(t.render([{'role': 'user', 'content': 'guess 1-8'}], add_generation_prompt=True)); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "<|user|> guess 1-8<|end|><|assistant|>"


def test_a_whole_episode_is_one_token_per_move_and_never_diverges(task_model_dir):
    tok = ChatTokenizer.load(task_model_dir)
    env = GuessTheNumber(**TERSE)
    obs, info = env.reset(5)
    transcript = Transcript(tok, [{"role": "user", "content": obs}])
    policy = env.solver()
    for _ in range(env.max_turns):
        move = policy(obs)
        transcript.append_generation(tok.encode(move), [-1.0], 0)   # what the server would send back
        action = transcript.end_turn()
        assert action == move
        obs, reward, terminated, truncated, info = env.step(action)
        assert "invalid" not in info
        if terminated or truncated:
            break
        transcript.add_message("user", obs)
    assert reward == 1.0 and terminated
    assert transcript.divergences == 0
    assert [e - s for s, e in transcript.turns] == [1] * len(transcript.turns)
    text = tok.decode(transcript.tokens, skip_special_tokens=False)
    assert "[UNK]" not in text and text.startswith("<|user|> guess 1 - 8 <|end|> <|assistant|>")
    assert sum(transcript.loss_mask) == len(transcript.turns)


def test_builder_refuses_bad_words_and_sizes(tmp_path):
    with pytest.raises(ValueError, match="one piece of text"):
        build_task_model(tmp_path / "a", words=["12", "higher"])       # two digits: two tokens
    with pytest.raises(ValueError, match="special token"):
        build_task_model(tmp_path / "b", words=["<|end|>", "x"])
    with pytest.raises(ValueError, match="multiple of 4"):
        build_task_model(tmp_path / "c", hidden=30)
    assert not any(tmp_path.iterdir())


async def test_served_one_token_moves_round_trip_through_the_env(task_model_dir):
    """`tidal serve --model DIR` loads the checkpoint; each one-token generation over the full vocabulary
    decodes, in the engine's tokenizer, to the text the server reports, and the env accepts exactly the
    digits 1-8 among them."""
    tok = ChatTokenizer.load(task_model_dir)
    prompt = tok.encode(tok.render([{"role": "user", "content": "guess 1-8"}], add_generation_prompt=True))
    seen: dict[str, bool] = {}
    async with ReferenceServer(task_model_dir, args=["--set", "model.threads=1"]) as srv:
        for seed in range(48):
            status, out = await post(srv.url + "/generate", {
                "input_ids": prompt, "return_logprob": True,
                "sampling_params": {"temperature": 1.0, "max_new_tokens": 1, "sampling_seed": seed}})
            assert status == 200, out
            (token,) = out["output_ids"]
            (logprob, token_again, _), = out["meta_info"]["output_token_logprobs"]
            assert token_again == token and logprob < 0
            text = tok.decode([token])
            assert text == out["text"]
            env = GuessTheNumber(**TERSE)
            env.reset(seed)
            seen[text] = "invalid" not in env.step(text)[4]
    moves = {t for t, valid in seen.items() if valid}
    assert moves and moves <= set(GUESS_MOVES)          # 48 draws: some digit came (p of none ~ 1e-11)
    assert all(not valid for t, valid in seen.items() if t not in GUESS_MOVES)
