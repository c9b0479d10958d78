"""`tidal engine` end to end over real processes: a reference server (the tiny model, or `--simulate`), the
engine daemon as a child process, and either the real `tidal trainer` or a stand-in trainer over the real
channels (bench/standin.py) where a test needs control over timing."""

import asyncio
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from tidal.bench.standin import Standin
from tidal.engine.chat import ChatTokenizer
from tidal.engine.reference.launch import ReferenceServer

from tests.engine.proc import EngineProcess, engine_toml
from tests.trainer.proc import TrainerProcess, records, trainer_toml

pytestmark = pytest.mark.slow


@pytest.fixture
def model_server(tiny_model_dir):
    """A fresh server per test: a server keeps the weight version the last test left it at."""
    with ReferenceServer(tiny_model_dir, args=["--set", "server.health_timeout_s=2"]) as srv:
        yield srv


@pytest.fixture
def engines(tmp_path):
    made: list[EngineProcess] = []

    def make(cfg: dict, name: str = "engine") -> EngineProcess:
        proc = EngineProcess(tmp_path, cfg, name)
        made.append(proc)
        return proc

    yield make
    for proc in made:
        proc.stop()


async def _until(cond, timeout: float, what: str, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(every)


def check_trajectory(t, tok: ChatTokenizer) -> None:
    """docs/architecture.md invariants 1 and 2 on one received trajectory."""
    mask, logp, versions = t.mask(), t.behav_logps(), t.token_versions()
    gen = mask.astype(bool)
    assert gen.any() and not gen[0], t.id  # the prompt comes first, then generated tokens
    assert (logp[gen] < 0).all() and (logp[~gen] == 0).all(), t.id
    assert (versions[~gen] == -1).all() and (versions[gen] >= 0).all(), t.id
    assert (np.diff(versions[gen]) >= 0).all(), f"{t.id}: versions go backwards {versions[gen]}"
    covered = np.zeros(len(t), bool)
    for turn in t.turns:
        covered[turn.start:turn.end] = True
        assert mask[turn.start:turn.end].all(), t.id  # a turn is the model's tokens only
    assert (covered == gen).all(), t.id
    assert t.reward == pytest.approx(sum(turn.reward for turn in t.turns))
    text = tok.decode(t.token_ids().tolist(), skip_special_tokens=False)
    assert "Guess The Number" in text, text[:200]
    if len(t.turns) > 1:
        assert "you guessed" in text or "invalid move" in text  # the observation reached the model


async def test_engine_feeds_the_real_trainer_and_serves_its_new_weights(tmp_path, tiny_model_dir, model_server,
                                                                       engines):
    trainer = TrainerProcess(tmp_path, trainer_toml(tmp_path, tiny_model_dir,
                                                    intake={"batch_size": 4, "group_size": 2, "max_staleness": 1}))
    try:
        ready = trainer.start()
        engine = engines(engine_toml(tmp_path, tiny_model_dir, model_server.url, ready,
                                     eval={"every_versions": 2, "episodes": 6}))
        await asyncio.to_thread(engine.start)
        steps = lambda: [r for r in records(trainer.jsonl) if r.get("event") == "step"]  # noqa: E731
        await _until(lambda: len(steps()) >= 4, 120, f"4 trainer steps\n{engine.log()}\n{trainer.log()}")
        await _until(lambda: engine.last_metrics().get("engine/served_version", 0) >= 2, 60, "served version 2")
        await _until(lambda: len(engine.events("eval")) >= 2, 60, "two evaluations")
        evals = engine.events("eval")
        assert [e["step"] for e in evals[:2]] == [0, 2] or evals[1]["step"] >= 2, evals
        assert all(e["engine/eval/episodes"] == 6 and 0 <= e["engine/eval/success"] <= 1 for e in evals)
        engine.signal(signal.SIGTERM)
        assert engine.wait(60) == 0, engine.log()
        drained = engine.events("drained")[-1]
        assert drained["delivered"] >= 16
        assert drained["committed"] or drained["pending"] > 0  # uncommitted ones wait in the spool
        assert sum(r["trainer/batch_trajectories"] for r in steps()) >= 16
        assert max(r["trainer/trajectory_staleness_max"] for r in steps()) <= 1
    finally:
        trainer.stop()


async def test_trajectories_are_exact_and_survive_five_weight_updates_mid_rollout(tmp_path, tiny_model_dir,
                                                                                  model_server, engines):
    tok = ChatTokenizer.load(tiny_model_dir)
    async with Standin(batch_size=8, group_size=2, max_staleness=2, weights_path=str(tiny_model_dir),
                       train_s=0.5) as trainer:  # updates land while later episodes run
        cfg = engine_toml(tmp_path, tiny_model_dir, model_server.url, trainer.endpoints,
                          agent={"type": "chat", "max_turns": 4, "max_new_tokens": 24})
        engine = engines(cfg)
        await asyncio.to_thread(engine.start)
        await _until(lambda: len(trainer.published) >= 5 and len(trainer.received) >= 56, 180,
                     f"5 weight updates\n{engine.log()}")
        engine.signal(signal.SIGTERM)
        assert await asyncio.to_thread(engine.wait, 60) == 0, engine.log()
    assert not trainer.violations, trainer.violations[:5]
    assert trainer.duplicates == 0
    for t in trainer.received:
        check_trajectory(t, tok)
    assert max(len(t.turns) for t in trainer.received) >= 2  # multi-turn
    spanning = [t for t in trainer.received if t.max_version > t.min_version]
    assert spanning, "no episode continued across a weight update"
    assert max(t.max_version for t in trainer.received) >= 3
    m = engine.last_metrics()
    assert m["engine/weight_updates"] >= 3 and m["engine/weight_update_failures"] == 0


async def test_three_engines_share_one_staleness_budget(tmp_path, tiny_model_dir, engines):
    with ReferenceServer(simulate=True, args=["--set", "simulate.vocab_size=512", "--set", "simulate.length_median=6",
                                              "--set", "simulate.step_base_s=0.002"]) as server:
        async with Standin(batch_size=8, group_size=2, max_staleness=1, train_s=0.2,
                           weights_path=str(tiny_model_dir)) as trainer:
            procs = []
            for i in range(3):
                cfg = engine_toml(tmp_path, tiny_model_dir, server.url, trainer.endpoints,
                                  rollout={"group_size": 2, "max_concurrent": 16, "engines": 3, "engine_index": i},
                                  trainer={**trainer.endpoints, "spool_dir": str(tmp_path / f"spool{i}")},
                                  metrics={"jsonl": str(tmp_path / f"engine{i}.jsonl"), "every_s": 0.5,
                                           "console": False})
                procs.append(engines(cfg, f"engine{i}"))
            for p in procs:
                await asyncio.to_thread(p.start)
            engines_seen = lambda: {t.id.split("-")[1] for t in trainer.received}  # noqa: E731
            # an engine that started late (a loaded machine) gets its share from the versions after it is heard
            await _until(lambda: trainer.version >= 12 and len(engines_seen()) == 3, 240,
                         "12 versions with every engine delivering")
            for p in procs:
                p.signal(signal.SIGTERM)
            for p in procs:
                assert await asyncio.to_thread(p.wait, 60) == 0, p.log()
    assert not trainer.violations, trainer.violations[:5]
    by_engine = {t.id.split("-")[1] for t in trainer.received}
    assert by_engine == {"0", "1", "2"}  # every engine got a share
    # the bound was tight: engines together started up to the budget of some version, never beyond
    assert trainer.max_started <= (trainer.version + 1 + 1) * 8
    seeds = [t.task_seed for t in trainer.received]
    assert len({(t.task_seed, t.id.split("-")[1]) for t in trainer.received}) == len(set(seeds))  # disjoint seeds


async def test_sync_mode_equals_async_mode_with_zero_staleness(tmp_path, tiny_model_dir, engines):
    runs = {}
    for mode in ("sync", "async"):
        async with ReferenceServer(tiny_model_dir) as server, \
                Standin(batch_size=4, group_size=2, max_staleness=0, weights_path=str(tiny_model_dir)) as trainer:
            cfg = engine_toml(tmp_path, tiny_model_dir, server.url, trainer.endpoints,
                              rollout={"group_size": 2, "max_concurrent": 16, "mode": mode},
                              trainer={**trainer.endpoints, "spool_dir": str(tmp_path / f"spool-{mode}")},
                              metrics={"jsonl": str(tmp_path / f"{mode}.jsonl"), "every_s": 0.5, "console": False},
                              max_episodes=16)
            engine = engines(cfg, mode)
            await asyncio.to_thread(engine.start)
            assert await asyncio.to_thread(engine.wait, 120) == 0, engine.log()
            try:
                await trainer.wait_for(16, timeout=60)
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{engine.events('drained')}\n{engine.last_metrics()}") from None
        assert not trainer.violations
        assert {t.min_version for t in trainer.received} == {0, 1, 2, 3}  # one version per batch
        runs[mode] = {(t.id.rsplit("-", 2)[1], t.id.rsplit("-", 1)[1]): t for t in trainer.received}
    assert runs["sync"].keys() == runs["async"].keys()
    for key, a in runs["sync"].items():
        b = runs["async"][key]
        assert a.task_seed == b.task_seed and a.token_ids().tolist() == b.token_ids().tolist(), key
        assert a.token_versions().tolist() == b.token_versions().tolist(), key


def test_unknown_env_id_fails_at_start_up_in_one_line(tmp_path, tiny_model_dir):
    cfg = engine_toml(tmp_path, tiny_model_dir, "http://127.0.0.1:9", {"endpoint": "tcp://127.0.0.1:9",
                                                                          "status_endpoint": "tcp://127.0.0.1:9"},
                      tasks=[{"env": "games:NoSuchGame-v0"}])
    proc = EngineProcess(tmp_path, cfg)
    out = subprocess.run([sys.executable, "-m", "tidal", "engine", str(proc.config)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "tasks[0].env" in lines[0] and "NoSuchGame" in lines[0], out.stderr


def test_the_engine_process_never_imports_torch(tmp_path, tiny_model_dir):
    code = ("import sys, runpy\n"
            "import tidal.engine.daemon, tidal.engine.agent, tidal.engine.chat, tidal.engine.sink\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))\n"
            "assert not bad, bad\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    cfg = engine_toml(tmp_path, tiny_model_dir, "http://127.0.0.1:9", {"endpoint": "tcp://127.0.0.1:9",
                                                                          "status_endpoint": "tcp://127.0.0.1:9"})
    proc = EngineProcess(tmp_path, cfg)
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "tidal", "engine", str(proc.config), "--check"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    assert not {m for m in imported if m.split(".")[0] in ("torch", "transformers")}


async def test_a_window_too_small_for_the_trainers_checkpoints_fails_at_start_naming_both_settings(
        tmp_path, tiny_model_dir):
    async with Standin(batch_size=4, group_size=2, max_staleness=1, max_uncommitted=64) as trainer:
        cfg = engine_toml(tmp_path, tiny_model_dir, "http://127.0.0.1:9", trainer.endpoints,
                          trainer={**trainer.endpoints, "spool_dir": str(tmp_path / "spool"), "window": 16})
        engine = EngineProcess(tmp_path, cfg)
        engine.config.write_text(engine.config.read_text())
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "tidal", "engine", str(engine.config),
                                                    stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2, err.decode()
    last = err.decode().strip().splitlines()[-1]
    assert "trainer.window (16)" in last and "intake.max_uncommitted (64)" in last, last
