"""Static scans of tidal's packages for ways another process's bytes could become code.

No pickle, no `recv_pyobj`/`send_pyobj`, no multiprocessing queues or process pools (they pickle what
crosses them), no `numpy.load(allow_pickle=True)`, no `yaml.load` without a safe loader, and every
`torch.load` passes `weights_only=True`. The scan walks the syntax tree of every tracked .py file in
engine/ trainer/ envs/ protocol/ bench/ tidal/, so comments and docstrings that mention pickle do not
count, and an import under another name (`import pickle as p`) still does.

The one allowed exception is `tidal bench transport`, which sends pickle between its own two processes
as the baseline it measures against; ALLOWED lists it by file and reason, and the test fails if an
allowed finding disappears (the allowance must not outlive its reason).
"""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("engine", "trainer", "envs", "protocol", "bench", "tidal")

BANNED_MODULES = {
    "pickle": "pickle turns bytes into code",
    "cPickle": "pickle turns bytes into code",
    "_pickle": "pickle turns bytes into code",
    "dill": "a pickle extension",
    "cloudpickle": "a pickle extension",
    "shelve": "pickle on disk",
    "marshal": "code objects from bytes",
    "multiprocessing": "its queues, pipes and process arguments are pickled",
}
BANNED_ATTRS = {
    "recv_pyobj": "zmq's pickle receive",
    "send_pyobj": "zmq's pickle send",
    "ProcessPoolExecutor": "pickles every call and result",
    "ForkingPickler": "pickle",
}

ALLOWED = {
    ("bench/transport.py", "import multiprocessing"): "the benchmark's receiver child (spawn) measures the baseline",
    ("bench/transport.py", "import pickle"): "pickle over zmq is the baseline the benchmark compares against",
}
"""(file, finding) -> why it is allowed. Only the transport benchmark, never a daemon's wire or file."""


def tracked_sources() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z", "--", *(f"{p}/*.py" for p in PACKAGES)],
                         cwd=ROOT, capture_output=True, check=True).stdout.decode()
    files = [ROOT / name for name in out.split("\0") if name]
    return [f for f in files if f.exists()]


def _kw(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def findings(source: str) -> list[tuple[int, str, str]]:
    """(line, finding, why) for every banned construct in `source`."""
    tree = ast.parse(source)
    found: list[tuple[int, str, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                if top in BANNED_MODULES:
                    found.append((node.lineno, f"import {top}", BANNED_MODULES[top]))
        elif isinstance(node, ast.ImportFrom):
            top = (node.module or "").split(".")[0]
            if node.level == 0 and top in BANNED_MODULES:
                found.append((node.lineno, f"import {top}", BANNED_MODULES[top]))
            for alias in node.names:
                if alias.name in BANNED_ATTRS:
                    found.append((node.lineno, alias.name, BANNED_ATTRS[alias.name]))
        elif isinstance(node, ast.Attribute) and node.attr in BANNED_ATTRS:
            found.append((node.lineno, node.attr, BANNED_ATTRS[node.attr]))
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name.endswith("torch.load"):
                weights_only = _kw(node, "weights_only")
                if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                    found.append((node.lineno, "torch.load without weights_only=True",
                                  "a checkpoint file could run code"))
            elif name in ("np.load", "numpy.load"):
                allow = _kw(node, "allow_pickle")
                if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                    found.append((node.lineno, "numpy.load allow_pickle", "object arrays are pickled"))
            elif name == "yaml.load":
                loader = _kw(node, "Loader")
                if loader is None or "Safe" not in _dotted(loader):
                    found.append((node.lineno, "yaml.load without SafeLoader", "yaml tags build objects"))
    return found


def test_no_pickle_or_unsafe_loads_in_tidal_packages():
    sources = tracked_sources()
    assert len(sources) > 50, "the scan found too few files to be scanning the packages"
    bad, allowed_seen = [], set()
    for path in sources:
        rel = path.relative_to(ROOT).as_posix()
        for line, what, why in findings(path.read_text()):
            if (rel, what) in ALLOWED:
                allowed_seen.add((rel, what))
            else:
                bad.append(f"{rel}:{line}: {what} ({why})")
    assert not bad, "unsafe deserialisation in tidal's packages:\n" + "\n".join(bad)
    assert allowed_seen == set(ALLOWED), f"stale allowances (remove them): {set(ALLOWED) - allowed_seen}"


def test_torch_load_is_scanned_and_passes_weights_only():
    """Checkpoint loads exist (the scan is not vacuous) and every one of them is weights_only=True."""
    calls = []
    for path in tracked_sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and _dotted(node.func).endswith("torch.load"):
                calls.append((path.relative_to(ROOT).as_posix(), node))
    assert calls, "no torch.load found: the scan's pattern no longer matches the code"
    for rel, node in calls:
        value = _kw(node, "weights_only")
        assert isinstance(value, ast.Constant) and value.value is True, f"{rel}:{node.lineno}"


@pytest.mark.parametrize("snippet, expected", [
    ("import pickle\n", "import pickle"),
    ("import pickle as p\np.loads(b'')\n", "import pickle"),
    ("from pickle import loads\n", "import pickle"),
    ("from multiprocessing import Queue\n", "import multiprocessing"),
    ("import multiprocessing.pool\n", "import multiprocessing"),
    ("from concurrent.futures import ProcessPoolExecutor\n", "ProcessPoolExecutor"),
    ("import concurrent.futures as cf\ncf.ProcessPoolExecutor()\n", "ProcessPoolExecutor"),
    ("async def f(s):\n    return await s.recv_pyobj()\n", "recv_pyobj"),
    ("def f(s, x):\n    s.send_pyobj(x)\n", "send_pyobj"),
    ("import torch\ntorch.load('x')\n", "torch.load without weights_only=True"),
    ("import torch\ntorch.load('x', weights_only=False)\n", "torch.load without weights_only=True"),
    ("import numpy as np\nnp.load('x', allow_pickle=True)\n", "numpy.load allow_pickle"),
    ("import yaml\nyaml.load(s)\n", "yaml.load without SafeLoader"),
])
def test_scan_catches(snippet, expected):
    assert expected in [what for _, what, _ in findings(snippet)]


@pytest.mark.parametrize("snippet", [
    '"""We never use pickle."""\n# import pickle\n',
    "import torch\ntorch.load('x', weights_only=True, map_location='cpu')\n",
    "import numpy as np\nnp.load('x')\n",
    "import yaml\nyaml.load(s, Loader=yaml.SafeLoader)\n",
    "import msgspec\nmsgspec.msgpack.decode(b'')\n",
])
def test_scan_passes_safe_code(snippet):
    assert findings(snippet) == []
