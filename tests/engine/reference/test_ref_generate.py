"""`/generate` of the reference server against the contract (§1) and a direct forward pass.

Logprobs are checked against the definition the trainer relies on (runner.py): the sampled token's
log-probability under softmax(logits / T) over the full vocabulary, T = 1 when greedy.
"""

import asyncio

import pytest
import torch
from refserver_http import LiveStream, get, post, stream

META_KEYS = {"id", "finish_reason", "prompt_tokens", "completion_tokens", "cached_tokens", "weight_version",
             "e2e_latency", "num_retractions", "reasoning_tokens", "weight_versions",
             "output_token_logprobs_length", "input_token_logprobs", "output_token_logprobs"}

PROMPT = [9, 40, 77, 120, 33]


def teacher_forced(model, prompt: list[int], output: list[int], temperature: float = 1.0):
    """One forward pass over prompt + output: for each output position, the logprob of the token
    taken under log softmax(logits / T) and the greedy (argmax) choice there."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + output])).logits[0].float()
    steps = logits[len(prompt) - 1: len(prompt) - 1 + len(output)]
    logp = torch.log_softmax(steps / temperature, dim=-1)
    return logp[torch.arange(len(output)), torch.tensor(output)].tolist(), steps.argmax(-1).tolist()


def direct_logprobs(model, prompt: list[int], output: list[int], temperature: float) -> list[float]:
    return teacher_forced(model, prompt, output, temperature)[0]


async def gen(server, body):
    return await post(server.url + "/generate", body)


async def test_non_stream_response_matches_contract_and_forward_pass(model_server, tiny_model):
    model, _ = tiny_model
    status, body = await gen(model_server, {
        "input_ids": PROMPT, "rid": "traj7-turn2", "return_logprob": True,
        "sampling_params": {"max_new_tokens": 6, "temperature": 0},
    })
    assert status == 200
    assert set(body) == {"text", "output_ids", "meta_info"}
    meta = body["meta_info"]
    assert META_KEYS <= set(meta)
    assert meta["id"] == "traj7-turn2"
    assert meta["finish_reason"] == {"type": "length", "length": 6}
    assert meta["prompt_tokens"] == 5 and meta["completion_tokens"] == 6 and meta["cached_tokens"] == 0
    assert meta["weight_version"] == "default"
    assert meta["weight_versions"] == [{"version": "default", "start": 0, "end": 6}]
    assert meta["input_token_logprobs"] == []
    assert meta["output_token_logprobs_length"] == 6
    expected, greedy = teacher_forced(model, PROMPT, body["output_ids"])
    assert body["output_ids"] == greedy
    triples = meta["output_token_logprobs"]
    assert [t[1] for t in triples] == body["output_ids"] and all(t[2] is None for t in triples)
    assert [t[0] for t in triples] == pytest.approx(expected, abs=1e-4)


async def test_sampled_logprobs_are_tempered_full_vocab(model_server, tiny_model):
    model, _ = tiny_model
    params = {"max_new_tokens": 8, "temperature": 0.7, "top_k": 5, "top_p": 0.9, "sampling_seed": 123}
    _, a = await gen(model_server, {"input_ids": PROMPT, "return_logprob": True, "sampling_params": params})
    _, b = await gen(model_server, {"input_ids": PROMPT, "return_logprob": True, "sampling_params": params})
    assert a["output_ids"] == b["output_ids"], "sampling_seed makes sampling reproducible"
    got = [t[0] for t in a["meta_info"]["output_token_logprobs"]]
    # before top-k/top-p: the tempered full-vocabulary distribution, not the truncated one
    assert got == pytest.approx(direct_logprobs(model, PROMPT, a["output_ids"], 0.7), abs=1e-4)


async def test_stop_token_is_kept_with_its_logprob(model_server, tiny_model):
    model, _ = tiny_model
    greedy8 = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}
    _, body = await gen(model_server, {"input_ids": PROMPT, "sampling_params": greedy8})
    free = body["output_ids"]
    assert free == teacher_forced(model, PROMPT, free)[1]
    stop = free[3]
    first = free.index(stop)
    _, body = await gen(model_server, {"input_ids": PROMPT, "return_logprob": True,
                                       "sampling_params": {**greedy8, "stop_token_ids": [stop]}})
    assert body["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert body["output_ids"] == free[: first + 1]
    triples = body["meta_info"]["output_token_logprobs"]
    assert len(triples) == first + 1 and triples[-1][1] == stop
    assert triples[-1][0] == pytest.approx(direct_logprobs(model, PROMPT, free[: first + 1], 1.0)[-1], abs=1e-4)


async def test_eos_stops_unless_ignored(model_server, tiny_model):
    _, tok = tiny_model
    eos = tok.eos_token_id
    bias = {"logit_bias": {str(eos): 100.0}, "max_new_tokens": 4, "temperature": 0}
    _, body = await gen(model_server, {"input_ids": PROMPT, "sampling_params": bias})
    assert body["output_ids"] == [eos] and body["text"] == ""
    assert body["meta_info"]["finish_reason"] == {"type": "stop", "matched": eos}
    _, body = await gen(model_server, {"input_ids": PROMPT, "sampling_params": {**bias, "ignore_eos": True}})
    assert body["output_ids"] == [eos] * 4
    assert body["meta_info"]["finish_reason"] == {"type": "length", "length": 4}


async def test_stop_string_trimmed_unless_no_stop_trim(model_server, tiny_model):
    _, tok = tiny_model
    z = tok.convert_tokens_to_ids("Z")
    params = {"logit_bias": {str(z): 100.0}, "max_new_tokens": 10, "temperature": 0, "stop": ["ZZZ"]}
    _, body = await gen(model_server, {"text": "hi", "sampling_params": params})
    assert body["meta_info"]["finish_reason"] == {"type": "stop", "matched": "ZZZ"}
    assert body["output_ids"] == [z, z, z] and body["text"] == ""
    _, body = await gen(model_server, {"text": "hi", "sampling_params": {**params, "no_stop_trim": True}})
    assert body["text"] == "ZZZ"
    _, events, _ = await stream(model_server.url + "/generate", {"text": "hi", "stream": True, "sampling_params": params})
    assert [e["text"] for e in events] == [""] * len(events), "a possible stop-string prefix is held back"
    assert events[-1]["output_ids"] == [z, z, z]
    assert body["meta_info"]["prompt_tokens"] == len(tok("hi")["input_ids"])


async def test_zero_max_new_tokens_and_min_new_tokens(model_server, tiny_model):
    _, tok = tiny_model
    _, body = await gen(model_server, {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 0}})
    assert body["output_ids"] == [] and body["meta_info"]["finish_reason"] == {"type": "length", "length": 0}
    eos = tok.eos_token_id
    params = {"logit_bias": {str(eos): 100.0}, "max_new_tokens": 5, "min_new_tokens": 3, "temperature": 0}
    _, body = await gen(model_server, {"input_ids": PROMPT, "sampling_params": params})
    assert eos not in body["output_ids"][:3] and body["output_ids"][3] == eos
    assert body["meta_info"]["finish_reason"] == {"type": "stop", "matched": eos}


async def test_input_and_top_logprobs(model_server, tiny_model):
    model, _ = tiny_model
    _, body = await gen(model_server, {
        "input_ids": PROMPT, "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": 3,
        "return_text_in_logprobs": True, "sampling_params": {"max_new_tokens": 3, "temperature": 0},
    })
    meta = body["meta_info"]
    inputs = meta["input_token_logprobs"]
    assert [t[1] for t in inputs] == PROMPT and inputs[0][0] is None
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([PROMPT])).logits[0].float(), -1)
    expected = [float(logp[i, PROMPT[i + 1]]) for i in range(len(PROMPT) - 1)]
    assert [t[0] for t in inputs[1:]] == pytest.approx(expected, abs=1e-4)
    tops = meta["output_top_logprobs"]
    assert len(tops) == 3 and all(len(t) == 3 for t in tops)
    for top, (lp, token, text) in zip(tops, meta["output_token_logprobs"], strict=True):
        assert top[0][1] == token and top[0][0] == pytest.approx(lp)  # greedy: the argmax is first
        assert isinstance(text, str)


async def test_batch_and_n(model_server, tiny_model):
    model, _ = tiny_model
    other = [50, 51]
    status, body = await gen(model_server, {"input_ids": [PROMPT, other], "rid": "b",
                                            "sampling_params": {"max_new_tokens": 3, "temperature": 0}})
    assert status == 200 and isinstance(body, list) and len(body) == 2
    assert [b["meta_info"]["id"] for b in body] == ["b_0", "b_1"]
    assert body[0]["output_ids"] == teacher_forced(model, PROMPT, body[0]["output_ids"])[1]
    assert body[1]["output_ids"] == teacher_forced(model, other, body[1]["output_ids"])[1]
    _, body = await gen(model_server, {"input_ids": PROMPT, "rid": "mine",
                                       "sampling_params": {"max_new_tokens": 2, "n": 3}})
    assert len(body) == 3 and len({b["meta_info"]["id"] for b in body} | {"mine"}) == 4


async def test_concurrent_requests_are_batched_and_exact(model_server, tiny_model):
    model, _ = tiny_model
    prompts = [PROMPT[: 2 + i % 4] + [60 + i] for i in range(6)]
    _, before = await get(model_server.url + "/server_info")
    steps_before = before["internal_states"][0]["num_decode_steps"]
    bodies = await asyncio.gather(*(gen(model_server, {
        "input_ids": p, "return_logprob": True,
        "sampling_params": {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True},
    }) for p in prompts))
    _, after = await get(model_server.url + "/server_info")
    state = after["internal_states"][0]
    assert state["max_batch_size_seen"] >= 2
    # 6 x 12 tokens took fewer steps than one step per token: decode steps were shared
    assert state["num_decode_steps"] - steps_before < 6 * 12
    for p, (_, body) in zip(prompts, bodies, strict=True):
        logprobs, greedy = teacher_forced(model, p, body["output_ids"])
        assert body["output_ids"] == greedy
        got = [t[0] for t in body["meta_info"]["output_token_logprobs"]]
        assert got == pytest.approx(logprobs, abs=1e-4)


async def test_cumulative_stream_matches_non_stream(model_server):
    body = {"input_ids": PROMPT, "return_logprob": True, "sampling_params": {"max_new_tokens": 5, "temperature": 0}}
    _, whole = await gen(model_server, body)
    status, events, done = await stream(model_server.url + "/generate", {**body, "stream": True})
    assert status == 200 and done
    assert [e["meta_info"]["finish_reason"] for e in events[:-1]] == [None] * (len(events) - 1)
    last = events[-1]
    assert last["output_ids"] == whole["output_ids"]  # cumulative: the last chunk holds everything
    assert last["meta_info"]["output_token_logprobs"] == whole["meta_info"]["output_token_logprobs"]
    assert "weight_versions" in last["meta_info"] and "e2e_latency" in last["meta_info"]
    assert all("weight_versions" not in e["meta_info"] for e in events[:-1])
    assert "response_sent_to_client_ts" in events[0]["meta_info"]
    assert all("response_sent_to_client_ts" not in e["meta_info"] for e in events[1:])
    for e in events:
        n = e["meta_info"]["completion_tokens"]
        assert len(e["output_ids"]) == n == len(e["meta_info"]["output_token_logprobs"])


async def test_stream_interval_coalesces(model_server):
    body = {"input_ids": PROMPT, "stream": True, "sampling_params": {"max_new_tokens": 9, "stream_interval": 4}}
    _, events, done = await stream(model_server.url + "/generate", body)
    counts = [e["meta_info"]["completion_tokens"] for e in events]
    assert done and counts[0] == 1 and counts[-1] == 9
    assert all(b - a >= 4 for a, b in zip(counts[:-2], counts[1:-1], strict=True))


@pytest.mark.parametrize(("body", "status", "envelope"), [
    (b"{not json", 400, "framework"),
    (b"", 400, "framework"),
    (b'{"input_ids": [1, 2], "sampling_params": {"temperature": "hot"}}', 400, "framework"),
    (b'{"input_ids": [1, 2], "sampling_params": {"max_tokens": 3}}', 400, "contract"),
    (b'{"input_ids": []}', 400, "request"),
    (b'{"sampling_params": {}}', 400, "request"),
    (b'{"text": []}', 400, "request"),
    (b'{"input_ids": [1, 2], "sampling_params": {"top_p": 1.5}}', 400, "request"),
    (b'{"input_ids": [1, 99999999]}', 400, "request"),
])
async def test_bad_generate_requests_get_error_envelopes(model_server, body, status, envelope):
    code, reply = await post(model_server.url + "/generate", None, raw=body)
    assert code == status
    if envelope == "framework":
        assert reply["object"] == "error" and reply["type"] == "Bad Request" and reply["code"] == 400
        assert reply["param"] is None and reply["message"]
    elif envelope == "contract":
        assert isinstance(reply["error"], str)
        assert reply["error"].startswith("unknown field `max_tokens`, expected one of `max_new_tokens`")
    else:
        assert set(reply) == {"error"} and isinstance(reply["error"]["message"], str)


async def test_null_sampling_values_mean_the_defaults_and_the_set_stays_closed(model_server):
    """§1.2: JSON null on any key of the closed set is the server's default; an unknown key in any
    item of a batch is the contract's 400, and a null `stream` (a plain bool upstream) the framework's."""
    nulls = dict.fromkeys(["min_new_tokens", "temperature", "top_p", "top_k", "min_p", "frequency_penalty",
                           "presence_penalty", "repetition_penalty", "stop", "stop_token_ids", "ignore_eos",
                           "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim", "n",
                           "stream_interval", "sampling_seed", "logit_bias", "json_schema", "regex"])
    status, body = await gen(model_server, {"input_ids": PROMPT, "return_logprob": None,
                                            "sampling_params": {**nulls, "max_new_tokens": 3}})
    assert status == 200 and 1 <= body["meta_info"]["completion_tokens"] <= 3
    assert "output_token_logprobs" not in body["meta_info"]
    status, reply = await gen(model_server, {"input_ids": [PROMPT, PROMPT],
                                             "sampling_params": [{"max_new_tokens": 1}, {"max_tokens": 1}]})
    assert status == 400 and reply["error"].startswith("unknown field `max_tokens`, expected one of")
    status, reply = await gen(model_server, {"input_ids": PROMPT, "stream": None})
    assert status == 400 and reply["type"] == "Bad Request" and "stream" in reply["message"]


async def test_range_error_and_duplicate_rid(model_server):
    _, reply = await post(model_server.url + "/generate",
                          {"input_ids": [1, 2], "sampling_params": {"top_p": 1.5}})
    assert reply == {"error": {"message": "top_p must be in (0, 1], got 1.5."}}
    status, events, done = await stream(model_server.url + "/generate",
                                        {"input_ids": [1, 2], "stream": True, "sampling_params": {"top_p": 1.5}})
    assert status == 200 and done and events == [{"error": {
        "message": "top_p must be in (0, 1], got 1.5.", "type": "invalid_request_error", "code": 400,
        "retryable": False}}]
    long = {"input_ids": PROMPT, "rid": "dup", "sampling_params": {"max_new_tokens": 400, "ignore_eos": True}}
    async with LiveStream(model_server.url, long) as first:  # in flight once its first event arrived
        status, reply = await gen(model_server, long)
        assert status == 400 and reply == {"error": {"message": "Duplicate request ID detected: dup"}}
        await post(model_server.url + "/abort_request", {"rid": "dup"})
        events = await first.finish()
    assert events[-1]["meta_info"]["id"] == "dup" and events[-1]["meta_info"]["finish_reason"]["type"] == "abort"
    status, body = await gen(model_server, {**long, "sampling_params": {"max_new_tokens": 1}})
    assert status == 200, "a rid is free again once its response arrived"


# --- information endpoints (§4) and the OpenAI-compatible routes (§5) ---------------------------


async def test_info_endpoints(model_server, tiny_model_dir):
    for path in ("/model_info", "/get_model_info"):
        status, info = await get(model_server.url + path)
        assert status == 200
        assert info["model_path"] == info["served_model_name"] == info["tokenizer_path"] == str(tiny_model_dir)
        assert info["is_generation"] is True and info["weight_version"] == "default"
        assert info["model_type"] == "llama" and info["architectures"] == ["LlamaForCausalLM"]
        assert {"preferred_sampling_params", "load_format", "has_image_understanding"} <= set(info)
    for path in ("/server_info", "/get_server_info"):
        status, info = await get(model_server.url + path)
        assert status == 200 and info["incremental_streaming_output"] is False
        assert info["port"] == int(model_server.url.rsplit(":", 1)[1])
        assert isinstance(info["internal_states"], list) and "max_req_input_len" in info
    status, models = await get(model_server.url + "/v1/models")
    assert models["object"] == "list" and len(models["data"]) == 1
    card = models["data"][0]
    assert card == {"id": str(tiny_model_dir), "object": "model", "created": card["created"],
                    "owned_by": "sglang", "root": str(tiny_model_dir), "parent": None, "max_model_len": 4096}
    status, missing = await get(model_server.url + "/v1/models/x")
    assert status == 404 and missing == {"error": {"message": "The model 'x' does not exist",
                                                   "type": "invalid_request_error", "param": "model",
                                                   "code": "model_not_found"}}
    for path in ("/health", "/health_generate", "/ready"):
        assert (await get(model_server.url + path))[0] == 200
    status, text = await get(model_server.url + "/metrics")
    assert status == 200 and "sglang:num_generated_tokens" in text


async def test_openai_completions_with_token_ids(model_server, tiny_model):
    model, _ = tiny_model
    status, body = await post(model_server.url + "/v1/completions", {
        "model": "x", "prompt": PROMPT, "max_tokens": 5, "temperature": 0, "logprobs": 2,
        "return_token_ids": True, "ignore_eos": True})
    assert status == 200 and body["object"] == "text_completion"
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length" and choice["prompt_token_ids"] == PROMPT
    ids = choice["token_ids"]
    logprobs, greedy = teacher_forced(model, PROMPT, ids)
    assert ids == greedy and choice["logprobs"]["token_logprobs"] == pytest.approx(logprobs, abs=1e-4)
    assert len(choice["logprobs"]["top_logprobs"]) == 5 and choice["logprobs"]["text_offset"] == [-1] * 5
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}
    assert body["metadata"]["weight_version"] == "default"
    status, events, done = await stream(model_server.url + "/v1/completions", {
        "prompt": PROMPT, "max_tokens": 5, "temperature": 0, "logprobs": 0, "stream": True,
        "return_token_ids": True, "ignore_eos": True})
    assert status == 200 and done
    assert sum((e["choices"][0]["token_ids"] for e in events), []) == ids
    assert sum((e["choices"][0]["logprobs"]["token_logprobs"] for e in events), []) == pytest.approx(logprobs, abs=1e-4)
    assert events[-1]["choices"][0]["finish_reason"] == "length"


async def test_openai_errors(model_server):
    status, body = await post(model_server.url + "/v1/completions",
                              {"prompt": "hi", "echo": True, "logprobs": 1})
    assert status == 400 and body["object"] == "error" and "logprobs" in body["message"]
    status, body = await post(model_server.url + "/v1/completions", None, raw=b'{"prompt": "hi"}',
                              headers={"Content-Type": "text/plain"})
    assert status == 400 and body["code"] == 400
    status, body = await post(model_server.url + "/v1/completions", {"prompt": [], "max_tokens": 2})
    assert status == 400


async def test_multi_turn_prompt_reuses_the_previous_turn(model_server, tiny_model):
    model, _ = tiny_model
    prompt = [20 + i for i in range(21)]
    params = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}
    _, first = await post(model_server.url + "/generate", {"input_ids": prompt, "sampling_params": params})
    assert first["meta_info"]["cached_tokens"] == 0
    turn2 = prompt + first["output_ids"] + [70, 71, 72]
    _, second = await post(model_server.url + "/generate", {"input_ids": turn2, "return_logprob": True,
                                                            "sampling_params": params})
    assert second["meta_info"]["cached_tokens"] == 32, "21 + 12 - 1 tokens held: two whole blocks of 16"
    with torch.no_grad():
        logits = model(torch.tensor([turn2 + second["output_ids"]])).logits[0].float()
    steps = torch.log_softmax(logits[len(turn2) - 1: -1], -1)
    out = second["output_ids"]
    assert out == steps.argmax(-1).tolist()
    expected = steps[torch.arange(len(out)), torch.tensor(out)].tolist()
    assert [t[0] for t in second["meta_info"]["output_token_logprobs"]] == pytest.approx(expected, abs=1e-4)
    _, info = await get(model_server.url + "/server_info")
    assert info["internal_states"][0]["prefix_cache_hit_tokens"] >= 32
    assert (await get(model_server.url + "/flush_cache"))[0] == 200
    _, third = await post(model_server.url + "/generate", {"input_ids": turn2, "sampling_params": params})
    assert third["meta_info"]["cached_tokens"] == 0 and third["output_ids"] == out


async def test_penalties_shape_the_logprobs(model_server, tiny_model):
    """SGLang applies penalties to the logits before the temperature, and the logprob is taken after
    them: repetition divides positive (multiplies negative) logits of every token seen so far;
    frequency subtracts 0.5 per earlier output occurrence, presence 0.25 once per output token."""
    model, _ = tiny_model
    params = {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True, "repetition_penalty": 1.5,
              "frequency_penalty": 0.5, "presence_penalty": 0.25}
    _, body = await gen(model_server, {"input_ids": PROMPT, "return_logprob": True, "sampling_params": params})
    out = body["output_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT + out])).logits[0].float()
    for i, token in enumerate(out):
        z = logits[len(PROMPT) - 1 + i].clone()
        seen = sorted(set(PROMPT) | set(out[:i]))
        z[seen] = torch.where(z[seen] > 0, z[seen] / 1.5, z[seen] * 1.5)
        for t in set(out[:i]):
            z[t] -= 0.5 * out[:i].count(t) + 0.25
        assert token == int(z.argmax())
        lp = body["meta_info"]["output_token_logprobs"][i][0]
        assert lp == pytest.approx(float(torch.log_softmax(z, -1)[token]), abs=1e-4)


async def test_batch_membership_changes_keep_outputs_exact(model_server, tiny_model):
    """Sequences leave the decode batch at different steps (kv.py rebuilds it from the rows of the
    ones still running): every output still equals its own teacher-forced greedy decode."""
    model, _ = tiny_model
    lengths = [3, 7, 11, 16, 24]
    prompts = [[30 + i] + PROMPT[: 1 + i] for i in range(len(lengths))]
    bodies = await asyncio.gather(*(gen(model_server, {
        "input_ids": p, "return_logprob": True,
        "sampling_params": {"max_new_tokens": n, "temperature": 0, "ignore_eos": True},
    }) for p, n in zip(prompts, lengths, strict=True)))
    for p, n, (_, body) in zip(prompts, lengths, bodies, strict=True):
        assert len(body["output_ids"]) == n
        logprobs, greedy = teacher_forced(model, p, body["output_ids"])
        assert body["output_ids"] == greedy
        assert [t[0] for t in body["meta_info"]["output_token_logprobs"]] == pytest.approx(logprobs, abs=1e-4)
