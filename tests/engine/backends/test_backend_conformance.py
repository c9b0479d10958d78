"""Conformance with docs/sglang.md, endpoint by endpoint.

Requests: the bodies the clients actually put on the wire (recorded by the scripted server) are
checked field by field against the contract's tables and examples. Responses: the contract's example
bodies, copied verbatim, decode through protocol/sglang.py into the values the contract states.
"""

import asyncio
import re

import msgspec
import pytest
from fake_sglang import FakeSGLang, token_at
from tidal.engine.backends import (
    BackendError,
    BadResponse,
    OpenAIBackend,
    OpenAIConfig,
    Request,
    Sampling,
    SGLangBackend,
    SGLangConfig,
)
from tidal.protocol import sglang as wire
from tidal.protocol.errors import ProtocolError

GENERATE_KEYS = {  # §1.1
    "text", "input_ids", "sampling_params", "rid", "stream", "return_logprob", "logprob_start_len",
    "top_logprobs_num", "token_ids_logprob", "return_text_in_logprobs", "lora_path", "session_id",
    "session_params", "routing_key", "routed_dp_rank", "extra_key", "cache_salt", "priority",
    "return_prompt_token_ids", "return_routed_experts",
}
SAMPLING_KEYS = {  # §1.2: the closed set (anything else is a 400 in 0.5.23)
    "max_new_tokens", "min_new_tokens", "temperature", "top_p", "top_k", "min_p", "frequency_penalty",
    "presence_penalty", "repetition_penalty", "stop", "stop_token_ids", "stop_regex", "ignore_eos",
    "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim", "n", "stream_interval",
    "sampling_seed", "logit_bias", "json_schema", "regex", "ebnf", "structural_tag", "custom_params",
    "beam_width", "watermark", "choice",
}


def client(*servers, **cfg) -> SGLangBackend:
    return SGLangBackend(SGLangConfig(urls=[s.url for s in servers], health_interval_s=60.0, **cfg))


async def drain(b, request: Request) -> list:
    return [c async for c in b.generate(request)]


# --- request bodies ------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [True, False])
async def test_generate_body(stream):
    sampling = Sampling(max_new_tokens=7, temperature=0.6, top_p=0.9, top_k=20, stop_token_ids=(2, 3),
                        stop=("\n\n",), seed=11)
    async with FakeSGLang() as s, client(s, stream=stream) as b:
        await drain(b, Request(input_ids=[1, 2, 3], request_id="traj7-turn2", sampling=sampling,
                               session_key="traj7"))
    (body,) = s.requests("/generate")
    assert s.routing_keys == ["traj7"]  # a router keeps the session together (§6)
    assert set(body) <= GENERATE_KEYS and set(body["sampling_params"]) <= SAMPLING_KEYS
    # token in (input_ids, never text), own rid, logprobs on, one sample: n is never sent (§1.5)
    assert body == {"input_ids": [1, 2, 3], "rid": "traj7-turn2", "return_logprob": True,
                    **({"stream": True} if stream else {}),
                    "sampling_params": {"max_new_tokens": 7, "temperature": 0.6, "top_p": 0.9, "top_k": 20,
                                        "stop_token_ids": [2, 3], "stop": ["\n\n"], "sampling_seed": 11}}


