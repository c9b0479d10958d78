"""engine/render_pool.py: chat-template work in worker processes equals the inline transcript token for
token; dead, stalled and garbage-writing workers are detected, counted, restarted, and their calls
answered elsewhere; the engine daemon runs end to end with `model.render_workers = 2`.

The workers are real child processes (`python -m tidal.engine.render_worker`); faults are scripted by
tests/engine/_render_faulty.py, the real worker with its reply stream wrapped.
"""

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

import pytest
from tidal.engine.chat import ChatTemplateError, ChatTokenizer, Transcript
from tidal.engine.render import DeltaRequest, PromptRequest, observation_delta, render_prompt
from tidal.engine.render_pool import RenderPool, RenderWorkerError

from tests.engine.test_chat import (
    CHAT,
    LLAMA_SPECIAL,
    QWEN_PLAIN,
    QWEN_SPECIAL,
    TOOLS,
    _template,
    build_checkpoint,
)

FAULTY = [sys.executable, "-m", "tests.engine._render_faulty"]
ENDS = {"qwen2_5": ("<|im_end|>", "<|endoftext|>"), "qwen3": ("<|im_end|>", "<|endoftext|>"),
        "llama3": ("<|eot_id|>", "<|end_of_text|>"), "llama3_2": ("<|eot_id|>", "<|end_of_text|>"),
        "mistral": ("</s>", "</s>")}
"""Each template's end of turn, and another stop id the template never writes there."""
CASES = {  # template -> (tools, observation role, template kwargs) of the episodes played
    "qwen2_5": [(None, "user", {}), (TOOLS, "tool", {})],
    "qwen3": [(None, "user", {}), (TOOLS, "tool", {}), (None, "user", {"enable_thinking": False})],
    "llama3": [(None, "user", {})],
    "llama3_2": [(None, "user", {"date_string": "26 Jul 2024"})],
    "mistral": [(None, "user", {})],
}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("render")
    qwen = dict(special=QWEN_SPECIAL, plain=QWEN_PLAIN, eos="<|im_end|>", pad="<|endoftext|>",
                gen_eos=("<|im_end|>", "<|endoftext|>"))
    llama = dict(special=LLAMA_SPECIAL, bos="<|begin_of_text|>", eos="<|eot_id|>",
                 gen_eos=("<|end_of_text|>", "<|eot_id|>"))
    return {
        "qwen2_5": build_checkpoint(root / "qwen2_5", _template("qwen2_5"), **qwen),
        "qwen3": build_checkpoint(root / "qwen3", _template("qwen3"), **qwen),
        "llama3": build_checkpoint(root / "llama3", _template("llama3"), **llama),
        "llama3_2": build_checkpoint(root / "llama3_2", _template("llama3_2"), **llama),
        "mistral": build_checkpoint(root / "mistral", _template("mistral"), ["<s>", "</s>"], eos="</s>", bos="<s>"),
    }


def _turns(tok: ChatTokenizer, name: str, copy: int) -> list[list[int]]:
    """Five assistant turns that walk every path of the delta: a stop, byte-split tokens nobody would
    re-tokenize to, a turn cut by length, thinking or a trailing space a template rewrites (a
    divergence), and a stop on an id the template does not write."""
    end, other = (tok.encode(t) for t in ENDS[name])
    byte_split = [tok._tok.token_to_id(ch) for ch in "hello"]
    return [tok.encode(f"Sure thing: {copy}") + end,
            byte_split + tok.encode(" again") + end,
            tok.encode("the answer is 42"),
            tok.encode(f"<think>\nI should say {copy}\n</think>\n\nhello "),
            tok.encode("Paris is.") + other]


