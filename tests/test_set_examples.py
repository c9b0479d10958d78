"""Every documented `--set KEY=VALUE` names a key that exists: the README's, docs/'s and each daemon's `--help`.

An example beside a command (`tidal trainer ... --set K=V`) must load in that daemon's config; one
with no command before it in its paragraph must load in some daemon's. A placeholder value (`N`,
`PATH`) stands for any value of the key's type.
"""

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tidal.protocol import config_schema
from tidal.protocol.config import load_partial
from tidal.protocol.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent

DAEMONS = {
    "serve": "tidal.engine.reference.config:ServeConfig",
    "trainer": "tidal.trainer.config:TrainerConfig",
    "engine": "tidal.engine.config:EngineConfig",
    "run": "tidal.engine.runconfig:RunConfig",
}
"""Each daemon's config class, imported when needed (the engine's may not exist yet: then skipped)."""

_SET = re.compile(r"--set\s+(?!KEY=)([A-Za-z_][\w.]*)=([^\s`),;\]]+)")
"""`--set key=value`, not argparse's metavar `--set KEY=VALUE`."""
_COMMAND = re.compile(r"tidal (serve|trainer|engine|run)\b")
_PLACEHOLDER = re.compile(r"[A-Z][A-Z_]*")


def _config(daemon: str) -> type:
    module, _, name = DAEMONS[daemon].partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        pytest.skip(f"{DAEMONS[daemon]} does not exist yet")


def _loads(cls: type, key: str, value: str) -> str | None:
    """None if `--set key=value` loads in `cls`, else why not."""
    if _PLACEHOLDER.fullmatch(value):
        node = config_schema.node_at(cls, key.split("."), {})
        if node is None:
            return f"{key} is not a key of {cls.__name__}"
        value = repr(config_schema.placeholder(node)).replace("'", '"')
    try:
        load_partial(cls, overrides=[f"{key}={value}"])
    except ConfigError as exc:
        return str(exc)
    return None


def readme_examples() -> list[tuple[str | None, str, str]]:
    """(daemon named before it in its paragraph, or on its line in a code block, or None; key; value),
    over README.md and every page of docs/."""
    out = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        out += _examples(page.read_text())
    return out


def _examples(text: str) -> list[tuple[str | None, str, str]]:
    out = []
    for m in _SET.finditer(text):
        before = text[:m.start()]
        in_code = before.count("```") % 2 == 1
        context = before.rsplit("\n", 1)[-1] if in_code else re.split(r"\n\s*\n|```", before)[-1]
        commands = _COMMAND.findall(context)
        out.append((commands[-1] if commands else None, m[1], m[2]))
    return out


def test_the_readme_has_examples_to_check():
    assert len(readme_examples()) >= 4


@pytest.mark.parametrize(("daemon", "key", "value"), readme_examples())
def test_readme_set_example_loads(daemon, key, value):
    daemons = [daemon] if daemon else list(DAEMONS)
    errors = {}
    for name in daemons:
        try:
            cls = _config(name)
        except pytest.skip.Exception:
            continue
        errors[name] = _loads(cls, key, value)
        if errors[name] is None:
            return
    pytest.fail(f"README: --set {key}={value} loads in none of {daemons}: {errors}")


@pytest.mark.parametrize("daemon", sorted(DAEMONS))
def test_help_set_examples_load(daemon):
    cls = _config(daemon)
    out = subprocess.run([sys.executable, "-m", "tidal", daemon, "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    examples = _SET.findall(" ".join(out.stdout.split()))
    assert examples, f"tidal {daemon} --help shows no --set example"
    for key, value in examples:
        assert _loads(cls, key, value) is None, f"tidal {daemon} --help: --set {key}={value}: {_loads(cls, key, value)}"
