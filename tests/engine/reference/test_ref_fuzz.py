"""Malformed `/generate` and control bodies: always a docs/sglang.md §0 envelope (200/400), never a crash."""

import json
import urllib.error
import urllib.request

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tidal.engine.reference.launch import ReferenceServer

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
sampling_keys = st.sampled_from(["max_new_tokens", "temperature", "top_p", "top_k", "stop", "stop_token_ids",
                                 "n", "min_new_tokens", "logit_bias", "ignore_eos", "max_tokens"])
generate_bodies = st.fixed_dictionaries({}, optional={
    "input_ids": st.one_of(st.lists(st.integers(-5, 200000), max_size=6), json_values),
    "text": st.one_of(st.text(max_size=10), json_values),
    "sampling_params": st.one_of(st.dictionaries(sampling_keys, json_values, max_size=4), json_values),
    "rid": json_values, "stream": st.booleans(), "return_logprob": json_values,
    "top_logprobs_num": json_values, "logprob_start_len": json_values,
})


@pytest.fixture(scope="module")
def fuzz_server():
    with ReferenceServer(simulate=True, args=["--fast"]) as srv:
        yield srv


def _post(url: str, data: bytes) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=generate_bodies)
def test_generate_never_crashes(fuzz_server, body):
    body.setdefault("sampling_params", {})
    params = body["sampling_params"]
    if isinstance(params, dict) and not (isinstance(params.get("max_new_tokens"), int) and
                                         params["max_new_tokens"] <= 64):
        params["max_new_tokens"] = 2  # keep every case short: lengths are not what is fuzzed here
    status, payload = _post(fuzz_server.url + "/generate", json.dumps(body).encode())
    assert status in (200, 400), payload
    if payload.startswith(b"data: "):
        assert payload.endswith(b"data: [DONE]\n\n")
    else:
        reply = json.loads(payload)
        if status == 400:
            assert "error" in reply or reply.get("object") == "error"


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/pause_generation", "/abort_request", "/update_weights_from_disk",
                             "/update_weight_version", "/init_weights_update_group", "/end_weight_update"]),
       body=json_values)
def test_control_endpoints_never_crash(fuzz_server, path, body):
    status, payload = _post(fuzz_server.url + path, json.dumps(body).encode())
    assert status in (200, 400), payload
    _post(fuzz_server.url + "/continue_generation", b"{}")
    with urllib.request.urlopen(fuzz_server.url + "/ready", timeout=30) as resp:
        assert resp.status == 200


completion_bodies = st.fixed_dictionaries({}, optional={
    "prompt": st.one_of(st.text(max_size=6), st.lists(st.integers(-3, 200000), max_size=4), json_values),
    "max_tokens": st.one_of(st.integers(-2, 4), json_values), "logprobs": json_values, "echo": json_values,
    "n": st.one_of(st.integers(-1, 3), json_values), "stop": json_values, "stream": st.booleans(),
    "temperature": json_values, "return_token_ids": json_values,
})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=completion_bodies)
def test_completions_never_crash(fuzz_server, body):
    if not (isinstance(body.get("max_tokens"), int) and body["max_tokens"] <= 64):
        body["max_tokens"] = 2
    status, payload = _post(fuzz_server.url + "/v1/completions", json.dumps(body).encode())
    assert status in (200, 400), payload
    if not payload.startswith(b"data: "):
        reply = json.loads(payload)
        assert status == 200 or reply["object"] == "error"
