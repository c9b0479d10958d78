"""`tidal serve` for a newcomer: start-up errors in one line (exit 2, `--debug` for the traceback),
`tidal model tiny DIR`, a quiet stderr that still logs rejections, and one error vocabulary on
`/generate`, `/v1/completions` and the control routes (docs/sglang.md §0)."""

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from tidal.engine.reference.launch import ReferenceServer

SERVE = [sys.executable, "-m", "tidal", "serve"]


def serve(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*SERVE, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def one_line_error(out: subprocess.CompletedProcess) -> str:
    """The run failed to start with exit 2 and exactly one line on stderr, no traceback."""
    assert out.returncode == 2, (out.returncode, out.stderr)
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tidal serve: "), out.stderr
    assert out.stdout == ""
    return lines[0]


# --- start-up errors --------------------------------------------------------------------------------


@pytest.fixture
def busy_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.fixture
def closed_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens there once the socket is closed


def test_a_missing_local_model_path_is_not_found_at_once(tmp_path):
    line = one_line_error(serve("--model", str(tmp_path / "nope")))
    assert f"model path {tmp_path / 'nope'} not found: no such directory" in line
    assert "tidal model tiny DIR" in line
    assert "no such directory" in one_line_error(serve("--model", "./runs/no-model-here"))


def test_a_hub_id_without_a_network_fails_in_one_line(closed_port):
    line = one_line_error(serve("--model", "no-org/no-model", env={"HF_HUB_OFFLINE": "1"}))
    assert "'no-org/no-model' is not a local directory" in line
    assert "not in the local cache and HF_HUB_OFFLINE is set" in line
    unreachable = {"HF_ENDPOINT": f"http://127.0.0.1:{closed_port}", "HF_HUB_OFFLINE": "0"}
    line = one_line_error(serve("--model", "no-org/no-model", env=unreachable))
    assert f"the hub is unreachable, http://127.0.0.1:{closed_port} (Connection refused)" in line


def test_a_busy_port_and_a_bad_host_are_one_line(busy_port, tiny_model_dir):
    for args in (["--simulate"], ["--model", str(tiny_model_dir)]):  # the model is not loaded first
        line = one_line_error(serve(*args, "--port", str(busy_port)))
        assert line.startswith(f"tidal serve: cannot listen on 127.0.0.1:{busy_port}: address already in use")
    line = one_line_error(serve("--simulate", "--host", "no-such-host.invalid", "--port", "0"))
    assert "cannot listen on no-such-host.invalid:0: cannot resolve the host name" in line


def test_an_empty_or_broken_checkpoint_is_one_line(tmp_path, tiny_model_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert f"model directory {empty} has no config.json" in one_line_error(serve("--model", str(empty)))
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    shutil.copy(Path(tiny_model_dir) / "config.json", no_tokenizer)
    assert "has no tokenizer" in one_line_error(serve("--model", str(no_tokenizer)))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    line = one_line_error(serve("--model", str(broken), "--port", "0"))
    assert line.startswith(f"tidal serve: cannot load the model {broken}: ")
    debug = serve("--model", str(broken), "--port", "0", "--debug")
    assert debug.returncode == 2 and "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.rstrip().splitlines()[-1] == line


def test_flags_that_mean_nothing_are_refused_and_no_model_says_how_to_get_one(tiny_model_dir):
    line = one_line_error(serve("--model", str(tiny_model_dir), "--fast"))
    assert "--fast zeroes the costs of the simulated model: it needs --simulate" in line
    line = one_line_error(serve())
    assert "needs model.path: --model DIR" in line and "`tidal model tiny DIR` writes a tiny one" in line
    line = one_line_error(serve("--simulate", "--set", "simulate.max_runing=5"))
    assert "unknown key simulate.max_runing; did you mean simulate.max_running?" in line


# --- tidal model tiny, and a quiet server -----------------------------------------------------------


def test_tiny_model_command_writes_a_servable_checkpoint_and_the_server_stays_quiet(tmp_path):
    out = subprocess.run([sys.executable, "-m", "tidal", "model", "tiny", str(tmp_path / "m")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"serve it with `tidal serve --model {tmp_path / 'm'}`" in out.stdout
    assert out.stderr == ""  # no progress bars
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "m").iterdir()}
    again = subprocess.run([sys.executable, "-m", "tidal", "model", "tiny", str(tmp_path / "m")],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "exists and is not an empty directory" in again.stderr

    with ReferenceServer(tmp_path / "m") as srv:
        status, _ = _request(srv.url, "POST", "/generate", {"text": "hi", "sampling_params": {"max_new_tokens": 4}})
        assert status == 200
        status, _ = _request(srv.url, "POST", "/v1/completions", {"prompt": [5, 6], "max_tokens": 3})
        assert status == 200
        status, _ = _request(srv.url, "POST", "/generate", {"input_ids": []})
        assert status == 400
        srv.terminate()
        output = srv.output()
    assert "FutureWarning" not in output and "deprecated" not in output, output
    assert "Loading weights" not in output and "it/s" not in output, output  # no progress bars
    assert "POST /generate -> 400: input_ids cannot be empty." in output, "a rejection is always logged"
    assert "-> 200 in" not in output, "answered requests are logged at debug level only"


def test_debug_logs_every_request():
    with ReferenceServer(simulate=True, args=["--fast", "--debug"]) as srv:
        assert _request(srv.url, "GET", "/health")[0] == 200
        srv.terminate()
        assert "GET /health -> 200 in" in srv.output()


# --- one error vocabulary ---------------------------------------------------------------------------


def _request(url: str, method: str, path: str, body=None, *, raw: bytes | None = None,
             content_type: str | None = "application/json") -> tuple[int, object]:
    """A plain HTTP request: http.client adds no Content-Type of its own, so its absence is testable."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        headers = {} if content_type is None else {"Content-Type": content_type}
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        text = resp.read().decode()
        assert resp.getheader("Content-Type", "").startswith(("application/json", "text/event-stream")) or not text
        return resp.status, json.loads(text) if text else None
    finally:
        conn.close()


FRAMEWORK = {"object": "error", "type": "Bad Request", "param": None, "code": 400}
"""§0 row 1: the envelope of a body that is not a valid request, on every route alike."""


def test_every_route_speaks_the_same_error_envelopes():
    with ReferenceServer(simulate=True, args=["--fast"]) as srv:
        url = srv.url
        generate = {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 2}}
        completion = {"prompt": [5, 6], "max_tokens": 2}
        for path, body in (("/generate", generate), ("/v1/completions", completion), ("/pause_generation", {})):
            status, reply = _request(url, "POST", path, body, content_type="text/plain")
            assert status == 400 and {k: reply[k] for k in FRAMEWORK} == FRAMEWORK, (path, reply)
            assert "'text/plain' is not JSON" in reply["message"]
            status, reply = _request(url, "POST", path, raw=b'{"input_ids": "x", "prompt": 3, "mode": 1}')
            assert status == 400 and {k: reply[k] for k in FRAMEWORK} == FRAMEWORK, (path, reply)
        assert _request(url, "POST", "/continue_generation", {})[0] == 200
        # no Content-Type at all is read as JSON, as SGLang's FastAPI does
        assert _request(url, "POST", "/generate", generate, content_type=None)[0] == 200
        assert _request(url, "POST", "/v1/completions", completion, content_type=None)[0] == 200
        assert _request(url, "POST", "/generate", generate, content_type="application/json; charset=utf-8")[0] == 200
        # rejected while processing: each route's own envelope (§0 row 3, and SGLang's OpenAI routes)
        assert _request(url, "POST", "/generate", {"input_ids": []}) == (400, {"error": {"message": "input_ids cannot be empty."}})
        status, reply = _request(url, "POST", "/v1/completions", {"prompt": "hi", "echo": True, "logprobs": 1})
        assert status == 400 and reply["type"] == "BadRequestError" and reply["object"] == "error"
        # no route, wrong method: JSON too
        assert _request(url, "GET", "/no/such/route") == (404, {"detail": "Not Found"})
        assert _request(url, "GET", "/generate") == (405, {"detail": "Method Not Allowed"})
