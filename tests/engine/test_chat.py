"""engine/chat.py against transformers, on real chat templates in tiny tokenizers built here.

The templates (tests/fixtures/chat_templates/) are those of Llama 3 Instruct, Llama 3.2 Instruct (tools,
`strftime_now`, `raise_exception`, `tojson(indent=4)`), Qwen2.5 Instruct (Hermes-style tool calls),
Qwen3 (thinking) and Mistral Instruct v0.1 (renders EOS itself, raises on bad roles). Each goes into a
byte-level BPE tokenizer trained here with the template's special tokens, saved with transformers'
`save_pretrained`, then loaded both by `ChatTokenizer` and by `AutoTokenizer`.
"""

import json
from pathlib import Path

import pytest
from tidal.engine.chat import (
    ChatTemplateError,
    ChatTokenizer,
    TokenizerLoadError,
    Transcript,
    TranscriptStateError,
)

TEMPLATES = Path(__file__).parents[1] / "fixtures" / "chat_templates"
CORPUS = ["hello world, the weather is sunny today", "what is the capital of France? Paris is.",
          "Sure thing: hello again", "guess a number between 1 and 100", "higher lower correct",
          "I should call the tool", "the answer is 42"] * 10
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN_PLAIN = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"]
LLAMA_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                 "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city <b>now</b>, e.g. Zürich",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def _bpe(special, plain=(), *, metaspace=False):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if metaspace:  # SentencePiece style: "▁" for spaces, one prefixed at the start of the text
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = []
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(CORPUS + ["[INST] [/INST] \n"], trainer)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special])
    tok.add_tokens([AddedToken(s, special=False, normalized=False) for s in plain])
    return tok


def build_checkpoint(path, template, special, plain=(), *, eos, bos=None, pad=None, gen_eos=(),
                     metaspace=False) -> Path:
    """A tokenizer-only checkpoint directory as `save_pretrained` writes it, plus generation_config.json."""
    from transformers import PreTrainedTokenizerFast

    tok = _bpe(special, plain, metaspace=metaspace)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad)
    fast.chat_template = template
    fast.save_pretrained(path)
    if gen_eos:
        ids = [tok.token_to_id(t) for t in gen_eos]
        (Path(path) / "generation_config.json").write_text(json.dumps({"eos_token_id": ids}))
    return Path(path)


