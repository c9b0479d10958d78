"""`tidal bench NAME [--quick] [--json OUT]`: dispatch to bench/NAME.py's `main(argv)`."""

import argparse
import importlib
import sys

__all__ = ["BENCHES", "main"]

BENCHES = {
    "transport": "tidal.bench.transport",
    "backend": "tidal.bench.backend",
    "envs": "tidal.bench.envs",
    "trainer": "tidal.bench.trainer",
    "serve": "tidal.bench.serve",
}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tidal bench")
    parser.add_argument("name", choices=sorted(BENCHES))
    args, rest = parser.parse_known_args(argv[:1])
    if importlib.util.find_spec(BENCHES[args.name]) is None:
        print(f"tidal bench {args.name}: not built yet", file=sys.stderr)
        return 2
    return int(importlib.import_module(BENCHES[args.name]).main(argv[1:]) or 0)
