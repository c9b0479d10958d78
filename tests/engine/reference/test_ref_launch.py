"""launch.py: start, readiness line, restart on the same port, kill, and start failures."""

import subprocess
import sys

import pytest
from refserver_http import get
from tidal.engine.reference.launch import ReferenceServer, ServerStartError


async def test_restart_keeps_the_port():
    async with ReferenceServer(simulate=True, args=["--fast"]) as srv:
        url, pid = srv.url, srv.pid
        assert url.startswith("http://127.0.0.1:") and srv.port > 0
        assert (await get(url + "/health"))[0] == 200
        srv.restart(kill=True)
        assert srv.url == url and srv.pid != pid
        assert (await get(url + "/health"))[0] == 200
    assert srv.proc.poll() is not None


def test_kill_and_terminate():
    srv = ReferenceServer(simulate=True, args=["--fast"]).start()
    assert srv.kill() == -9
    srv.start()
    assert srv.terminate() == 0, "SIGTERM is a clean shutdown"


def test_bad_config_fails_start_with_the_reason():
    with pytest.raises(ServerStartError, match="nonsense"):
        ReferenceServer(simulate=True, args=["--set", "nonsense=1"]).start()
    with pytest.raises(ValueError):
        ReferenceServer()


def test_cli_prints_config():
    out = subprocess.run([sys.executable, "-m", "tidal", "serve", "--simulate", "--print-config",
                          "--set", "simulate.max_running=7"], capture_output=True, text=True, check=True)
    assert 'mode = "simulate"' in out.stdout and "max_running = 7" in out.stdout


async def test_sigterm_ends_streams_as_aborted():
    from refserver_http import LiveStream

    srv = ReferenceServer(simulate=True, args=["--set", "simulate.step_base_s=0.01"]).start()
    try:
        body = {"input_ids": [300], "sampling_params": {"max_new_tokens": 100000, "ignore_eos": True}}
        async with LiveStream(srv.url, body) as live:
            srv.proc.terminate()
            events = await live.finish()
        assert live.done and events[-1]["meta_info"]["finish_reason"]["type"] == "abort"
        assert events[-1]["meta_info"]["completion_tokens"] > 0
    finally:
        assert srv.terminate() == 0
