"""The engine daemon under bad input and with plug-ins: envs that raise or hang, malformed backend responses,
control messages, zero-variance groups, a custom agent from an entry point, and a `gem:` env. Each runs the
real `tidal engine` child against a real server and a stand-in trainer over the real channels."""

import asyncio
import os
import signal
import urllib.request
from pathlib import Path

import pytest
from tidal.bench.standin import Standin
from tidal.engine.chat import ChatTokenizer
from tidal.engine.reference.launch import ReferenceServer
from tidal.protocol.messages import Drain, Pause, Resume, Shutdown

from tests.engine.backends.fake_sglang import FakeSGLang
from tests.engine.proc import EngineProcess, engine_toml
from tests.engine.test_engine_daemon import _until

pytestmark = pytest.mark.slow

PLUGINS = Path(__file__).parents[1] / "fixtures" / "engine_plugins"
PLUGIN_ENV = {"PYTHONPATH": os.pathsep.join(filter(None, [str(PLUGINS), os.environ.get("PYTHONPATH")]))}


@pytest.fixture
def engines(tmp_path):
    made: list[EngineProcess] = []

    def make(cfg: dict, name: str = "engine", env: dict | None = None) -> EngineProcess:
        proc = EngineProcess(tmp_path, cfg, name, env=env)
        made.append(proc)
        return proc

    yield make
    for proc in made:
        proc.stop()


async def test_envs_that_raise_or_hang_are_counted_and_their_groups_give_admission_back(tmp_path, tiny_model_dir,
                                                                                     engines):
    async with ReferenceServer(tiny_model_dir) as server, \
            Standin(batch_size=4, group_size=2, max_staleness=1, weights_path=str(tiny_model_dir)) as trainer:
        cfg = engine_toml(tmp_path, tiny_model_dir, server.url, trainer.endpoints,
                          tasks=[{"env": "faulty:Crash-v0"}, {"env": "faulty:Hang-v0"}],
                          agent={"type": "chat", "max_turns": 3, "max_new_tokens": 4, "step_timeout_s": 1.0})
        engine = engines(cfg, env=PLUGIN_ENV)
        await asyncio.to_thread(engine.start)
        await _until(lambda: len(trainer.received) >= 24 and engine.last_metrics().get("engine/errors/env_error", 0),
                     180, "24 trajectories and a counted env error")
        m = engine.last_metrics()
        engine.signal(signal.SIGTERM)
        assert await asyncio.to_thread(engine.wait, 60) == 0, engine.log()
    assert m["engine/groups_incomplete"] >= 1 and m["engine/episodes_discarded"] >= 2
    received = trainer.received
    assert {t.env_id for t in received} == {"faulty:Crash-v0", "faulty:Hang-v0"}
    assert all(t.task_seed % 3 for t in received if t.env_id == "faulty:Crash-v0")  # crashed groups never sent
    hung = [t for t in received if t.finish_reason == "step_timeout"]
    assert hung and all(t.env_id == "faulty:Hang-v0" and t.truncated for t in hung)


