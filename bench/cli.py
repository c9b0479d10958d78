"""`tidal bench NAME [--quick] [--json OUT]`: dispatch to bench/NAME.py's `main(argv)`.

The table goes to stdout; stderr says when the bench starts, that it is still running, and when
it ends (report.running), since a bench runs for tens of seconds.
"""

import argparse
import importlib
import signal
import sys

from tidal.bench.report import running

__all__ = ["BENCHES", "main"]

BENCHES = {
    "transport": "tidal.bench.transport",
    "backend": "tidal.bench.backend",
    "envs": "tidal.bench.envs",
    "trainer": "tidal.bench.trainer",
    "serve": "tidal.bench.serve",
    "engine": "tidal.bench.engine",
    "async-vs-sync": "tidal.bench.async_vs_sync",
    "render": "tidal.bench.render",
    "learning": "tidal.bench.learning",
    "staleness": "tidal.bench.staleness",
    "soak": "tidal.bench.soak",
    "all": "tidal.bench.all",
}


def _stop(signum: int, _frame) -> None:
    """SIGTERM unwinds like Ctrl-C: every bench stops the servers, engines and runs it started on the
    way out (their `finally` and `async with` blocks), where the default action would orphan them."""
    raise SystemExit(128 + signum)


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGTERM, _stop)
    parser = argparse.ArgumentParser(prog="tidal bench")
    parser.add_argument("name", choices=sorted(BENCHES))
    args, rest = parser.parse_known_args(argv[:1])
    if importlib.util.find_spec(BENCHES[args.name]) is None:
        print(f"tidal bench {args.name}: not built yet", file=sys.stderr)
        return 2
    bench = importlib.import_module(BENCHES[args.name])
    if {"-h", "--help"} & set(argv[1:]):
        return int(bench.main(argv[1:]) or 0)
    quick = " --quick" if "--quick" in argv[1:] else ""
    with running(f"tidal bench {args.name}{quick}"):
        return int(bench.main(argv[1:]) or 0)