@pytest.mark.parametrize("incremental", [False, True])
async def test_a_coalesced_body_is_a_batch_of_the_same_fields_and_each_gets_its_own_tokens(incremental):
    sampling = Sampling(max_new_tokens=3, temperature=0.6, seed=11)
    async with FakeSGLang(incremental=incremental) as s, client(s, coalesce=4) as b:
        results = await asyncio.gather(*(drain(b, Request(input_ids=[1, 2, i], request_id=f"t{i}", sampling=sampling))
                                         for i in range(3)))
    (body,) = s.requests("/generate")
    # a batch (§1.5): a list of prompts, one sampling object and one rid per item, streamed
    assert body == {"input_ids": [[1, 2, 0], [1, 2, 1], [1, 2, 2]], "rid": ["t0", "t1", "t2"], "stream": True,
                    "return_logprob": True,
                    "sampling_params": [{"max_new_tokens": 3, "temperature": 0.6, "top_p": 1.0, "top_k": -1,
                                         "sampling_seed": 11}] * 3}
    for i, chunks in enumerate(results):
        assert [t for c in chunks for t in c.token_ids] == [token_at([1, 2, i], k) for k in range(3)]
        assert [lp for c in chunks for lp in c.logprobs] == [-0.01, -0.02, -0.03]
        assert chunks[-1].finish.reason == "length"


async def test_generate_body_always_states_the_sampling_policy():
    async with FakeSGLang() as s, client(s) as b:
        await drain(b, Request(input_ids=[4], request_id="r"))
    (body,) = s.requests("/generate")
    # what the policy samples with is always explicit: a server may have other preferred defaults (§4)
    assert body["sampling_params"] == {"max_new_tokens": 128, "temperature": 1.0, "top_p": 1.0, "top_k": -1}


async def test_generate_body_carries_the_configured_stream_interval():
    async with FakeSGLang() as s, client(s, stream_interval=4) as b:
        await drain(b, Request(input_ids=[4], request_id="r", sampling=Sampling(max_new_tokens=2)))
    assert s.requests("/generate")[0]["sampling_params"]["stream_interval"] == 4


async def test_abort_request_body():
    async with FakeSGLang(token_delay_s=0.01) as s, client(s) as b:
        task = asyncio.create_task(drain(b, Request(input_ids=[1], request_id="traj7-turn2",
                                                    sampling=Sampling(max_new_tokens=500))))
        while not s.requests("/generate"):
            await asyncio.sleep(0.005)
        await b.abort("traj7-turn2")
        chunks = await task
    assert s.requests("/abort_request") == [{"rid": "traj7-turn2"}]  # §4 example
    assert chunks[-1].finish.reason == "abort"


@pytest.mark.parametrize("mode", ["abort", "retract", "in_place"])
async def test_pause_and_continue_bodies(mode):
    async with FakeSGLang() as s, client(s, pause_mode=mode) as b:
        await b.pause()
        await b.resume()
    assert s.requests("/pause_generation") == [{"mode": mode}]
    assert s.requests("/continue_generation") == [{}]  # an object body, even when empty (§0)


@pytest.mark.parametrize("discipline", ["pause", "abort", "wait"])
async def test_update_weights_from_disk_body(discipline):
    async with FakeSGLang() as s, client(s, weight_update=discipline, pause_mode="in_place") as b:
        await b.update_weights_from_disk("/ckpt/step-18", 18)
    (body,) = s.requests("/update_weights_from_disk")
    expected = {"model_path": "/ckpt/step-18", "weight_version": "18"}
    if discipline == "pause":
        expected["flush_cache"] = False  # a flush fails while requests are held in place (§3.1)
    if discipline == "abort":
        expected["abort_all_requests"] = True
    assert body == expected
    assert [p for p, _ in s.bodies if p != "/update_weights_from_disk"] == (
        ["/pause_generation", "/continue_generation"] if discipline == "pause" else [])


async def test_weights_group_bodies_give_each_server_its_rank():
    async with FakeSGLang() as s1, FakeSGLang() as s2, client(s1, s2) as b:
        with pytest.raises(BackendError, match="world size 2, but this backend brings 1 \\+ 2 servers"):
            await b.init_weights_group("10.0.0.1", 29500, world_size=2)  # refused before any call
        assert await b.init_weights_group("10.0.0.1", 29500, world_size=3) == 3
        await b.destroy_weights_group()
    for rank, s in enumerate((s1, s2), start=1):  # slime: rank_offset = 1 + GPUs of earlier engines
        assert s.requests("/init_weights_update_group") == [{
            "master_address": "10.0.0.1", "master_port": 29500, "rank_offset": rank, "world_size": 3,
            "group_name": "weight_update_group", "backend": "gloo"}]
        # a group of that name left from an earlier formation is left before joining
        assert [p for p, _ in s.bodies] == ["/destroy_weights_update_group", "/init_weights_update_group",
                                            "/destroy_weights_update_group"]
        assert s.requests("/destroy_weights_update_group") == [{"group_name": "weight_update_group"}] * 2


