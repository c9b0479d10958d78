"""Aborts, pause/continue (docs/sglang.md §2, §4) and weight updates (§3) of a real server with the tiny model.

This module's server streams incrementally (`--incremental-streaming-output`), so it also checks
that mode against the teacher-forced greedy tokens that the cumulative module checks too.
"""

import asyncio

import pytest
import torch
import torch.distributed as dist
from refserver_http import LiveStream, get, post, wait_running
from tidal.engine.reference.launch import ReferenceServer
from tidal.engine.reference.tiny import build_tiny_model

PROMPT = [11, 42, 99, 7]
LONG = {"max_new_tokens": 400, "ignore_eos": True, "temperature": 0}
ABORTED = {"type": "abort", "message": "Aborted", "status_code": None, "err_type": None}


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    args = ["--incremental-streaming-output", "--set", "server.health_timeout_s=1"]
    with ReferenceServer(tiny_model_dir, args=args) as srv:
        yield srv


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory):
    """Same architecture, different random weights."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model-b"), seed=1)


def greedy_check(model_dir, prompt, output) -> bool:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt + output])).logits[0]
    return logits[len(prompt) - 1: -1].argmax(-1).tolist() == output


async def generate(server, body):
    return await post(server.url + "/generate", body)


def concat(events: list[dict]) -> tuple[list[int], list[list]]:
    ids, logprobs = [], []
    for e in events:
        ids += e["output_ids"]
        logprobs += e["meta_info"].get("output_token_logprobs", [])
    return ids, logprobs


async def test_incremental_stream_gives_deltas_and_the_same_tokens(server, tiny_model_dir):
    body = {"input_ids": PROMPT, "return_logprob": True, "sampling_params": {**LONG, "max_new_tokens": 7}}
    status, info = await get(server.url + "/server_info")
    assert info["incremental_streaming_output"] is True
    async with LiveStream(server.url, body) as live:
        events = await live.finish()
    assert live.done
    ids, logprobs = concat(events)
    assert len(ids) == 7 and [t[1] for t in logprobs] == ids
    assert [e["meta_info"]["completion_tokens"] for e in events] == list(
        __import__("itertools").accumulate(len(e["output_ids"]) for e in events))
    assert events[-1]["meta_info"]["output_token_logprobs_length"] == 7
    _, whole = await generate(server, body)
    assert whole["output_ids"] == ids and whole["meta_info"]["output_token_logprobs"] == logprobs
    assert "".join(e["text"] for e in events) == whole["text"]
    assert greedy_check(tiny_model_dir, PROMPT, ids)


async def test_abort_mid_stream_returns_partial_output(server):
    async with LiveStream(server.url, {"input_ids": PROMPT, "rid": "victim", "return_logprob": True,
                                       "sampling_params": LONG}) as live:
        status, body = await post(server.url + "/abort_request", {"rid": "victim"})
        assert status == 200 and body == ""
        events = await live.finish()
    assert live.done
    last = events[-1]
    assert last["meta_info"]["finish_reason"] == ABORTED
    ids, logprobs = concat(events)
    assert 0 < len(ids) < 400 and len(logprobs) == len(ids)
    assert last["meta_info"]["completion_tokens"] == len(ids)
    status, body = await post(server.url + "/abort_request", {"rid": "no-such-request"})
    assert status == 200 and body == ""


async def test_abort_all_non_stream(server):
    task = asyncio.create_task(generate(server, {"input_ids": PROMPT, "sampling_params": LONG}))
    await wait_running(server.url)
    assert (await post(server.url + "/abort_request", {"abort_all": True}))[0] == 200
    status, body = await task
    assert status == 200 and body["meta_info"]["finish_reason"] == ABORTED
    assert len(body["output_ids"]) == body["meta_info"]["completion_tokens"] < 400


async def test_pause_abort_blocks_new_requests_until_continue(server):
    async with LiveStream(server.url, {"input_ids": PROMPT, "sampling_params": LONG}) as live:
        status, body = await post(server.url + "/pause_generation", {"mode": "abort"})
        assert (status, body) == (200, {"message": "Generation paused successfully.", "status": "ok"})
        events = await live.finish()
    assert events[-1]["meta_info"]["finish_reason"]["type"] == "abort"
    assert (await get(server.url + "/ready"))[0] == 503
    blocked = asyncio.create_task(generate(server, {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 3}}))
    await asyncio.sleep(0.5)
    assert not blocked.done(), "a /generate sent while paused waits for continue"
    assert (await get(server.url + "/health_generate"))[0] == 503, "the probe cannot run while paused"
    status, body = await post(server.url + "/continue_generation", {})
    assert (status, body) == (200, {"message": "Generation continued successfully.", "status": "ok"})
    status, body = await blocked
    assert status == 200 and body["meta_info"]["finish_reason"] == {"type": "length", "length": 3}
    assert (await get(server.url + "/ready"))[0] == 200


async def test_pause_retract_recomputes_and_counts(server):
    body = {"input_ids": PROMPT, "return_logprob": True, "sampling_params": {**LONG, "max_new_tokens": 200}}
    _, reference = await generate(server, body)
    async with LiveStream(server.url, body) as live:
        assert (await post(server.url + "/pause_generation", {"mode": "retract"}))[0] == 200
        _, info = await get(server.url + "/server_info")
        state = info["internal_states"][0]
        assert state["num_running_reqs"] == 0 and state["num_waiting_reqs"] == 1
        flushed = await post(server.url + "/flush_cache", {})
        assert flushed[0] == 200 and flushed[1].startswith("Cache flushed"), "retracted requests hold no KV"
        assert (await post(server.url + "/continue_generation", {}))[0] == 200
        events = await live.finish()
    ids, logprobs = concat(events)
    assert ids == reference["output_ids"], "recomputing the KV after a retraction changes nothing"
    lps = [t[0] for t in logprobs]
    assert lps == pytest.approx([t[0] for t in reference["meta_info"]["output_token_logprobs"]], abs=1e-4)
    assert events[-1]["meta_info"]["num_retractions"] == 1


async def test_in_place_update_from_disk_splits_version_spans(server, tiny_model_dir, other_model_dir):
    body = {"input_ids": PROMPT, "sampling_params": LONG}
    async with LiveStream(server.url, body) as live:
        assert (await post(server.url + "/pause_generation", {"mode": "in_place"}))[0] == 200
        status, reply = await post(server.url + "/flush_cache", {})
        assert status == 400, "in_place keeps KV: the cache cannot be flushed"
        status, reply = await post(server.url + "/update_weights_from_disk", {
            "model_path": str(other_model_dir), "weight_version": "1", "flush_cache": False})
        assert status == 200 and reply["success"] is True
        assert reply["message"] == "Succeeded to update model weights. Weight version updated to 1."
        assert reply["num_paused_requests"] == 1
        before = sum(len(e["output_ids"]) for e in live.events)
        assert (await post(server.url + "/continue_generation", {}))[0] == 200
        events = await live.finish()
    meta = events[-1]["meta_info"]
    spans = meta["weight_versions"]
    assert [s["version"] for s in spans] == ["default", "1"]
    assert spans[0]["start"] == 0 and spans[0]["end"] == spans[1]["start"] >= before and spans[1]["end"] == 400
    assert meta["weight_version"] == "1"
    _, info = await get(server.url + "/model_info")
    assert info["weight_version"] == "1" and info["model_path"] == str(other_model_dir)
    _, models = await get(server.url + "/v1/models")
    assert models["data"][0]["id"] == str(other_model_dir)
    _, fresh = await generate(server, {"input_ids": PROMPT, "sampling_params": {**LONG, "max_new_tokens": 8}})
    assert greedy_check(other_model_dir, PROMPT, fresh["output_ids"])
    assert fresh["meta_info"]["weight_versions"] == [{"version": "1", "start": 0, "end": 8}]
    status, reply = await post(server.url + "/update_weights_from_disk",
                               {"model_path": str(tiny_model_dir), "weight_version": "2"})
    assert status == 200 and reply["success"]


async def test_update_waits_for_generation_unless_aborting(server, tiny_model_dir):
    long = asyncio.create_task(generate(server, {"input_ids": PROMPT, "sampling_params": {**LONG, "max_new_tokens": 60}}))
    await wait_running(server.url)
    status, reply = await post(server.url + "/update_weights_from_disk",
                               {"model_path": str(tiny_model_dir), "weight_version": "3"})
    assert status == 200
    assert long.done(), "without a pause the update waited for the running generation (writer lock)"
    _, body = await long
    assert body["meta_info"]["finish_reason"]["type"] == "length"
    assert {s["version"] for s in body["meta_info"]["weight_versions"]} == {"2"}
    long = asyncio.create_task(generate(server, {"input_ids": PROMPT, "sampling_params": LONG}))
    await wait_running(server.url)
    status, reply = await post(server.url + "/update_weights_from_disk", {
        "model_path": str(tiny_model_dir), "weight_version": "4", "abort_all_requests": True})
    assert status == 200
    _, body = await long
    assert body["meta_info"]["finish_reason"] == ABORTED and len(body["output_ids"]) < 400


async def test_failed_update_keeps_weights_and_version(server, tmp_path):
    _, before = await get(server.url + "/model_info")
    status, reply = await post(server.url + "/update_weights_from_disk",
                               {"model_path": str(tmp_path / "missing"), "weight_version": "99"})
    assert status == 400 and reply["success"] is False and "missing" in reply["message"]
    _, after = await get(server.url + "/model_info")
    assert after["weight_version"] == before["weight_version"] and after["model_path"] == before["model_path"]
    status, reply = await post(server.url + "/update_weight_version",
                               {"new_version": "5", "abort_all_requests": False})
    assert (status, reply) == (200, {"success": True, "message": "Weight version updated to 5", "new_version": "5"})
    assert (await get(server.url + "/model_info"))[1]["weight_version"] == "5"


async def test_distributed_update_over_gloo(server, other_model_dir, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    source = AutoModelForCausalLM.from_pretrained(other_model_dir, dtype=torch.float32)
    named = list(source.named_parameters())
    store = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False)
    group = "weight_update_group"
    init = asyncio.create_task(post(server.url + "/init_weights_update_group", {
        "master_address": "127.0.0.1", "master_port": str(store.port), "rank_offset": 1, "world_size": 2,
        "group_name": group, "backend": "gloo"}))
    prefix = dist.PrefixStore("cpu/", dist.PrefixStore(f"{group}/", store))
    pg = await asyncio.to_thread(dist.ProcessGroupGloo, prefix, 0, 2)
    status, reply = await init
    assert (status, reply) == (200, {"success": True, "message": "Succeeded to initialize custom process group."})

    def broadcast():
        for _, p in named:
            pg.broadcast(p.detach().contiguous(), 0).wait()

    update = asyncio.create_task(post(server.url + "/update_weights_from_distributed", {
        "names": [n for n, _ in named], "dtypes": ["float32"] * len(named),
        "shapes": [list(p.shape) for _, p in named], "group_name": group, "weight_version": "6"}))
    await asyncio.to_thread(broadcast)
    status, reply = await update
    assert status == 200 and reply == {"success": True,
                                       "message": "Succeeded to update parameter online. Weight version updated to 6."}
    _, body = await generate(server, {"input_ids": PROMPT, "sampling_params": {**LONG, "max_new_tokens": 8}})
    assert greedy_check(other_model_dir, PROMPT, body["output_ids"])
    assert body["meta_info"]["weight_version"] == "6"
    status, reply = await post(server.url + "/update_weights_from_distributed", {
        "names": ["nope"], "dtypes": ["float32"], "shapes": [[1]], "group_name": "other"})
    assert status == 400 and reply["success"] is False

    # the same group again, one flat broadcast for the whole bucket (load_format flattened_bucket)
    original = list(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).named_parameters())
    flat = torch.cat([p.detach().reshape(-1) for _, p in original])
    update = asyncio.create_task(post(server.url + "/update_weights_from_distributed", {
        "names": [n for n, _ in original], "dtypes": ["float32"] * len(original),
        "shapes": [list(p.shape) for _, p in original], "group_name": group, "weight_version": "7",
        "load_format": "flattened_bucket"}))
    await asyncio.to_thread(lambda: pg.broadcast(flat, 0).wait())
    assert (await update)[0] == 200
    _, body = await generate(server, {"input_ids": PROMPT, "sampling_params": {**LONG, "max_new_tokens": 8}})
    assert greedy_check(tiny_model_dir, PROMPT, body["output_ids"])
    assert (await post(server.url + "/destroy_weights_update_group", {"group_name": group}))[1] == {
        "success": True, "message": "Succeeded to destroy custom process group."}
    assert (await post(server.url + "/destroy_weights_update_group", {"group_name": group})) == (
        400, {"success": False, "message": "The group to be destroyed does not exist."})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of a server without a GPU")
async def test_nccl_group_without_a_gpu_is_refused_at_once(server):
    # SGLang's default backend is nccl: a CPU server must say it cannot, not join over gloo while the
    # trainer waits on NCCL until its timeout
    status, reply = await post(server.url + "/init_weights_update_group", {
        "master_address": "127.0.0.1", "master_port": "1", "rank_offset": 1, "world_size": 2,
        "group_name": "g", "backend": "nccl"})
    assert status == 400 and reply["success"] is False
    assert "backend nccl needs a GPU" in reply["message"] and "publish.backend = 'gloo'" in reply["message"]


@pytest.mark.parametrize("path", ["/pause_generation", "/continue_generation", "/abort_request",
                                  "/update_weights_from_disk", "/init_weights_update_group"])
async def test_control_endpoints_need_a_json_body(server, path):
    status, reply = await post(server.url + path, None, raw=b"")
    assert status == 400 and reply["object"] == "error" and reply["code"] == 400


async def test_bad_pause_mode_and_idle_flush(server):
    status, reply = await post(server.url + "/pause_generation", {"mode": "sideways"})
    assert status == 400 and reply["type"] == "Bad Request"
    assert (await get(server.url + "/ready"))[0] == 200
    status, text = await get(server.url + "/flush_cache")
    assert status == 200 and text.startswith("Cache flushed.")


async def test_waiting_update_goes_before_new_generations(server, tiny_model_dir):
    """Writer preference (§2): a /generate sent while an update waits runs after it, on new weights."""
    _, info = await get(server.url + "/model_info")
    old = info["weight_version"]
    first = asyncio.create_task(generate(server, {"input_ids": PROMPT, "sampling_params": LONG}))
    await wait_running(server.url)
    update = asyncio.create_task(post(server.url + "/update_weights_from_disk",
                                      {"model_path": str(tiny_model_dir), "weight_version": "after"}))
    async with asyncio.timeout(30):
        while (await get(server.url + "/server_info"))[1]["internal_states"][0]["num_weight_updates_waiting"] < 1:
            await asyncio.sleep(0.02)
    second = await generate(server, {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 2}})
    assert update.done() and (await update)[0] == 200
    _, body = await first
    assert [s["version"] for s in body["meta_info"]["weight_versions"]] == [old]
    assert [s["version"] for s in second[1]["meta_info"]["weight_versions"]] == ["after"]


async def test_aborts_racing_steps_never_fail_a_step(server):
    """Aborts land while the model thread runs a step over the same sequences: the KV of an aborted
    sequence is released only after the step, so no step fails."""
    tasks = [asyncio.create_task(generate(server, {"input_ids": PROMPT + [i], "rid": f"race-{i}",
                                                   "sampling_params": LONG})) for i in range(12)]
    await wait_running(server.url, 12)
    for i in range(11):
        await post(server.url + "/abort_request", {"rid": f"race-{i}"})
        await asyncio.sleep(0.005 * i)
    assert (await post(server.url + "/abort_request", {"rid": "race-11"}))[0] == 200
    results = await asyncio.gather(*tasks)
    assert all(status == 200 and body["meta_info"]["finish_reason"]["type"] == "abort" for status, body in results)
    _, info = await get(server.url + "/server_info")
    assert info["internal_states"][0]["num_step_failures"] == 0