async def test_malformed_backend_responses_are_counted_and_not_fatal(tmp_path, tiny_model_dir, engines):
    async with FakeSGLang() as server, \
            Standin(batch_size=4, group_size=2, max_staleness=8) as trainer:
        for k in range(0, 12, 3):  # the first turn of member 0 of every third group misbehaves
            server.faults[f"-g{k}-0/0/*"] = ("bad_json", "missing_field", "http_500", "error_event")[k // 3 % 4]
        cfg = engine_toml(tmp_path, tiny_model_dir, server.url, trainer.endpoints,
                          backend={"type": "sglang", "urls": [server.url], "max_retries": 1, "health_interval_s": 0.5},
                          agent={"type": "chat", "max_turns": 2, "max_new_tokens": 4})
        engine = engines(cfg)
        await asyncio.to_thread(engine.start)
        await _until(lambda: len(trainer.received) >= 24, 120, "24 trajectories")
        errors = lambda: sum(v for k, v in engine.last_metrics().items()  # noqa: E731
                             if k.startswith("engine/backend/errors"))
        await _until(lambda: errors() >= 1, 30, "a metrics record with the errors counted")  # every 0.5 s
        assert engine.proc.poll() is None
    assert len({t.id for t in trainer.received}) == len(trainer.received)


async def test_control_messages_pause_resume_drain_and_shutdown(tmp_path, tiny_model_dir, engines):
    async with ReferenceServer(tiny_model_dir) as server, \
            Standin(batch_size=4, group_size=2, max_staleness=1, weights_path=str(tiny_model_dir)) as trainer:
        engine = engines(engine_toml(tmp_path, tiny_model_dir, server.url, trainer.endpoints))
        await asyncio.to_thread(engine.start)
        await trainer.wait_for(8)
        await trainer.pub.publish(Pause())
        await _until(lambda: engine.last_metrics().get("engine/paused") == 1
                     and engine.last_metrics().get("engine/episodes_in_flight") == 0, 60, "a pause, in-flight ended")
        started = engine.last_metrics()["engine/episodes_started"]
        await asyncio.sleep(1.5)
        assert engine.last_metrics()["engine/episodes_started"] == started  # paused: nothing new starts
        await trainer.pub.publish(Resume())
        await _until(lambda: engine.last_metrics()["engine/episodes_started"] > started, 60, "admission to resume")
        await trainer.pub.publish(Drain(deadline_s=30))
        await _until(lambda: engine.events("draining"), 30, "a drain")
        await trainer.pub.publish(Resume())  # a drained engine idles until told to resume
        await trainer.pub.publish(Shutdown(deadline_s=30))
        assert await asyncio.to_thread(engine.wait, 60) == 0, engine.log()
    drained = engine.events("drained")[-1]
    assert drained["delivered"] == len(trainer.received)


async def test_zero_variance_groups_are_dropped_and_do_not_stall_admission(tmp_path, tiny_model_dir, engines):
    """With the random tiny model nearly every GuessTheNumber group fails alike (rewards all equal): dropped
    groups must hand their admission back, or the engine would stop after the first budget."""
    async with ReferenceServer(tiny_model_dir) as server, \
            Standin(batch_size=4, group_size=2, max_staleness=0, weights_path=str(tiny_model_dir)) as trainer:
        cfg = engine_toml(tmp_path, tiny_model_dir, server.url, trainer.endpoints,
                          rollout={"group_size": 2, "max_concurrent": 8, "drop_zero_variance": True},
                          agent={"type": "chat", "max_turns": 1, "max_new_tokens": 2})
        engine = engines(cfg)
        await asyncio.to_thread(engine.start)
        # the budget at version 0 is 4 episodes: starting 40 needs 36 handed back
        await _until(lambda: engine.last_metrics().get("engine/episodes_started", 0) >= 40, 120,
                     "40 episodes started past a 4-episode budget")
        m = engine.last_metrics()
    assert m["engine/groups_zero_variance"] >= 18
    assert m["engine/episodes_started"] <= 4 + m["engine/episodes_discarded"] + 4 * trainer.version
    # the heartbeats leave the discards out (the engine hands them back itself): counted there too, the
    # trainer's books would fill with episodes that never arrive and grant nothing more
    assert not trainer.violations, trainer.violations[:3]
    assert max(trainer.grants.grants().values()) <= trainer.status().budget
    assert all(len({t.reward for t in trainer.received if t.group_id == g}) > 1
               for g in {t.group_id for t in trainer.received})


async def test_a_custom_agent_from_an_entry_point_makes_exact_trajectories(tmp_path, tiny_model_dir, engines):
    tok = ChatTokenizer.load(tiny_model_dir)
    async with ReferenceServer(tiny_model_dir) as server, \
            Standin(batch_size=4, group_size=2, max_staleness=1, weights_path=str(tiny_model_dir)) as trainer:
        cfg = engine_toml(tmp_path, tiny_model_dir, server.url, trainer.endpoints,
                          agent={"type": "plugin", "name": "plan-act", "options": {"max_turns": 2}})
        engine = engines(cfg, env=PLUGIN_ENV)
        await asyncio.to_thread(engine.start)
        await trainer.wait_for(8)
    for t in trainer.received:
        assert t.info["agent"] == "plan-act"
        mask = t.mask()
        assert len(t.turns) % 2 == 0 and len(t.turns) >= 2  # a plan and a move per env step
        for plan, move in zip(t.turns[::2], t.turns[1::2], strict=True):
            assert plan.reward == 0.0 and mask[plan.start:plan.end].all() and mask[move.start:move.end].all()
            between = tok.decode(t.token_ids()[plan.end:move.start].tolist(), skip_special_tokens=False)
            assert "Now write only your move." in between and not mask[plan.end:move.start].any()
        assert t.mask().sum() == sum(turn.end - turn.start for turn in t.turns)


async def test_a_gem_env_runs_through_the_engine(tmp_path, tiny_model_dir, engines):
    pytest.importorskip("gem")
    async with ReferenceServer(tiny_model_dir) as server, \
            Standin(batch_size=4, group_size=2, max_staleness=1, weights_path=str(tiny_model_dir)) as trainer:
        cfg = engine_toml(tmp_path, tiny_model_dir, server.url, trainer.endpoints,
                          tasks=[{"env": "gem:game:GuessTheNumber-v0-easy"}])
        engine = engines(cfg)
        await asyncio.to_thread(engine.start)
        await trainer.wait_for(8)
    assert {t.env_id for t in trainer.received} == {"gem:game:GuessTheNumber-v0-easy"}
    assert all(t.finish_reason in ("terminated", "truncated", "max_turns") for t in trainer.received)


async def test_sigkill_then_restart_delivers_the_spool_and_loses_only_episodes_in_flight(tmp_path, tiny_model_dir,
                                                                                        engines):
    from tidal.engine.spool import Spool

    async with ReferenceServer(tiny_model_dir) as server, \
            Standin(batch_size=4, group_size=2, max_staleness=2, weights_path=str(tiny_model_dir),
                    commit=False) as trainer:  # a trainer between checkpoints: nothing acknowledged
        cfg = engine_toml(tmp_path, tiny_model_dir, server.url, trainer.endpoints)
        first = engines(cfg, "first")
        await asyncio.to_thread(first.start)
        await trainer.wait_for(12)
        first.signal(signal.SIGKILL)
        await asyncio.to_thread(first.wait, 30)
        spool = Spool(tmp_path / "spool", max_bytes=1 << 30)
        spooled = {traj.id for _, traj in spool.pending()}
        spool.close()
        trainer.commit_held()
        second = engines({**cfg, "max_episodes": 2}, "second")
        await asyncio.to_thread(second.start)
        assert await asyncio.to_thread(second.wait, 120) == 0, second.log()
    first_prefix = f"engine-0-{first.events('ready')[0]['epoch']}-"
    from_first = {t.id for t in trainer.received if t.id.startswith(first_prefix)}
    assert len(spooled) >= 12 and from_first == spooled  # every spooled one arrived; nothing else of the first run
    m = second.last_metrics()
    assert m["engine/sink/recovered"] == len(spooled) and m["engine/sink/pending"] == 0, m
    assert trainer.duplicates >= 12  # received before the kill, never acknowledged: resent from the spool


async def test_a_server_left_paused_by_a_killed_engine_is_resumed_at_start(tmp_path, tiny_model_dir, engines):
    """An engine SIGKILLed between the pause and the continue of a weight update leaves its server
    paused: every request waits and /health fails. The next engine resumes it at start."""
    async with ReferenceServer(tiny_model_dir) as server, \
            Standin(batch_size=4, group_size=2, max_staleness=2, weights_path=str(tiny_model_dir)) as trainer:
        pause = urllib.request.Request(server.url + "/pause_generation", data=b'{"mode": "in_place"}',
                                       headers={"Content-Type": "application/json"})
        assert urllib.request.urlopen(pause, timeout=10).status == 200
        engine = engines({**engine_toml(tmp_path, tiny_model_dir, server.url, trainer.endpoints), "max_episodes": 2})
        await asyncio.to_thread(engine.start)
        assert await asyncio.to_thread(engine.wait, 60) == 0, engine.log()
    assert len(trainer.received) == 2


async def test_with_every_server_down_admission_waits_instead_of_failing_episodes(tmp_path, tiny_model_dir,
                                                                                 engines):
    async with ReferenceServer(tiny_model_dir) as server, \
            Standin(batch_size=4, group_size=2, max_staleness=4, weights_path=str(tiny_model_dir)) as trainer:
        cfg = engine_toml(tmp_path, tiny_model_dir, server.url, trainer.endpoints,
                          backend={"type": "sglang", "urls": [server.url], "health_interval_s": 0.3,
                                   "max_retries": 1, "eject_after": 1})
        engine = engines(cfg)
        await asyncio.to_thread(engine.start)
        await trainer.wait_for(8)
        await asyncio.to_thread(server.kill)
        await _until(lambda: engine.last_metrics().get("engine/admission_blocked/no_server", 0) >= 1, 60,
                     "admission to wait for a server")
        failed = engine.last_metrics().get("engine/errors/backend_error", 0)
        await asyncio.sleep(3)
        m = engine.last_metrics()
        assert m.get("engine/errors/backend_error", 0) == failed <= 16  # at most those in flight at the kill
        received = len(trainer.received)
        await asyncio.to_thread(server.restart)
        await _until(lambda: len(trainer.received) >= received + 8, 120, "episodes after the server is back")