@pytest.mark.parametrize("sessions", [True, False], ids=["begin-end", "older-server-404"])
async def test_update_weights_from_distributed_body(sessions):
    async with FakeSGLang(weight_sessions=sessions) as s, client(s) as b:
        versions = await b.update_weights_from_distributed(
            ["model.embed_tokens.weight", "lm_head.weight"], ["bfloat16", "bfloat16"], [[8, 4], [8, 4]], 19)
    assert versions == {s.url: 19}
    assert s.requests("/update_weights_from_distributed") == [{
        "names": ["model.embed_tokens.weight", "lm_head.weight"], "dtypes": ["bfloat16", "bfloat16"],
        "shapes": [[8, 4], [8, 4]], "group_name": "weight_update_group", "weight_version": "19",
        "flush_cache": False}]  # the default pause (in_place) holds KV: a flush would fail (§3.1)
    paths = [p for p, _ in s.bodies]
    inner = ["/begin_weight_update", "/update_weights_from_distributed", "/end_weight_update"] if sessions \
        else ["/update_weights_from_distributed"]
    assert paths == ["/pause_generation", *inner, "/continue_generation"]
    if sessions:
        assert s.requests("/begin_weight_update") == [{"selector": "all"}]
        assert s.requests("/end_weight_update") == [{}]


@pytest.mark.parametrize("discipline", ["pause", "abort", "wait"])
async def test_distributed_update_of_several_buckets_bodies(discipline):
    # One update, two buckets: the discipline holds around both, the session spans both, and only the
    # last bucket sets the version and flushes the cache, unless requests are held in place (§3.3, §3.5).
    names, dtypes, shapes = [["a", "b"], ["c"]], [["bfloat16"] * 2, ["float32"]], [[[2, 2], [4]], [[3]]]
    async with FakeSGLang(weight_sessions=True) as s, client(s, weight_update=discipline) as b:
        async with b.distributed_update(21, 2):
            first = await b.update_weights_from_distributed(names[0], dtypes[0], shapes[0], 21, group_name="g")
            last = await b.update_weights_from_distributed(names[1], dtypes[1], shapes[1], 21, group_name="g",
                                                           flattened=True)
    assert (first, last) == ({}, {s.url: 21})
    assert s.requests("/update_weights_from_distributed") == [
        {"names": ["a", "b"], "dtypes": ["bfloat16", "bfloat16"], "shapes": [[2, 2], [4]], "group_name": "g",
         "flush_cache": False},
        {"names": ["c"], "dtypes": ["float32"], "shapes": [[3]], "group_name": "g", "weight_version": "21",
         "load_format": "flattened_bucket", **({"flush_cache": False} if discipline == "pause" else {})}]
    # abort_all_requests never: with several buckets abort is a pause; an in_place pause never flushes
    inner = ["/begin_weight_update", "/update_weights_from_distributed", "/update_weights_from_distributed",
             "/end_weight_update"]
    paused = {"pause": ["in_place"], "abort": ["abort"], "wait": []}[discipline]
    assert [p for p, _ in s.bodies] == ["/pause_generation"] * len(paused) + inner + [
        "/continue_generation"] * len(paused)
    assert [r["mode"] for r in s.requests("/pause_generation")] == paused


