"""How each child of `tidal run` is started and how it is known to be ready: commands, environments and
readiness tests, without the supervision (engine/run.py) around them.

Readiness is what each daemon itself announces, never a guess: `tidal serve` prints `tidal serve ready
URL` once it listens; the trainer and the engine write a `ready` record to their metrics JSONL (the
trainer's names the endpoints it bound on port 0); an SGLang or external server is ready once
/model_info answers 200. A restarted server loads the newest published weights at their version
(`newest_weights`), so it comes back serving what the trainer last published.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tidal.engine.runconfig import SGLangInference
from tidal.protocol.startup import StartupError

__all__ = ["SERVE_READY", "PROBE_EVERY_S", "python", "child_env", "build_argv", "download_argv",
           "downloaded_path", "sglang_argv", "serve_url", "HttpProbe", "newest_weights"]

SERVE_READY = "tidal serve ready "
"""The line `tidal serve` prints once it listens, followed by its URL."""
PROBE_EVERY_S = 1.0
"""Period of HTTP readiness probes of an SGLang or external server."""
PROBE_TIMEOUT_S = 2.0
"""One probe's budget."""


def python(*args: str) -> list[str]:
    """This interpreter (the same environment as `tidal run`), unbuffered, with `args`."""
    return [sys.executable, "-u", *args]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """A child's environment: this one, without progress bars (they fill a log file with carriage
    returns; the caller's own setting wins), and `extra`."""
    return {"HF_HUB_DISABLE_PROGRESS_BARS": "1", **os.environ, **(extra or {})}


def build_argv(builder: str, target: Path, kwargs: dict) -> list[str]:
    """The model-building step (engine/build_model.py)."""
    return python("-m", "tidal.engine.build_model", builder, str(target), json.dumps(kwargs))


def download_argv(repo_id: str) -> list[str]:
    """The hub download step; its last line is `path: DIR` (`downloaded_path`)."""
    return python("-m", "tidal.engine.build_model", "--download", repo_id)


def downloaded_path(output: str) -> str:
    return output.strip().splitlines()[-1].removeprefix("path: ")


def sglang_argv(inf: SGLangInference, model: str, version: int | None) -> list[str]:
    """`python -m sglang.launch_server` for `model` (at weight version `version`, after a restart)."""
    if not inf.python and importlib.util.find_spec("sglang") is None:
        raise StartupError("inference.type = 'sglang' needs the sglang package in this environment (pip install "
                           "'tidal[sglang]' on a GPU machine), or inference.python naming an interpreter that has "
                           "it; on a CPU use inference.type = 'reference'")
    argv = [inf.python or sys.executable, "-m", "sglang.launch_server", "--model-path", model,
            "--host", inf.host, "--port", str(inf.port)]
    if version is not None:
        argv += ["--weight-version", str(version)]
    return argv + list(inf.args)


def serve_url(output: str) -> str | None:
    """The URL in `tidal serve`'s readiness line, once it has printed it."""
    for line in output.splitlines():
        if line.startswith(SERVE_READY):
            return line[len(SERVE_READY):].strip()
    return None


class HttpProbe:
    """A readiness test: true once every server answers /model_info with 200 (asked at most every
    PROBE_EVERY_S, so a supervision loop may call it as often as it likes)."""

    def __init__(self, urls: list[str]):
        self.urls = list(urls)
        self._last = 0.0

    def __call__(self) -> bool:
        if time.monotonic() - self._last < PROBE_EVERY_S:
            return False
        self._last = time.monotonic()
        for url in self.urls:
            try:
                with urllib.request.urlopen(f"{url.rstrip('/')}/model_info", timeout=PROBE_TIMEOUT_S) as resp:
                    if resp.status != 200:
                        return False
            except (OSError, urllib.error.URLError):
                return False
        return True


def newest_weights(weights_dir: Path) -> tuple[Path | None, int | None]:
    """The newest version the trainer published (publish.dir `vXXXXXXXX/`) and its number; (None, None)
    before the first."""
    found = sorted(weights_dir.glob("v[0-9]*")) if weights_dir.is_dir() else []
    if not found:
        return None, None
    return found[-1].resolve(), int(found[-1].name[1:])
