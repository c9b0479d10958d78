"""Benchmark output as docs/performance.md 'Benchmark output' fixes it, shared by every `tidal bench NAME`.

One JSON object `{"bench", "machine", "config", "results", "summary"}` to `--json OUT`, and a table of
the results on stdout. `--quick` selects the size that finishes in under a minute on 2 cores.
Progress goes to stderr, so stdout stays the table: `running` (wrapped around every bench by
`tidal bench`) says when it starts, that it is still running every `HEARTBEAT_S`, and when it
ends; `case` gives one case a start and a finish line.
"""

import argparse
import json
import os
import platform
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.table import Table

__all__ = ["bench_parser", "machine", "emit", "running", "case", "HEARTBEAT_S"]

HEARTBEAT_S = 15.0
"""A running bench says so this often on stderr: a long case is never a silent one."""


def _say(text: str, file=None) -> None:
    print(text, file=file or sys.stderr, flush=True)


@contextmanager
def running(title: str, *, heartbeat_s: float = HEARTBEAT_S, file=None) -> Iterator[None]:
    """`title: started`, then `title: running, N s` every `heartbeat_s`, then `title: finished in N s`
    (or `failed after`), on stderr (or `file`)."""
    started = time.perf_counter()
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(heartbeat_s):
            _say(f"{title}: running, {time.perf_counter() - started:.0f} s", file)

    _say(f"{title}: started", file)
    thread = threading.Thread(target=beat, name="bench-heartbeat", daemon=True)
    thread.start()
    ok = False
    try:
        yield
        ok = True
    finally:
        stop.set()
        thread.join()
        _say(f"{title}: {'finished in' if ok else 'failed after'} {time.perf_counter() - started:.1f} s", file)


@contextmanager
def case(bench: str, label: str, *, file=None) -> Iterator[None]:
    """One case of a bench: `tidal bench NAME: LABEL ...` when it starts, `... N s` when it ends."""
    started = time.perf_counter()
    _say(f"tidal bench {bench}: {label} ...", file)
    yield
    _say(f"tidal bench {bench}: {label} done in {time.perf_counter() - started:.1f} s", file)


def bench_parser(name: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"tidal bench {name}", description=description)
    parser.add_argument("--json", dest="json_out", metavar="OUT", help="write the JSON report here")
    parser.add_argument("--quick", action="store_true", help="the small size (under a minute on 2 cores)")
    return parser


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    """What the figures were measured on; torch's version only if it is already imported."""
    torch = sys.modules.get("torch")
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": getattr(torch, "__version__", None),
        "platform": platform.platform(),
    }


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, list):
        return ", ".join(map(_fmt, value))
    return str(value)


def emit(name: str, config: dict, results: list[dict], summary: dict, json_out: str | None) -> dict:
    """Print the results table and summary; write the JSON report when asked. Returns the report."""
    report = {"bench": name, "machine": machine(), "config": config, "results": results, "summary": summary}
    # Piped output (CI logs, files) gets a wide console so no column of the table is cut.
    console = Console() if sys.stdout.isatty() else Console(width=240)
    if results:
        table = Table(title=f"tidal bench {name}")
        columns = list(dict.fromkeys(k for row in results for k, v in row.items()
                                     if not isinstance(v, list | dict)))  # series stay in the JSON
        for col in columns:
            table.add_column(col, justify="right")
        for row in results:
            table.add_row(*(_fmt(row.get(col, "")) for col in columns))
        console.print(table)
    summary_table = Table(title="summary")
    summary_table.add_column("figure")
    summary_table.add_column("value", justify="right")
    for key, value in summary.items():
        summary_table.add_row(key, _fmt(value))
    console.print(summary_table)
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(report, indent=2))
    return report