async def _play(tok: ChatTokenizer, name: str, case, copy: int, pool: RenderPool | None, *, sync: bool = False):
    """One five-turn episode, as the chat agent drives it (inline `Transcript` when `sync`)."""
    tools, role, kwargs = case
    messages = CHAT[:2] if name != "mistral" else [{"role": "user", "content": f"hello {copy}"}]
    if sync:
        t = Transcript(tok, messages, tools=tools, template_kwargs=kwargs)
    else:
        t = await Transcript.create(tok, messages, tools=tools, template_kwargs=kwargs, pool=pool)
    for k, ids in enumerate(_turns(tok, name, copy)):
        t.append_generation(ids, [-(k + i + 1) / 100 for i in range(len(ids))], k)
        t.end_turn()
        obs = [{"role": role, "content": f"obs {k} of {copy}"}]
        if role == "tool":
            obs.append({"role": "tool", "content": "21 C"})
        if sync:
            t.add_messages(obs)
        else:
            await t.add_messages_async(obs, pool)
    return t


def _state(t: Transcript) -> tuple:
    return (t.tokens, t.loss_mask, t.behav_logp, t.versions, t.turns, t.prompt_len, t.divergences, t.messages)


# --- the pool's transcripts equal the inline ones ------------------------------------------------------

@pytest.mark.parametrize("name", list(CASES))
async def test_pool_transcripts_equal_inline_token_by_token(ckpts, name):
    tok = ChatTokenizer.load(ckpts[name])
    runs = [(case, copy) for case in CASES[name] for copy in range(4)]
    want = [_state(await _play(tok, name, case, copy, None, sync=True)) for case, copy in runs]
    inline_async = [_state(await _play(tok, name, case, copy, None)) for case, copy in runs]
    assert inline_async == want
    async with RenderPool(str(ckpts[name]), 2, max_batch=4) as pool:
        got = await asyncio.gather(*(_play(tok, name, case, copy, pool) for case, copy in runs))
        stats = pool.stats()
    for (case, copy), transcript, expected in zip(runs, got, want, strict=True):
        assert _state(transcript) == expected, (name, case[1], copy)
    assert stats["calls"] == 6 * len(runs) and stats["worker_deaths"] == stats["bad_frames"] == stats["failed"] == 0
    if name != "mistral":  # Mistral's template extends its render exactly every turn
        assert sum(t.divergences for t in got) > 0  # the sentinel path ran in the workers too


async def test_calls_of_one_loop_turn_share_the_idle_workers_in_frames(ckpts):
    tok = ChatTokenizer.load(ckpts["qwen2_5"])
    requests = [PromptRequest(messages=[{"role": "user", "content": f"guess {k}"}]) for k in range(10)]
    async with RenderPool(str(ckpts["qwen2_5"]), 2, max_batch=4) as pool:
        got = await asyncio.gather(*(pool.prompt(r) for r in requests))
        # ten calls made in one loop turn: two frames of four to the two idle workers, then the last two
        assert pool.stats()["frames"] == 3
    assert got == [render_prompt(tok, r) for r in requests]
    async with RenderPool(str(ckpts["qwen2_5"]), 1, max_batch=16) as pool:
        await pool.prompt(requests[0])
        assert await asyncio.gather(*(pool.prompt(r) for r in requests)) == got
        assert pool.stats()["frames"] == 2


async def test_template_errors_arrive_as_inline_and_the_worker_goes_on(ckpts):
    tok = ChatTokenizer.load(ckpts["mistral"])
    async with RenderPool(str(ckpts["mistral"]), 1) as pool:
        with pytest.raises(ChatTemplateError, match="Conversation roles must alternate"):
            await Transcript.create(tok, CHAT, pool=pool)
        ok = await Transcript.create(tok, [{"role": "user", "content": "hi"}], pool=pool)
        assert ok.tokens == Transcript(tok, [{"role": "user", "content": "hi"}]).tokens
        with pytest.raises(TypeError, match="msgpack cannot carry"):
            await pool.prompt(PromptRequest(messages=[{"role": "user", "content": object()}]))
        assert pool.stats()["worker_deaths"] == 0 and pool.pids[0] is not None