def _template(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    qwen = dict(special=QWEN_SPECIAL, plain=QWEN_PLAIN, eos="<|im_end|>", pad="<|endoftext|>",
                gen_eos=("<|im_end|>", "<|endoftext|>"))
    llama = dict(special=LLAMA_SPECIAL, bos="<|begin_of_text|>", eos="<|eot_id|>",
                 gen_eos=("<|end_of_text|>", "<|eot_id|>"))
    made = {
        "qwen2_5": build_checkpoint(root / "qwen2_5", _template("qwen2_5"), **qwen),
        "qwen3": build_checkpoint(root / "qwen3", _template("qwen3"), **qwen),
        "llama3": build_checkpoint(root / "llama3", _template("llama3"), **llama),
        "llama3_2": build_checkpoint(root / "llama3_2", _template("llama3_2"), **llama),
        "mistral": build_checkpoint(root / "mistral", _template("mistral"), ["<s>", "</s>"], eos="</s>",
                                    bos="<s>"),
    }
    return made


def _hf(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _hf_render(hf, messages, **kw) -> str:
    return hf.apply_chat_template(messages, tokenize=False, **kw)


def _hf_ids(hf, messages, **kw) -> list[int]:
    return list(hf.apply_chat_template(messages, tokenize=True, return_dict=False, **kw))


CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hello world"},
        {"role": "assistant", "content": "Sure thing: hello again"},
        {"role": "user", "content": "  what is the capital of France?\n"}]


# --- (a) render equals transformers' apply_chat_template ---------------------------------------------

@pytest.mark.parametrize("name", ["qwen2_5", "qwen3", "llama3", "llama3_2"])
@pytest.mark.parametrize("gen", [True, False])
def test_render_and_ids_equal_transformers(ckpts, name, gen):
    tok, hf = ChatTokenizer.load(ckpts[name]), _hf(ckpts[name])
    assert tok.render(CHAT, add_generation_prompt=gen) == _hf_render(hf, CHAT, add_generation_prompt=gen)
    assert tok.encode(tok.render(CHAT, add_generation_prompt=gen)) == _hf_ids(hf, CHAT, add_generation_prompt=gen)


@pytest.mark.parametrize("name", ["qwen2_5", "qwen3", "llama3_2"])
def test_render_with_tools_equals_transformers(ckpts, name):
    tok, hf = ChatTokenizer.load(ckpts[name]), _hf(ckpts[name])
    chat = [*CHAT[1:3], {"role": "user", "content": "weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "content": "sunny, 21 °C"}]
    got = tok.render(chat, add_generation_prompt=True, tools=TOOLS)
    assert got == _hf_render(hf, chat, add_generation_prompt=True, tools=TOOLS)
    assert "<b>now</b>" in got and "Zürich" in got  # tojson: no HTML escaping, no ASCII escaping


def test_render_template_variables_equal_transformers(ckpts):
    """Extra kwargs reach the template and override a special token; strftime_now gives today's date."""
    tok, hf = ChatTokenizer.load(ckpts["llama3_2"]), _hf(ckpts["llama3_2"])
    kw = dict(add_generation_prompt=True, date_string="01 Jan 2030", bos_token="<BOS>")
    assert tok.render(CHAT, **kw) == _hf_render(hf, CHAT, **kw)
    assert tok.render(CHAT, **kw).startswith("<BOS><|start_header_id|>system")
    from datetime import datetime
    assert f"Today Date: {datetime.now():%d %b %Y}" in tok.render(CHAT, add_generation_prompt=True)
    tok3, hf3 = ChatTokenizer.load(ckpts["qwen3"]), _hf(ckpts["qwen3"])
    kw = dict(add_generation_prompt=True, enable_thinking=False)
    assert tok3.render(CHAT, **kw) == _hf_render(hf3, CHAT, **kw)
    assert tok3.render(CHAT, **kw).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_reasoning_fields_and_none_values_as_transformers(ckpts):
    tok, hf = ChatTokenizer.load(ckpts["qwen3"]), _hf(ckpts["qwen3"])
    chat = [CHAT[1], {"role": "assistant", "content": "42", "reasoning": "think hard", "tool_calls": None}]
    assert tok.render(chat, add_generation_prompt=False) == _hf_render(hf, chat)
    assert "<think>\nthink hard\n</think>" in tok.render(chat, add_generation_prompt=False)


def test_generation_tag_and_loop_controls(tmp_path):
    src = ("{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
           "{% if m.role == 'assistant' %}{% generation %}A: {{ m.content }}{% endgeneration %}"
           "{% else %}U: {{ m.content }}{% endif %}\n{% endfor %}")
    path = build_checkpoint(tmp_path / "gen", src, ["<eos>"], eos="<eos>")
    tok = ChatTokenizer.load(path)
    assert tok.render(CHAT, add_generation_prompt=False) == _hf_render(_hf(path), CHAT)


def test_named_templates_pick_tool_use_with_tools(ckpts, tmp_path):
    """tokenizer_config.json's list of named templates (as NousResearch Hermes ships): tool_use with tools."""
    path = tmp_path / "hermes"
    build_checkpoint(path, "unused", QWEN_SPECIAL, QWEN_PLAIN, eos="<|im_end|>")
    (path / "chat_template.jinja").unlink()
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "default", "template": _template("qwen3")},
                               {"name": "tool_use", "template": _template("qwen2_5")}]
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    tok, hf = ChatTokenizer.load(path), _hf(path)
    for tools in (None, TOOLS):
        want = _hf_render(hf, CHAT, tools=tools, add_generation_prompt=True)
        assert tok.render(CHAT, tools=tools, add_generation_prompt=True) == want
    assert "You are Qwen" in tok.render(CHAT[1:], tools=TOOLS, add_generation_prompt=True)
    assert "You are Qwen" not in tok.render(CHAT[1:], add_generation_prompt=True)
    only_tools = ChatTokenizer.load(path, template="tool_use")
    assert "You are Qwen" in only_tools.render(CHAT[1:], add_generation_prompt=True)


def test_template_from_chat_template_json(ckpts, tmp_path):
    path = build_checkpoint(tmp_path / "legacy", _template("qwen2_5"), LLAMA_SPECIAL, eos="<|eot_id|>",
                            bos="<|begin_of_text|>")
    (path / "chat_template.jinja").unlink()
    (path / "chat_template.json").write_text(json.dumps({"chat_template": _template("llama3")}))
    got = ChatTokenizer.load(path).render(CHAT, add_generation_prompt=True)
    assert got == _hf_render(_hf(path), CHAT, add_generation_prompt=True, chat_template=_template("llama3"))


def test_stop_ids_are_eos_and_every_generation_config_id(ckpts):
    tok = ChatTokenizer.load(ckpts["llama3"])
    vocab = _hf(ckpts["llama3"]).get_vocab()
    assert tok.eos_token_ids == (vocab["<|eot_id|>"], vocab["<|end_of_text|>"])
    assert tok.vocab_size == len(vocab)
    assert ChatTokenizer.load(ckpts["mistral"]).eos_token_ids == (vocab_id := _hf(ckpts["mistral"]).eos_token_id,)
    assert vocab_id is not None


def test_encode_maps_special_text_and_decode_skips_it(ckpts):
    tok = ChatTokenizer.load(ckpts["qwen2_5"])
    ids = tok.encode("<|im_start|>user\nhello<|im_end|>")
    assert ids[0] == tok.encode("<|im_start|>")[0] and len(tok.encode("<|im_end|>")) == 1
    assert tok.decode(ids) == "user\nhello"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhello<|im_end|>"


# --- (b) a multi-turn episode keeps the exact server tokens ------------------------------------------

class Episode:
    """Drives a Transcript as the agent loop does and records what each generated token must be."""

    def __init__(self, tok: ChatTokenizer, messages, **kw):
        self.tok = tok
        self.t = Transcript(tok, messages, **kw)
        self.generated: dict[int, tuple[int, float, int]] = {}  # position -> (id, logprob, version)
        self.step = 0

    def turn(self, ids: list[int], versions=(0,)) -> str:
        """Stream `ids` in len(versions) chunks, the k-th chunk tagged with versions[k]."""
        cut = max(1, len(ids) // len(versions))
        for k, version in enumerate(versions):
            chunk = ids[k * cut:] if k == len(versions) - 1 else ids[k * cut:(k + 1) * cut]
            logps = [-(self.step + i + 1) / 100 for i in range(len(chunk))]
            for i, (tid, lp) in enumerate(zip(chunk, logps, strict=True)):
                self.generated[len(self.t) + i] = (tid, lp, version)
            self.t.append_generation(chunk, logps, version)
            self.step += len(chunk)
        return self.t.end_turn()

    def check(self):
        t = self.t
        assert len(t.tokens) == len(t.loss_mask) == len(t.behav_logp) == len(t.versions)
        for pos in range(len(t)):
            if pos in self.generated:
                assert (t.tokens[pos], t.behav_logp[pos], t.versions[pos]) == self.generated[pos]
                assert t.loss_mask[pos] == 1
            else:
                assert (t.loss_mask[pos], t.versions[pos], t.behav_logp[pos]) == (0, -1, 0.0)


def _ids(tok, text):
    return tok.encode(text)


def _bytes(tok, word):
    """`word` spelt one byte token at a time: what a model may sample, never what encode() gives."""
    return [tok._tok.token_to_id(ch) for ch in word]


def test_qwen2_5_episode_with_tools_extends_exactly(ckpts):
    tok, hf = ChatTokenizer.load(ckpts["qwen2_5"]), _hf(ckpts["qwen2_5"])
    end = tok.encode("<|im_end|>")
    ep = Episode(tok, CHAT[:2], tools=TOOLS)
    assert list(ep.t.tokens) == _hf_ids(hf, CHAT[:2], tools=TOOLS, add_generation_prompt=True)
    assert ep.t.prompt_len == len(ep.t)
    texts = []
    hello = _bytes(tok, "hello")
    assert hello != tok.encode("hello")  # the byte split is not what re-tokenizing the text gives
    texts.append(ep.turn(_ids(tok, "Sure thing:") + end, versions=(3, 4)))
    assert ep.t.add_message("user", "guess a number") > 0
    texts.append(ep.turn(hello + _ids(tok, " again") + end, versions=(4,)))
    ep.t.add_message("user", "and the weather?")
    tool_call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    texts.append(ep.turn(_ids(tok, tool_call) + end, versions=(5, 5, 6)))
    ep.t.add_messages([{"role": "tool", "content": "sunny"}, {"role": "tool", "content": "21 C"}])
    texts.append(ep.turn(_ids(tok, "the weather is sun"), versions=(6,)))  # cut by length: no EOS
    ep.t.add_message("user", "higher")
    texts.append(ep.turn(_ids(tok, "Paris is.") + end, versions=(7,)))
    n = ep.t.add_message("user", "correct")
    assert tok.decode(ep.t.tokens[-n:], skip_special_tokens=False) == (
        "\n<|im_start|>user\ncorrect<|im_end|>\n<|im_start|>assistant\n")
    assert texts == ["Sure thing:", "hello again", tool_call, "the weather is sun", "Paris is."]
    assert [m["content"] for m in ep.t.messages if m["role"] == "assistant"] == texts
    ep.check()
    assert ep.t.divergences == 0
    full = _hf_render(hf, ep.t.messages, tools=TOOLS, add_generation_prompt=True)
    assert tok.decode(ep.t.tokens, skip_special_tokens=False) == full
    assert "the weather is sun<|im_end|>" in full  # the cut turn was closed by the template's EOS text
    starts = sorted(pos for pos in ep.generated if pos - 1 not in ep.generated)
    assert [s for s, _ in ep.t.turns] == starts  # each turn's span starts at its first generated token
    assert sum(e - s for s, e in ep.t.turns) == len(ep.generated)


@pytest.mark.parametrize("name", ["llama3", "llama3_2"])
def test_llama3_episode_extends_exactly(ckpts, name):
    tok, hf = ChatTokenizer.load(ckpts[name]), _hf(ckpts[name])
    kw = {"date_string": "26 Jul 2024"}
    eot = tok.encode("<|eot_id|>")
    ep = Episode(tok, CHAT[:2], template_kwargs=kw)
    assert list(ep.t.tokens) == _hf_ids(hf, CHAT[:2], add_generation_prompt=True, **kw)
    for k, text in enumerate(["Sure thing:", "hello again", "the answer is 42", "Paris", "higher"]):
        ids = _bytes(tok, "hello") + _ids(tok, text) if k == 1 else _ids(tok, text)
        ep.turn(ids + eot, versions=(k, k + 1))
        ep.t.add_message("user", f"turn {k}")
    ep.check()
    assert ep.t.divergences == 0
    assert tok.decode(ep.t.tokens, skip_special_tokens=False) == _hf_render(
        hf, ep.t.messages, add_generation_prompt=True, **kw)


def test_llama3_trimmed_content_diverges_once_and_keeps_tokens(ckpts):
    """Llama 3 trims content: a turn cut after a space is re-rendered without it; later turns extend."""
    tok = ChatTokenizer.load(ckpts["llama3"])
    eot = tok.encode("<|eot_id|>")
    ep = Episode(tok, CHAT[:2])
    ep.turn(_ids(tok, "hello "), versions=(1,))  # cut by length after a space
    n = ep.t.add_message("user", "go on")
    assert tok.decode(ep.t.tokens[-n:], skip_special_tokens=False) == (
        "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\ngo on<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    for k in range(3):
        ep.turn(_ids(tok, f"the answer is {k}") + eot, versions=(2 + k,))
        ep.t.add_message("user", "and?")
    ep.check()
    assert ep.t.divergences == 1


def test_stop_on_another_eos_keeps_it_and_skips_the_templates_eos(ckpts):
    """The model ended on <|end_of_text|> (a generation-config stop id), the template writes <|eot_id|>."""
    tok = ChatTokenizer.load(ckpts["llama3"])
    ep = Episode(tok, CHAT[:2])
    ep.turn(_ids(tok, "Paris") + tok.encode("<|end_of_text|>"), versions=(1,))
    n = ep.t.add_message("user", "thanks")
    assert tok.decode(ep.t.tokens[-n:], skip_special_tokens=False) == (
        "<|start_header_id|>user<|end_header_id|>\n\nthanks<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    ep.check()
    assert ep.t.divergences == 1


def test_mistral_template_writes_eos_itself_and_nothing_after_it(ckpts):
    tok, hf = ChatTokenizer.load(ckpts["mistral"]), _hf(ckpts["mistral"])
    eos = tok.encode("</s>")
    ep = Episode(tok, [{"role": "user", "content": "hello"}])
    for k, text in enumerate(["Sure thing:", "the answer is 42", "Paris is."]):
        ep.turn(_ids(tok, text) + (eos if k != 1 else []), versions=(k,))  # turn 1 is cut: no EOS
        n = ep.t.add_message("user", f"turn {k}")
        assert tok.decode(ep.t.tokens[-n:], skip_special_tokens=False) == (
            ("</s>" if k == 1 else "") + f"[INST] turn {k} [/INST]")
    ep.check()
    assert ep.t.divergences == 0
    assert tok.decode(ep.t.tokens, skip_special_tokens=False) == _hf_render(hf, ep.t.messages)


# --- (c) Qwen3 drops earlier turns' thinking: divergences counted, tokens kept -------------------------

def test_qwen3_thinking_diverges_and_keeps_exact_tokens(ckpts):
    tok = ChatTokenizer.load(ckpts["qwen3"])
    end = tok.encode("<|im_end|>")
    ep = Episode(tok, CHAT[:2])
    for k in range(5):
        think = f"<think>\nI should say {k}\n</think>\n\n"
        text = ep.turn(_ids(tok, think) + _bytes(tok, "hello") + _ids(tok, f" {k}") + end, versions=(k,))
        assert text == f"{think}hello {k}"  # <think> is a plain added token: the action keeps it
        n = ep.t.add_message("user", f"obs {k}")
        assert tok.decode(ep.t.tokens[-n:], skip_special_tokens=False) == (
            f"\n<|im_start|>user\nobs {k}<|im_end|>\n<|im_start|>assistant\n")
    ep.check()
    assert ep.t.divergences == 5
    # The template's render of the same conversation has no thinking left; the sequence keeps all of it.
    rendered = tok.render(ep.t.messages, add_generation_prompt=True)
    assert "<think>" not in rendered
    assert tok.decode(ep.t.tokens, skip_special_tokens=False).count("<think>") == 5


def test_qwen3_thinking_between_tool_calls_extends_exactly(ckpts):
    """After tool responses (not a new query) Qwen3 keeps the thinking, so the render extends exactly."""
    tok, hf = ChatTokenizer.load(ckpts["qwen3"]), _hf(ckpts["qwen3"])
    end = tok.encode("<|im_end|>")
    ep = Episode(tok, CHAT[:2], tools=TOOLS)
    for k in range(5):
        call = f'<tool_call>\n{{"name": "get_weather", "arguments": {{"city": "c{k}"}}}}\n</tool_call>'
        ep.turn(_ids(tok, f"<think>\nI should call the tool {k}\n</think>\n\n{call}") + end, versions=(k,))
        ep.t.add_message("tool", f"sunny {k}")
    ep.check()
    assert ep.t.divergences == 0
    full = _hf_render(hf, ep.t.messages, tools=TOOLS, add_generation_prompt=True)
    assert tok.decode(ep.t.tokens, skip_special_tokens=False) == full


# --- tokenizers that prefix a space (SentencePiece style) ---------------------------------------------

def test_delta_of_a_prefix_space_tokenizer_has_no_spurious_space(tmp_path):
    path = build_checkpoint(tmp_path / "sp", _template("mistral"), ["<s>", "</s>"], eos="</s>", bos="<s>",
                            metaspace=True)
    tok, hf = ChatTokenizer.load(path), _hf(path)
    head, tail = "<s>[INST] hello [/INST]Paris</s>", "[INST] the answer [/INST]"
    assert tok.encode(tail) != tok.encode(head + tail)[len(tok.encode(head)):]  # alone, it gains a "▁"
    assert tok.encode(head) + tok.encode_continuation(tail) == hf.encode(head + tail, add_special_tokens=False)


# --- the tiny reference model's checkpoint -------------------------------------------------------------

def test_tiny_reference_checkpoint_runs_a_three_turn_transcript(tiny_model_dir):
    tok, hf = ChatTokenizer.load(tiny_model_dir), _hf(tiny_model_dir)
    assert tok.eos_token_ids == (hf.eos_token_id,)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    ep = Episode(tok, msgs)
    assert list(ep.t.tokens) == _hf_ids(hf, msgs, add_generation_prompt=True)
    end = tok.encode("<|end|>")
    for k in range(3):
        ep.turn(_ids(tok, f"answer {k}") + (end if k != 1 else []), versions=(k,))
        ep.t.add_message("user", f"obs {k}")
    ep.check()
    assert ep.t.divergences == 0
    assert tok.decode(ep.t.tokens, skip_special_tokens=False) == _hf_render(
        hf, ep.t.messages, add_generation_prompt=True)
    # The tiny model stops on <|eos|>, which its template never writes (it ends turns with <|end|>): the
    # stop token stays, the template's <|end|> follows, and the mismatch is counted.
    ep.turn(_ids(tok, "done") + tok.encode("<|eos|>"), versions=(3,))
    n = ep.t.add_message("user", "bye")
    assert tok.decode(ep.t.tokens[-n:], skip_special_tokens=False) == "<|end|><|user|>bye<|end|><|assistant|>"
    ep.check()
    assert ep.t.divergences == 1


# --- (d) bad inputs: clear errors -----------------------------------------------------------------------

def test_missing_path(tmp_path):
    with pytest.raises(TokenizerLoadError, match=f"{tmp_path / 'nope'}: no such checkpoint directory"):
        ChatTokenizer.load(tmp_path / "nope")


def test_no_tokenizer_json(ckpts, tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(TokenizerLoadError, match="no tokenizer.json"):
        ChatTokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerLoadError, match="not a tokenizers file"):
        ChatTokenizer.load(tmp_path)


def test_no_chat_template(tmp_path):
    path = build_checkpoint(tmp_path / "bare", "x", ["<eos>"], eos="<eos>")
    (path / "chat_template.jinja").unlink()
    with pytest.raises(TokenizerLoadError, match=f"{path}: no chat template"):
        ChatTokenizer.load(path)


def test_bad_config_files(tmp_path):
    path = build_checkpoint(tmp_path / "bad", "x", ["<eos>"], eos="<eos>")
    (path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(TokenizerLoadError, match="tokenizer_config.json: not readable JSON"):
        ChatTokenizer.load(path)
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": 7}))
    (path / "chat_template.jinja").unlink()
    with pytest.raises(TokenizerLoadError, match="chat_template is int, expected a string or a list"):
        ChatTokenizer.load(path)


def test_named_templates_without_default(tmp_path):
    path = build_checkpoint(tmp_path / "named", "x", ["<eos>"], eos="<eos>")
    (path / "chat_template.jinja").unlink()
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "a", "template": "A"}, {"name": "b", "template": "B"}]}))
    with pytest.raises(TokenizerLoadError, match=r"none named 'default'; pass template= one of \['a', 'b'\]"):
        ChatTokenizer.load(path)
    assert ChatTokenizer.load(path, template="b").render([], add_generation_prompt=False) == "B"
    with pytest.raises(TokenizerLoadError, match="no chat template named 'c'"):
        ChatTokenizer.load(path, template="c")


