"""Every socket tidal's daemons listen on is on loopback unless configured otherwise
(docs/architecture.md invariant 7): `tidal serve --simulate`, `tidal trainer` and `tidal engine` with
their Prometheus ports on, read from /proc for the whole process tree of each."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest
from tidal.engine.reference.launch import ReferenceServer

from tests.engine.proc import EngineProcess, engine_toml
from tests.security.netproc import descendants, is_loopback, listening
from tests.trainer.proc import TrainerProcess, trainer_toml

pytestmark = pytest.mark.slow


def test_the_reader_sees_a_listener_on_every_address():
    """The /proc reader is not vacuous: a child that listens on 0.0.0.0 and :: is reported as such."""
    code = ("import socket, sys, time\n"
            "a = socket.socket(); a.bind(('0.0.0.0', 0)); a.listen()\n"
            "b = socket.socket(socket.AF_INET6); b.bind(('::', 0)); b.listen()\n"
            "c = socket.socket(); c.bind(('127.0.0.1', 0)); c.listen()\n"
            "print('up', flush=True); time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "up"
        found = listening(descendants(child.pid))
        assert sorted(addr for _, addr, _ in found) == ["0.0.0.0", "127.0.0.1", "::"]
        assert [is_loopback(addr) for _, addr, _ in sorted(found, key=lambda f: f[1])] == [False, True, False]
    finally:
        child.kill()
        child.wait()


async def _wait_for(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.1)


async def test_serve_trainer_and_engine_listen_on_loopback_only(tmp_path, tiny_model_dir):
    server = ReferenceServer(simulate=True, args=["--fast"]).start()
    trainer = TrainerProcess(tmp_path, trainer_toml(tmp_path, tiny_model_dir, metrics={"prometheus_port": 0}))
    engine = None
    try:
        ready = await asyncio.to_thread(trainer.start)
        engine = EngineProcess(tmp_path, engine_toml(tmp_path, tiny_model_dir, server.url, ready,
                                                     metrics={"prometheus_port": 0}))
        await asyncio.to_thread(engine.start)
        procs = {"serve": server.pid, "trainer": trainer.proc.pid, "engine": engine.proc.pid}
        # the trainer binds its two channels, the engine and trainer their Prometheus ports, serve its HTTP port
        expect = {"serve": 1, "trainer": 3, "engine": 1}
        found = {}

        def all_up():
            found.update({name: listening(descendants(pid)) for name, pid in procs.items()})
            return all(len(found[name]) >= n for name, n in expect.items())

        await _wait_for(all_up, 30, f"listeners {expect}")
        assert ("127.0.0.1", server.port) in [(a, p) for _, a, p in found["serve"]]
        exposed = [f"{name} pid {pid}: {addr}:{port}" for name, rows in found.items()
                   for pid, addr, port in rows if not is_loopback(addr)]
        assert not exposed, f"listening beyond loopback: {exposed}\nall: {found}"
    finally:
        if engine is not None:
            engine.stop()
        trainer.stop()
        server.kill()


def test_the_weight_sync_rendezvous_listens_on_its_master_address():
    """The trainer's TCPStore for update_weights_from_distributed: unauthenticated, so loopback unless configured."""
    import os

    from tidal.trainer.config import DistributedPublish
    from tidal.trainer.publish import DistributedPublisher

    publisher = DistributedPublisher(DistributedPublish(master_address="127.0.0.1"), announce=lambda notice: None)
    publisher._host()
    try:
        mine = [(addr, port) for _, addr, port in listening({os.getpid()}) if port == publisher.port]
        assert mine, "the store's listening socket was not found"
        assert all(is_loopback(addr) for addr, _ in mine), f"the rendezvous listens on {mine}"
    finally:
        publisher._drop()