async def test_v1_completions_body_and_stream():
    async with FakeSGLang() as s, OpenAIBackend(OpenAIConfig(urls=[s.url], model="m")) as o:
        chunks = await drain(o, Request(input_ids=[1, 2], request_id="c1", sampling=Sampling(
            max_new_tokens=3, temperature=0.5, top_k=4, stop_token_ids=(9,))))
        s.faults["c2"] = "no_token_ids"
        with pytest.raises(BadResponse, match="token_ids missing"):
            await drain(o, Request(input_ids=[1, 2], request_id="c2"))
    assert s.requests("/v1/completions")[0] == {
        "model": "m", "prompt": [1, 2], "max_tokens": 3, "temperature": 0.5, "top_p": 1.0, "top_k": 4,
        "stop_token_ids": [9],
        "stream": True, "logprobs": 0, "rid": "c1", "return_token_ids": True}
    assert [t for c in chunks for t in c.token_ids] == [token_at([1, 2], i) for i in range(3)]
    assert [lp for c in chunks for lp in c.logprobs] == [-0.01, -0.02, -0.03]
    assert (chunks[-1].finish.reason, chunks[-1].weight_version) == ("length", 0)


# --- response bodies: the contract's examples, verbatim -------------------------------------------

GENERATE_EXAMPLE = b"""{"text":" Paris.","output_ids":[12095,13,151645],
 "meta_info":{"id":"traj7-turn2","finish_reason":{"type":"stop","matched":151645},
  "prompt_tokens":6,"weight_version":"17","num_retractions":0,
  "input_token_logprobs":[],
  "output_token_logprobs":[[-0.0123,12095,null],[-0.4107,13,null],[-0.0021,151645,null]],
  "output_token_logprobs_length":3,
  "reasoning_tokens":0,"completion_tokens":3,"cached_tokens":0,
  "weight_versions":[{"version":"17","start":0,"end":3}],
  "cached_tokens_details":null,"e2e_latency":0.0731,"response_sent_to_client_ts":1764072301.52}}"""


def test_generate_response_example():
    r = wire.decode_generate(GENERATE_EXAMPLE)
    m = r.meta_info
    assert r.output_ids == [12095, 13, 151645] and m.id == "traj7-turn2"
    assert m.finish_reason == wire.Stop(matched=151645)
    assert [(e.logprob, e.token_id, e.text) for e in m.output_token_logprobs] == [
        (-0.0123, 12095, None), (-0.4107, 13, None), (-0.0021, 151645, None)]
    assert m.weight_versions == [wire.WeightVersionSpan("17", 0, 3)] and m.weight_version == "17"
    assert (m.prompt_tokens, m.completion_tokens, m.cached_tokens, m.input_token_logprobs) == (6, 3, 0, [])


@pytest.mark.parametrize("raw, expected", [
    (b'null', None),
    (b'{"type":"stop","matched":151645}', wire.Stop(matched=151645)),
    (b'{"type":"stop","matched":[2,3]}', wire.Stop(matched=[2, 3])),
    (b'{"type":"stop","matched":"\\n\\n"}', wire.Stop(matched="\n\n")),
    (b'{"type":"length","length":128}', wire.Length(length=128)),
    (b'{"type":"abort","message":"Aborted","status_code":null,"err_type":null}',
     wire.Abort(message="Aborted", status_code=None, err_type=None)),
    (b'{"type":"abort","message":"Abort in waiting queue"}', wire.Abort(message="Abort in waiting queue")),
    (b'{"type":"abort","message":"bad","status_code":400,"err_type":"BadRequestError"}',
     wire.Abort(message="bad", status_code=400, err_type="BadRequestError")),
])
def test_finish_reason_shapes(raw, expected):
    body = b'{"meta_info":{"id":"x","finish_reason":' + raw + b'}}'
    assert wire.decode_generate(body).meta_info.finish_reason == expected


def test_finish_reason_encodes_back_to_the_contract_shape():
    assert wire.encode(wire.Abort(message="Abort in waiting queue")) == (
        b'{"type":"abort","message":"Abort in waiting queue"}')
    assert wire.encode(wire.Length(length=128)) == b'{"type":"length","length":128}'