def test_template_syntax_error_names_the_checkpoint(tmp_path):
    path = build_checkpoint(tmp_path / "syntax", "{% for m in messages %}{{ m }}", ["<eos>"], eos="<eos>")
    with pytest.raises(ChatTemplateError, match=f"chat template of {path} \\(default\\): line 1: "):
        ChatTokenizer.load(path)


def test_template_that_raises(ckpts):
    tok = ChatTokenizer.load(ckpts["mistral"])
    with pytest.raises(ChatTemplateError, match="Conversation roles must alternate"):
        tok.render(CHAT, add_generation_prompt=True)
    with pytest.raises(ChatTemplateError, match="Conversation roles must alternate"):
        Transcript(tok, CHAT)
    llama = ChatTokenizer.load(ckpts["llama3_2"])
    with pytest.raises(ChatTemplateError, match=f"{ckpts['llama3_2']}: TemplateError: Cannot put tools"):
        llama.render([{"role": "system", "content": "x"}], add_generation_prompt=True, tools=TOOLS)
    with pytest.raises(ChatTemplateError, match=r"tools\[0\] is str, expected a JSON-schema dict"):
        llama.render(CHAT, add_generation_prompt=True, tools=["get_weather"])
    with pytest.raises(ChatTemplateError, match=r"messages\[0\] is str, expected a dict"):
        llama.render(["hi"], add_generation_prompt=True)


