"""`tidal bench all [--quick]`: every benchmark of `tidal bench`, one after another, into one JSON report and
one Markdown table.

Each bench runs as its own child, `python -m tidal bench NAME [--quick] --json FILE`, as a user would run
it, so one that fails is recorded (its exit code and the tail of its output) and the others still run.
A name whose module is not in the tree yet is skipped and listed as such. Written into `--out-dir`
(bench/results by default):
- latest.json: {"bench": "all", "machine", "config", "results": one row per bench (its summary, its
  seconds, or why it has none), "summary"}; also to `--json OUT` when given;
- NAME.png: the figure a bench drew (staleness: its curves), the summary's `png` pointing to it;
- latest.md: the machine and date, then one line per bench with the first `HEADLINE` figures of its
  summary and when it was measured. `--readme README.md` puts that table between the README's
  `README_BEGIN` and `README_END` lines (tests/bench/test_bench_all.py checks that the README shows
  bench/results/latest.md).
`--only NAMES` re-runs some benches and keeps the other rows of the latest.json it finds in the out dir
(same machine, same size), each with the date it was measured: one figure re-measured after a change
does not cost the whole hour, nor wipe the rest of the table.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tidal.bench.report import bench_parser, case, emit, machine

__all__ = ["main", "markdown", "keep_figure", "README_BEGIN", "README_END", "HEADLINE"]

HEADLINE = 4
"""Summary figures of each bench shown in the table (a summary lists its main figures first)."""
README_BEGIN = "<!-- tidal bench all: begin (generated from bench/results/latest.md) -->"
README_END = "<!-- tidal bench all: end -->"
TAIL_CHARS = 2000
"""Output of a failed bench kept in the report."""


def _names(only: str | None) -> list[str]:
    from tidal.bench.cli import BENCHES

    names = [n for n in BENCHES if n != "all"]
    if only:
        wanted = [n.strip() for n in only.split(",") if n.strip()]
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            raise SystemExit(f"tidal bench all: --only names unknown benches {unknown}; known: {', '.join(names)}")
        names = [n for n in names if n in wanted]
    return names


def keep_figure(name: str, tmp: Path, out_dir: Path, summary: dict) -> dict:
    """A bench's PNG, drawn beside its JSON in `tmp`, moved to `out_dir` as NAME.png, and the summary's
    `png` pointed there (else it would name a file deleted with `tmp`)."""
    drawn = tmp / f"{name}.png"
    if drawn.is_file():
        out_dir.mkdir(parents=True, exist_ok=True)
        kept = out_dir / drawn.name
        drawn.replace(kept)
        summary = {**summary, "png": str(kept)}
    return summary


def _run_one(name: str, quick: bool, tmp: Path, out_dir: Path) -> dict:
    from tidal.bench.cli import BENCHES

    if importlib.util.find_spec(BENCHES[name]) is None:
        print(f"tidal bench all: {name} skipped: its module ({BENCHES[name]}) is not built yet", file=sys.stderr)
        return {"bench": name, "status": "skipped", "reason": "not built yet"}
    out = tmp / f"{name}.json"
    argv = [sys.executable, "-m", "tidal", "bench", name, *(["--quick"] if quick else []), "--json", str(out)]
    started = time.perf_counter()
    with case("all", name):
        returncode, output = _child(argv)
    seconds = time.perf_counter() - started
    if returncode != 0 or not out.is_file():
        tail = output[-TAIL_CHARS:]
        print(f"tidal bench all: {name} failed (exit code {returncode}):\n{tail}", file=sys.stderr)
        return {"bench": name, "status": "failed", "seconds": seconds, "exit_code": returncode, "tail": tail}
    summary = keep_figure(name, tmp, out_dir, json.loads(out.read_text())["summary"])
    return {"bench": name, "status": "ok", "seconds": seconds, "summary": summary}


def _child(argv: list[str]) -> tuple[int, str]:
    """Run one bench to its end: (exit code, its stdout and stderr). Stopped early (SIGTERM, Ctrl-C),
    the child gets SIGTERM, so that it stops what it started in turn (a SIGKILL would orphan that)."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            text=True)
    try:
        output, _ = proc.communicate()
    except BaseException:
        proc.terminate()
        try:
            proc.wait(150)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    return proc.returncode, output


