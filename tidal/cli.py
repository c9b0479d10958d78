"""The `tidal` console command: a table of subcommands, each a module with `main(argv) -> int`.

Subcommand modules are imported only when chosen, so `tidal engine` never pulls in torch and
`tidal --help` starts at once.
"""

import argparse
import importlib
import sys

from tidal import __version__

__all__ = ["main", "COMMANDS"]

COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("tidal.engine.run", "run engine, trainer and a CPU reference server end to end (the main job)"),
    "engine": ("tidal.engine.daemon", "the rollout engine daemon"),
    "trainer": ("tidal.trainer.daemon", "the off-policy trainer daemon (torchrun-able)"),
    "serve": ("tidal.engine.reference.server", "the CPU reference inference server speaking SGLang's HTTP API"),
    "envs": ("tidal.envs.cli", "list, check and try environments"),
    "model": ("tidal.engine.reference.tiny", "write test checkpoints: `tidal model tiny DIR`, the tiny model of the docs"),
    "bench": ("tidal.bench.cli", "reproducible throughput benchmarks (JSON + table)"),
    "keys": ("tidal.protocol.keys", "CURVE key pairs for engines and a trainer on different hosts"),
}


def _available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="tidal", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=sorted(COMMANDS), help="subcommand")
    if argv[:1] in (["--version"], ["-V"]):
        print(f"tidal {__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        print(f"\ntidal {__version__}; `tidal COMMAND --help` for each command's options")
        print("\nsubcommands:")
        for name, (module, helptext) in COMMANDS.items():
            mark = "" if _available(module) else "  (not built yet)"
            print(f"  {name:<8} {helptext}{mark}")
        return 0
    args = parser.parse_args(argv[:1])
    module, _ = COMMANDS[args.command]
    if not _available(module):
        print(f"tidal {args.command}: not built yet; available now:", file=sys.stderr)
        for name, (mod, helptext) in COMMANDS.items():
            if _available(mod):
                print(f"  tidal {name:<8} {helptext}", file=sys.stderr)
        return 2
    return int(importlib.import_module(module).main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