def test_sandbox_refuses_private_attributes(tmp_path):
    src = "{% set ns = namespace(_x=1) %}{{ ns }}"
    tok = ChatTokenizer.load(build_checkpoint(tmp_path / "sandbox", src, ["<eos>"], eos="<eos>"))
    with pytest.raises(ChatTemplateError, match="underscore-prefixed"):
        tok.render([], add_generation_prompt=False)


def test_transcript_calls_out_of_order(ckpts):
    tok = ChatTokenizer.load(ckpts["qwen2_5"])
    t = Transcript(tok, CHAT[:2])
    with pytest.raises(TranscriptStateError, match="generation prompt is already in the sequence"):
        t.add_message("user", "again")
    with pytest.raises(ValueError, match="2 token ids but 1 logprobs"):
        t.append_generation([1, 2], [0.0], 0)
    t.append_generation([5], [-0.5], 0)
    with pytest.raises(TranscriptStateError, match="call end_turn first"):
        t.add_message("user", "x")
    t.end_turn()
    with pytest.raises(TranscriptStateError, match="append_generation after end_turn"):
        t.append_generation([5], [-0.5], 0)
    with pytest.raises(TranscriptStateError, match="no assistant turn is open"):
        t.end_turn()
    assert len(t) == t.prompt_len + 1 and t.loss_mask[-1] == 1