def _kept_rows(path: Path, machine_info: dict, quick: bool) -> list[dict]:
    """The rows of an earlier report worth keeping beside re-run ones: none unless it exists and was
    measured on this machine at this size; each row dated (rows of older reports take the report's date)."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(old, dict) or old.get("machine") != machine_info or old.get("config", {}).get("quick") != quick:
        return []
    return [{**row, "date": row.get("date", old["config"].get("date", "-"))} for row in old.get("results", [])]


def _merged(kept: list[dict], fresh: list[dict]) -> list[dict]:
    """`fresh` rows in place of the kept rows of the same benches, in `tidal bench`'s order of benches."""
    from tidal.bench.cli import BENCHES

    by_name = {row["bench"]: row for row in kept} | {row["bench"]: row for row in fresh}
    order = {name: i for i, name in enumerate(BENCHES)}
    return sorted(by_name.values(), key=lambda row: order.get(row["bench"], len(order)))


def _figure(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def markdown(report: dict) -> str:
    """The table of latest.md: the machine, then one line per bench."""
    m, cfg = report["machine"], report["config"]
    lines = [f"`tidal bench all{' --quick' if cfg['quick'] else ''}` on {m['cpu']}, {m['cores']} cores, "
             f"Python {m['python']}, torch {m['torch']}; last run {cfg['date']}.", "",
             "| bench | figures | seconds | measured |", "| --- | --- | --- | --- |"]
    for row in report["results"]:
        if row["status"] == "ok":
            shown = list(row["summary"].items())[:HEADLINE]
            figures = ", ".join(f"{k} {_figure(v)}" for k, v in shown if not isinstance(v, list | dict))
        else:
            figures = row["status"] + (f" (exit code {row['exit_code']})" if "exit_code" in row else f": {row['reason']}")
        seconds = f"{row['seconds']:.0f}" if "seconds" in row else "-"
        lines.append(f"| `{row['bench']}` | {figures} | {seconds} | {row.get('date', cfg['date'])} |")
    return "\n".join(lines) + "\n"


def _into_readme(readme: Path, table: str) -> None:
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise SystemExit(f"tidal bench all: {readme} has no {README_BEGIN!r} ... {README_END!r} section")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(f"{head}{README_BEGIN}\n{table}{README_END}{tail}")


def main(argv: list[str]) -> int:
    p = bench_parser("all", __doc__.splitlines()[0])
    p.add_argument("--only", metavar="NAMES", help="comma-separated benches to run (default: every one)")
    p.add_argument("--out-dir", default="bench/results", help="where latest.json and latest.md go (default %(default)s)")
    p.add_argument("--readme", metavar="README", help="also put the table into this README's generated section")
    args = p.parse_args(argv)
    names = _names(args.only)
    out_dir = Path(args.out_dir)
    with tempfile.TemporaryDirectory(prefix="tidal-bench-all-") as tmp:
        rows = [_run_one(name, args.quick, Path(tmp), out_dir) for name in names]
    info = machine()
    if info["torch"] is None:  # the benches ran in children: name the torch they imported
        try:
            info["torch"] = importlib.metadata.version("torch")
        except importlib.metadata.PackageNotFoundError:
            pass
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rows = [{**row, "date": date} for row in rows]
    if args.only:
        rows = _merged(_kept_rows(out_dir / "latest.json", info, args.quick), rows)
    config = {"quick": args.quick, "date": date, "benches": names}
    summary = {status: sum(r["status"] == status for r in rows) for status in ("ok", "failed", "skipped")}
    report = {"bench": "all", "machine": info, "config": config, "results": rows, "summary": summary}
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in (out_dir / "latest.json", *([Path(args.json_out)] if args.json_out else [])):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (out_dir / "latest.md").write_text(table)
    if args.readme:
        _into_readme(Path(args.readme), table)
    emit("all", config, [{k: v for k, v in r.items() if k in ("bench", "status", "seconds")} for r in rows],
         summary, None)
    return 1 if summary["failed"] else 0
