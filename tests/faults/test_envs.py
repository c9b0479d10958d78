"""Envs that leak memory, print garbage, hang or raise, in the engine daemon: each is bounded by a timeout
or by process isolation (`offload = "process"`, a worker per env with `worker_memory_mb`), counted,
and the engine goes on. (Envs that raise or hang on the thread pool: tests/engine/test_engine_faults.py;
ProcessEnv alone: tests/envs/test_process.py.) A stand-in trainer receives, so the test sees the
trajectories themselves.
"""

import asyncio
import signal
from pathlib import Path

import pytest
from tidal.bench.standin import Standin
from tidal.engine.reference.launch import ReferenceServer

from tests.engine.test_engine_faults import PLUGIN_ENV
from tests.faults.pipeline import metrics

pytestmark = pytest.mark.slow

SIMULATE = ["--set", "simulate.vocab_size=512", "--set", "simulate.length_median=6", "--set",
            "simulate.step_base_s=0.002"]


def env_workers(pid: int) -> list[int]:
    """Env worker processes (`python -m tidal.envs.process`) whose parent is `pid`."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (proc / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid and b"tidal.envs.process" in cmd:
            found.append(int(proc.name))
    return found


async def test_leaking_and_noisy_envs_are_bounded_by_their_worker_process_counted_and_the_engine_goes_on(
        tmp_path, pipeline):
    isolated = {"offload": "process"}
    tasks = [{"env": "faulty:Leak-v0", "kwargs": {**isolated, "worker_memory_mb": 400}},  # 128 MiB a step
             {"env": "faulty:Noisy-v0", "kwargs": isolated}]
    with ReferenceServer(simulate=True, args=SIMULATE) as server:
        async with Standin(batch_size=4, group_size=2, max_staleness=4, weights_path=str(pipeline.model_dir)) \
                as trainer:
            engine = pipeline.engine([server.url], trainer.endpoints, env=PLUGIN_ENV, tasks=tasks,
                                     rollout={"group_size": 2, "max_concurrent": 4},
                                     # a hang guard only: a reset includes the worker's start (an interpreter)
                                     agent={"type": "chat", "max_turns": 3, "max_new_tokens": 4,
                                            "step_timeout_s": 30.0})
            await asyncio.to_thread(engine.start)
            most = 0

            def progress() -> bool:
                nonlocal most
                most = max(most, len(env_workers(engine.proc.pid)))
                noisy = [t for t in trainer.received if t.env_id == "faulty:Noisy-v0"]
                return len(noisy) >= 4 and metrics(engine).get("engine/errors/env_error", 0) >= 4

            await pipeline.until(progress, 180, "4 trajectories of the noisy env and 4 errors of the leaking one")
            engine.signal(signal.SIGTERM)
            assert await asyncio.to_thread(engine.wait) == 0, engine.log()
    m = metrics(engine)
    assert "MemoryError" in engine.log()  # the leak hit its worker's cap, not the engine
    assert not any(t.env_id == "faulty:Leak-v0" for t in trainer.received)  # it fails at its 2nd step, always
    assert m["engine/groups_incomplete"] >= 2 and m["engine/episodes_discarded"] >= 4
    noisy = [t for t in trainer.received if t.env_id == "faulty:Noisy-v0"]
    assert noisy and all(len(t.turns) == 3 and t.finish_reason == "terminated" for t in noisy)  # no frame broken
    assert "garbage" in engine.log()  # the env's stdout went to the log (the worker's stderr)
    assert 0 < most <= 4  # a worker per running episode at most (rollout.max_concurrent)
    assert not env_workers(engine.proc.pid)  # none outlived the engine