async def test_a_cancelled_caller_drops_its_call_and_later_replies_stay_matched(ckpts, tmp_path, monkeypatch):
    tok = ChatTokenizer.load(ckpts["qwen2_5"])
    requests = [PromptRequest(messages=[{"role": "user", "content": f"guess {k}"}]) for k in range(4)]
    monkeypatch.setenv("TIDAL_TEST_RENDER_FAULT", f"slow-once:{tmp_path}")  # the first frame takes a second
    async with RenderPool(str(ckpts["qwen2_5"]), 1, command=FAULTY) as pool:
        tasks = [asyncio.create_task(pool.prompt(r)) for r in requests[:2]]
        await _until(lambda: pool.stats()["frames"] == 1, "the first frame")  # both in flight
        tasks += [asyncio.create_task(pool.prompt(r)) for r in requests[2:]]
        await _until(lambda: pool.stats()["queued"] == 2, "two queued calls")  # the worker is busy
        tasks[0].cancel()  # in flight: its reply is discarded
        tasks[2].cancel()  # queued: never sent
        assert [await tasks[1], await tasks[3]] == [render_prompt(tok, requests[1]), render_prompt(tok, requests[3])]
        assert tasks[0].cancelled() and tasks[2].cancelled()
        assert pool.stats()["frames"] == 2  # the second frame held only the call still awaited
        assert await pool.prompt(requests[0]) == render_prompt(tok, requests[0])


# --- faults ----------------------------------------------------------------------------------------------

async def _wait_file(path: Path, timeout: float = 60.0) -> int:
    for _ in range(int(timeout / 0.02)):
        if path.is_file() and path.read_text():
            return int(path.read_text())
        await asyncio.sleep(0.02)
    raise AssertionError(f"{path} never written")