def test_queued_abort_without_counters_or_logprobs_decodes_with_defaults():
    m = wire.decode_generate(b'{"text":"","meta_info":{"id":"q","finish_reason":'
                             b'{"type":"abort","message":"Abort before prefill"},"completion_tokens":0}}').meta_info
    assert (m.prompt_tokens, m.cached_tokens, m.output_token_logprobs) == (0, 0, msgspec.UNSET)


def test_batch_and_stream_error_event():
    items = wire.decode_generate_batch(b'[{"text":"a","meta_info":{"id":"r_0"}},{"text":"b","meta_info":{"id":"r_1"}}]')
    assert [i.meta_info.id for i in items] == ["r_0", "r_1"]
    err = wire.decode_stream_event(b'{"error":{"message":"Duplicate request ID detected: r",'
                                   b'"type":"invalid_request_error","code":400,"retryable":false}}')
    assert err == wire.StreamError(wire.StreamErrorDetail("Duplicate request ID detected: r"))
    with pytest.raises(ProtocolError, match="meta_info"):
        wire.decode_stream_event(b'{"text":"a"}')


@pytest.mark.parametrize("body, message", [
    (b'{"object":"error","message":"bad type","type":"Bad Request","param":null,"code":400}', "bad type"),
    (b'{"error":"unknown field `max_tokens`, expected one of `max_new_tokens`"}', "unknown field `max_tokens`"),
    (b'{"error":{"message":"top_p must be in (0, 1], got 1.5."}}', "top_p must be in (0, 1], got 1.5."),
    (b'{"success":false,"message":"The group to be destroyed does not exist."}', "does not exist"),
    (b'{"error":"Unauthorized"}', "Unauthorized"),
    (b'Timed out waiting for idle state.', "Timed out waiting for idle state."),
])
def test_every_error_envelope_yields_its_message(body, message):
    assert message in wire.error_message(body)


def test_info_and_control_examples():
    info = msgspec.json.decode(
        b'{"model_path":"Qwen/Qwen3-0.6B","served_model_name":"Qwen/Qwen3-0.6B","tokenizer_path":"Qwen/Qwen3-0.6B",'
        b'"is_generation":true,"preferred_sampling_params":null,"weight_version":"default","load_format":"auto",'
        b'"reasoning_parser":null,"tool_call_parser":null,"disaggregation_mode":"null",'
        b'"has_image_understanding":false,"has_audio_understanding":false,"model_type":"qwen3",'
        b'"architectures":["Qwen3ForCausalLM"]}', type=wire.ModelInfo)
    assert (info.weight_version, info.architectures) == ("default", ["Qwen3ForCausalLM"])
    models = msgspec.json.decode(
        b'{"object":"list","data":[{"id":"Qwen/Qwen3-0.6B","object":"model","created":1764072301,'
        b'"owned_by":"sglang","root":"Qwen/Qwen3-0.6B","parent":null,"max_model_len":40960}]}', type=wire.ModelList)
    assert models.data[0].max_model_len == 40960
    done = msgspec.json.decode(b'{"success":true,"message":"Succeeded to update model weights. Weight version '
                               b'updated to 18.","num_paused_requests":0}', type=wire.ControlResponse)
    assert done.success and done.num_paused_requests == 0
    assert msgspec.json.decode(b'{"message":"Generation paused successfully.","status":"ok"}',
                               type=wire.StatusResponse).status == "ok"
    assert wire.encode(wire.UpdateWeightVersionRequest(new_version="18")) == (
        b'{"new_version":"18","abort_all_requests":true}')


@pytest.mark.parametrize("text, version", [("default", 0), ("", 0), ("0", 0), ("18", 18), ("007", 7),
                                           ("2147483647", 2**31 - 1)])
