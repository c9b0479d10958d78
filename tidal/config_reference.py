"""The configuration reference, docs/configuration.md, generated from the daemons' msgspec schemas.

Every key with its default and its docstring, as `--print-config` prints it, for each command that reads
a TOML file. The page is generated, never written by hand: `python -m tidal.config_reference --write`
regenerates it, and tests/test_config_reference.py fails when it is out of date.
"""

import argparse
import importlib
import sys
from pathlib import Path

from tidal.protocol.config import load_partial, to_toml

__all__ = ["COMMANDS", "render", "main"]

COMMANDS = (
    ("tidal run", "tidal.engine.runconfig:RunConfig",
     "The main job: reference server, trainer and engine as child processes (its sections embed the three below)."),
    ("tidal engine", "tidal.engine.config:EngineConfig", "The rollout engine daemon."),
    ("tidal trainer", "tidal.trainer.config:TrainerConfig", "The off-policy trainer daemon (also under torchrun)."),
    ("tidal serve", "tidal.engine.reference.config:ServeConfig",
     "The CPU reference inference server (SGLang's HTTP API)."),
)
PAGE = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def _load(target: str) -> type:
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def render() -> str:
    out = [
        "# Configuration reference",
        "",
        "Generated from the schemas by `python -m tidal.config_reference --write`; do not edit by hand.",
        "Every daemon reads a TOML file, then `--set KEY=VALUE` overrides (a dotted key), and `--print-config` prints",
        "the resolved configuration in this form. Keys marked `# required:` have no default.",
        "",
    ]
    for command, target, what in COMMANDS:
        cfg, missing = load_partial(_load(target))
        out += [f"## `{command}`", "", what, "", "```toml", to_toml(cfg, missing=missing).rstrip("\n"), "```", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tidal.config_reference", description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"write {PAGE.name} instead of printing it")
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        PAGE.parent.mkdir(exist_ok=True)
        PAGE.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