def test_empty_turn_then_observation(ckpts):
    tok = ChatTokenizer.load(ckpts["qwen2_5"])
    t = Transcript(tok, CHAT[:2])
    assert t.end_turn() == ""  # the model produced nothing (e.g. max_tokens=0)
    n = t.add_message("user", "hello")
    assert tok.decode(t.tokens[-n:], skip_special_tokens=False) == (
        "<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n")
    assert t.divergences == 0 and t.turns == [(t.prompt_len, t.prompt_len)]


def test_engine_side_imports_no_torch_or_transformers(ckpts):
    """Load, render and run a turn in a fresh interpreter: neither torch nor transformers gets imported."""
    import subprocess
    import sys

    code = (
        "import sys; from tidal.engine.chat import ChatTokenizer, Transcript;"
        f"tok = ChatTokenizer.load({str(ckpts['qwen3'])!r});"
        "t = Transcript(tok, [{'role': 'user', 'content': 'hi'}]);"
        "ids = tok.encode('<think>\\nx\\n</think>\\n\\nok<|im_end|>'); t.append_generation(ids, [0.0] * len(ids), 0);"
        "t.end_turn(); t.add_message('user', 'again');"
        "bad = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers'});"
        "print(bad, t.divergences); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.split() == ["[]", "1"]