def test_weight_version_strings_read_as_policy_versions(text, version):
    """§1.3, §3.1: versions are strings on the wire; "default" is a server never updated, version 0."""
    assert wire.parse_weight_version(text, "http://a:1") == version


@pytest.mark.parametrize("text", ["v7", "-1", "1.5", " 3", "3 ", "\u00b2", "+3", "2147483648", "9" * 5000, "None"])
def test_weight_version_that_names_no_policy_version_names_the_server_and_the_value(text):
    with pytest.raises(ProtocolError, match=re.escape(f"http://a:1 reports weight version {text!r}"[:80])):
        wire.parse_weight_version(text, "http://a:1")


def test_unknown_sampling_key_is_rejected_as_0_5_23_does():
    with pytest.raises(msgspec.ValidationError, match="unknown field `max_tokens`"):
        msgspec.json.decode(b'{"max_tokens": 3}', type=wire.SamplingParams)


# --- the one schema both sides use: complete per the contract, lenient where SGLang is ------------


def test_schema_holds_the_contracts_closed_sampling_set_and_generate_keys():
    assert set(wire.SamplingParams.__struct_fields__) == SAMPLING_KEYS
    assert set(wire.GenerateRequest.__struct_fields__) == GENERATE_KEYS


def test_null_is_the_default_for_every_sampling_key_and_an_unset_struct_sends_nothing():
    params = msgspec.json.decode(msgspec.json.encode(dict.fromkeys(SAMPLING_KEYS)), type=wire.SamplingParams)
    assert all(getattr(params, k) is None for k in SAMPLING_KEYS)
    assert wire.encode(wire.SamplingParams()) == b"{}"
    assert wire.encode(wire.SamplingParams(ignore_eos=False, skip_special_tokens=True)) == b"{}"


def test_generate_request_takes_null_only_where_sglang_does():
    req = msgspec.json.decode(b'{"input_ids":[1],"return_logprob":null,"logprob_start_len":null}',
                              type=wire.GenerateRequest)
    assert (req.return_logprob, req.logprob_start_len, req.stream) == (None, None, False)
    with pytest.raises(msgspec.ValidationError, match="stream"):
        msgspec.json.decode(b'{"input_ids":[1],"stream":null}', type=wire.GenerateRequest)


def test_weight_requests_take_sglangs_defaults_when_keys_are_absent():
    init = msgspec.json.decode(b'{"master_address":"h","master_port":"29500","rank_offset":1,"world_size":2}',
                               type=wire.InitWeightsUpdateGroupRequest)
    assert (init.group_name, init.backend, init.master_port) == ("weight_update_group", "nccl", "29500")
    upd = msgspec.json.decode(b'{"names":[],"dtypes":[],"shapes":[]}', type=wire.UpdateWeightsFromDistributedRequest)
    assert (upd.group_name, upd.flush_cache, upd.selector) == (None, True, None)
    disk = msgspec.json.decode(b'{"model_path":"/c","is_async":true,"manifest":{"a":1}}',
                               type=wire.UpdateWeightsFromDiskRequest)
    assert wire.encode(disk) == b'{"model_path":"/c","is_async":true,"manifest":{"a":1}}'


def test_a_sender_leaves_out_keys_that_decode_to_defaults():
    meta = wire.MetaInfo(id="q", finish_reason=wire.Abort(message="Abort in waiting queue"),
                         prompt_tokens=msgspec.UNSET, cached_tokens=msgspec.UNSET)
    raw = msgspec.json.decode(wire.encode(meta))
    assert "prompt_tokens" not in raw and "cached_tokens" not in raw and raw["completion_tokens"] == 0
    choice = wire.CompletionChoice(text="a", token_ids=msgspec.UNSET, prompt_token_ids=msgspec.UNSET)
    assert set(msgspec.json.decode(wire.encode(choice))) == {"index", "text", "logprobs", "finish_reason",
                                                             "matched_stop"}
