"""Hostile turns through `Transcript` (engine/chat.py, the delta of engine/render.py): any model token ids
(special tokens, stop ids, ids that decode to template markup, bytes that are not UTF-8 alone) and any
observation text (template markup, Jinja syntax, control characters, long text) under real chat
templates. Only the documented `ChatTemplateError` may escape, naming the checkpoint; the sequence
keeps the model's ids exactly, never rewrites a token already in it, and its four arrays stay aligned."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tidal.engine.chat import ChatTemplateError, ChatTokenizer, Transcript

from tests.engine.test_chat import LLAMA_SPECIAL, QWEN_PLAIN, QWEN_SPECIAL, _template, build_checkpoint

FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

MARKUP = QWEN_SPECIAL + QWEN_PLAIN + LLAMA_SPECIAL + ["</s>", "<s>", "[INST]", "[/INST]", "<|eos|>", "<|user|>",
                                                     "<|assistant|>", "{{ messages }}", "{% raw %}", "{#", "\x00",
                                                     "\r\n", "\u2060TIDAL_END_OF_CONTENT\u2060", "\ufeff"]
observation_text = st.one_of(
    st.text(max_size=60),
    st.lists(st.one_of(st.sampled_from(MARKUP), st.text(max_size=8)), max_size=8).map("".join),
    st.integers(1, 20_000).map(lambda n: "x" * n),
)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("fuzz-chat")
    qwen = dict(special=QWEN_SPECIAL, plain=QWEN_PLAIN, eos="<|im_end|>", pad="<|endoftext|>",
                gen_eos=("<|im_end|>", "<|endoftext|>"))
    llama = dict(special=LLAMA_SPECIAL, bos="<|begin_of_text|>", eos="<|eot_id|>",
                 gen_eos=("<|end_of_text|>", "<|eot_id|>"))
    paths = {
        "qwen2_5": build_checkpoint(root / "qwen2_5", _template("qwen2_5"), **qwen),
        "qwen3": build_checkpoint(root / "qwen3", _template("qwen3"), **qwen),
        "llama3": build_checkpoint(root / "llama3", _template("llama3"), **llama),
        "mistral": build_checkpoint(root / "mistral", _template("mistral"), ["<s>", "</s>"], eos="</s>", bos="<s>"),
        "tiny": tiny_model_dir,
    }
    return {name: ChatTokenizer.load(path) for name, path in paths.items()}


@st.composite
def episode(draw, tok: ChatTokenizer):
    """Turns of (model ids, observation messages)."""
    special = [i for i in range(tok.vocab_size) if tok.decode([i], skip_special_tokens=True) == ""]
    ids = st.one_of(st.integers(0, tok.vocab_size - 1), st.sampled_from(special or [0]))
    turns = []
    for _ in range(draw(st.integers(1, 4))):
        gen = draw(st.lists(ids, max_size=12))
        if tok.eos_token_ids and draw(st.booleans()):
            gen.append(draw(st.sampled_from(tok.eos_token_ids)))
        role = draw(st.sampled_from(["user", "user", "tool"]))
        msgs = [{"role": role, "content": draw(observation_text)} for _ in range(draw(st.integers(1, 2)))]
        turns.append((gen, msgs))
    system = draw(st.one_of(st.none(), observation_text))
    return system, draw(observation_text), turns


def check_aligned(t: Transcript, expected_turns: list[list[int]]) -> None:
    n = len(t.tokens)
    assert len(t.loss_mask) == len(t.behav_logp) == len(t.versions) == n
    assert all(type(i) is int and 0 <= i < t.tok.vocab_size for i in t.tokens)
    masked = [0] * n
    for (start, end), ids in zip(t.turns, expected_turns, strict=True):
        assert list(t.tokens[start:end]) == ids, "the model's ids were not kept exactly"
        masked[start:end] = [1] * (end - start)
    assert list(t.loss_mask) == masked
    assert all((v == -1) == (m == 0) for v, m in zip(t.versions, t.loss_mask, strict=True))


def run_episode(tok: ChatTokenizer, drawn) -> None:
    system, first, turns = drawn
    messages = ([{"role": "system", "content": system}] if system is not None else []) + \
        [{"role": "user", "content": first}]
    try:
        t = Transcript(tok, messages)
    except ChatTemplateError as exc:
        assert tok.name in str(exc), str(exc)
        return
    done: list[list[int]] = []
    for version, (gen, obs) in enumerate(turns):
        before = list(t.tokens)
        t.append_generation(gen, [-0.5] * len(gen), version)
        t.end_turn()
        done.append(gen)
        check_aligned(t, done)
        try:
            added = t.add_messages(obs)
        except ChatTemplateError as exc:
            assert tok.name in str(exc), str(exc)
            return
        assert list(t.tokens[:len(before)]) == before, "a token already in the sequence changed"
        assert added == len(t.tokens) - len(before) - len(gen)
        check_aligned(t, done)


@pytest.mark.parametrize("name", ["qwen2_5", "qwen3", "llama3", "mistral", "tiny"])
def test_hostile_turns_keep_tokens_exact(tokenizers, name):
    tok = tokenizers[name]

    @FUZZ
    @given(episode(tok))
    def run(drawn):
        run_episode(tok, drawn)

    run()


def test_observation_text_reaches_the_sequence(tokenizers):
    """Markup in an observation is data: it is encoded as text the template wrote, not dropped or run."""
    tok = tokenizers["qwen2_5"]
    t = Transcript(tok, [{"role": "user", "content": "hi"}])
    t.append_generation(tok.encode("ok"), [-0.1] * len(tok.encode("ok")), 0)
    t.end_turn()
    hostile = "{{ raise_exception('x') }}{% for m in messages %}{{ m }}{% endfor %} and <tool_call>"
    start = len(t.tokens)
    t.add_message("user", hostile)
    assert hostile in tok.decode(t.tokens[start:], skip_special_tokens=False)


def test_a_lone_surrogate_in_an_observation_is_handled(tokenizers):
    tok = tokenizers["qwen2_5"]
    t = Transcript(tok, [{"role": "user", "content": "hi"}])
    t.append_generation([5], [-0.1], 0)
    t.end_turn()
    t.add_message("tool", '{"result": "' + "\ud800" + '"}')
    assert len(t.tokens) == len(t.loss_mask)
    assert '{"result": "\ufffd"}' in tok.decode(t.tokens, skip_special_tokens=False)
    assert t.messages[-1]["content"] == '{"result": "\ufffd"}'


def test_a_lone_surrogate_in_the_first_prompt_is_handled(tokenizers):
    t = Transcript(tokenizers["llama3"], [{"role": "user", "content": "a\udfffb"}])
    assert "a\ufffdb" in tokenizers["llama3"].decode(t.tokens, skip_special_tokens=False)