async def _until(cond, what: str, timeout: float = 60.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _delta_request(tok: ChatTokenizer) -> DeltaRequest:
    t = Transcript(tok, CHAT[:2])
    ids = tok.encode("Sure thing:<|im_end|>")
    t.append_generation(ids, [-0.1] * len(ids), 0)
    t.end_turn()
    return t._delta_request([{"role": "user", "content": "guess again"}])


async def test_a_worker_killed_mid_request_is_restarted_and_the_call_answered(ckpts, tmp_path, monkeypatch, caplog):
    tok = ChatTokenizer.load(ckpts["qwen2_5"])
    monkeypatch.setenv("TIDAL_TEST_RENDER_FAULT", f"stall-once:{tmp_path}")
    request = _delta_request(tok)
    async with RenderPool(str(ckpts["qwen2_5"]), 2, command=FAULTY) as pool:
        first = pool.pids
        call = asyncio.create_task(pool.delta(request))
        pid = await _wait_file(tmp_path / "fault")  # the worker holds the call and will never answer
        assert pid in first and not call.done()
        os.kill(pid, signal.SIGKILL)
        assert await asyncio.wait_for(call, 60) == observation_delta(tok, request)
        stats = pool.stats()
        assert (stats["worker_deaths"], stats["retries"], stats["failed"]) == (1, 1, 0)
        await _until(lambda: pool.stats()["restarts"] == 1 and None not in pool.pids, "the restart")
        assert pid not in pool.pids and len(set(pool.pids) & set(first)) == 1
        assert await pool.delta(request) == observation_delta(tok, request)  # the restarted slot works
    assert any(f"render worker {first.index(pid)} (pid {pid}) exited with -9" in r.message for r in caplog.records)


async def test_a_call_lost_with_two_workers_fails_naming_both(ckpts, tmp_path, monkeypatch):
    tok = ChatTokenizer.load(ckpts["qwen2_5"])
    monkeypatch.setenv("TIDAL_TEST_RENDER_FAULT", f"stall:{tmp_path}")
    async with RenderPool(str(ckpts["qwen2_5"]), 1, command=FAULTY) as pool:
        call = asyncio.create_task(pool.delta(_delta_request(tok)))
        pids = []
        for _ in range(2):
            await _until(lambda: len(list(tmp_path.iterdir())) > len(pids), "a worker holding the call")
            pids.append(next(int(p.name) for p in tmp_path.iterdir() if int(p.name) not in pids))
            os.kill(pids[-1], signal.SIGKILL)
        with pytest.raises(RenderWorkerError, match="lost with two workers") as err:
            await asyncio.wait_for(call, 60)
        assert all(f"pid {pid}" in str(err.value) for pid in pids)
        stats = pool.stats()
        assert (stats["worker_deaths"], stats["retries"], stats["failed"]) == (2, 1, 1)


@pytest.mark.parametrize("kind", ["text", "bytes", "schema"])
async def test_a_worker_writing_garbage_is_detected_counted_and_replaced(ckpts, tmp_path, monkeypatch, caplog, kind):
    tok = ChatTokenizer.load(ckpts["qwen2_5"])
    monkeypatch.setenv("TIDAL_TEST_RENDER_FAULT", f"garbage-once-{kind}:{tmp_path}")
    request = _delta_request(tok)
    caplog.set_level(logging.ERROR, logger="tidal.engine.render_pool")
    async with RenderPool(str(ckpts["qwen2_5"]), 2, command=FAULTY) as pool:
        first = pool.pids
        assert await asyncio.wait_for(pool.delta(request), 60) == observation_delta(tok, request)
        pid = int((tmp_path / "fault").read_text())
        stats = pool.stats()
        assert (stats["bad_frames"], stats["retries"], stats["worker_deaths"], stats["failed"]) == (1, 1, 0, 0)
        await _until(lambda: pool.stats()["restarts"] == 1 and None not in pool.pids, "the restart")
        assert pid not in pool.pids
    assert any(f"render worker {first.index(pid)} (pid {pid}) wrote a malformed frame" in r.message
               for r in caplog.records), [r.message for r in caplog.records]


async def test_a_worker_that_cannot_load_fails_start_naming_why(tmp_path):
    with pytest.raises(RenderWorkerError, match=r"render worker 0 \(pid \d+\) .* could not start: exited with 2: "
                                                r"render worker: cannot load .*no such checkpoint directory"):
        await RenderPool(str(tmp_path / "nope"), 2).start()


# --- the engine daemon with model.render_workers = 2 ----------------------------------------------------

def _render_workers_of(model_dir) -> list[int]:
    """Pids of live render workers for `model_dir` (any parent)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"tidal.engine.render_worker" in argv and str(model_dir).encode() in argv:
            found.append(int(entry.name))
    return found


@pytest.mark.slow
async def test_engine_daemon_with_render_workers_delivers_exact_trajectories(tmp_path, tiny_model_dir):
    from tidal.engine.reference.launch import ReferenceServer

    from tests.engine.proc import EngineProcess, engine_toml
    from tests.engine.test_engine_daemon import check_trajectory
    try:
        from tidal.bench.standin import Standin
    except ImportError:
        from tests.engine.standin import Standin

    tok = ChatTokenizer.load(tiny_model_dir)
    with ReferenceServer(tiny_model_dir, args=["--set", "server.health_timeout_s=2"]) as server:
        async with Standin(batch_size=8, group_size=2, max_staleness=2, weights_path=str(tiny_model_dir),
                           train_s=0.2) as trainer:
            cfg = engine_toml(tmp_path, tiny_model_dir, server.url, trainer.endpoints,
                              model={"render_workers": 2}, agent={"type": "chat", "max_turns": 4, "max_new_tokens": 24})
            engine = EngineProcess(tmp_path, cfg)
            try:
                await asyncio.to_thread(engine.start)
                workers = _render_workers_of(tiny_model_dir)
                assert len(workers) == 2, workers
                await _until(lambda: len(trainer.received) >= 8, "8 trajectories", 180)
                os.kill(workers[0], signal.SIGKILL)  # mid-run: its calls go to the other worker
                await _until(lambda: len(trainer.received) >= 32, f"32 trajectories\n{engine.log()}", 180)
                engine.signal(signal.SIGTERM)
                assert await asyncio.to_thread(engine.wait, 60) == 0, engine.log()
            finally:
                engine.stop()
    assert _render_workers_of(tiny_model_dir) == []  # the daemon closed its pool
    assert not trainer.violations and trainer.duplicates == 0
    for t in trainer.received:
        check_trajectory(t, tok)
    assert max(len(t.turns) for t in trainer.received) >= 2
    m = engine.last_metrics()
    assert m["engine/render/calls"] >= len(trainer.received), m
    assert m["engine/render/worker_deaths"] == 1 and m["engine/render/restarts"] == 1, m
    assert m["engine/render/failed"] == 0 and not any(k.startswith("engine/errors/") for k in m), m
