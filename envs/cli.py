"""`tidal envs list|check ID|play ID`: see what is registered, check an env, play one by hand.

    tidal envs list [--prefix gem]
    tidal envs check games:Wordle-v0 -k difficulty=hard
    tidal envs play games:Mastermind-v0 --seed 3            # type actions; EOF (Ctrl-D) quits
    tidal envs play games:Mastermind-v0 --seed 3 --solver   # watch the scripted solver

Output goes to stdout; every error (an unknown id or prefix, a bad `-k`, an env that cannot be
built) is one line on stderr and exit code 2. `check` exits 1 when the env fails the check (the
verdict, on stdout), 0 when it passes.
"""

import argparse
import asyncio
import json
import sys
from typing import Any

from rich.console import Console
from rich.table import Table
from tidal.envs.check import EnvCheckError, acheck_env

from tidal import envs

__all__ = ["main"]


class _Usage(Exception):
    """A command that cannot run as asked: one line on stderr, exit code 2."""


def _kwargs(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise _Usage(f"-k expects KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def _make(args: argparse.Namespace) -> envs.Env:
    """`envs.make`, with any construction failure (a missing corpus, a bad argument) as one clear line."""
    kwargs = _kwargs(args.kwarg)
    try:
        return envs.make(args.id, **kwargs)
    except envs.EnvNotFound as exc:
        raise _Usage(str(exc)) from exc
    except Exception as exc:
        first = next((line.strip() for line in str(exc).splitlines() if any(ch.isalnum() for ch in line)), "")
        raise _Usage(f"cannot build {args.id}: {type(exc).__name__}: {first}") from exc


def _prefixes() -> dict[str, int]:
    """Every id prefix with its number of ids: the suites' and the adapters' (gem:, agentgym:),
    whose ids come from the system they adapt."""
    from tidal.envs import registry

    counts: dict[str, int] = {}
    for env_id in envs.list():
        counts[env_id.split(":", 1)[0]] = counts.get(env_id.split(":", 1)[0], 0) + 1
    for prefix in registry._prefixes:  # the adapters: read only, for their names
        counts[prefix] = len(envs.list(prefix))
    return counts


def _list(args: argparse.Namespace, console: Console) -> int:
    prefixes = _prefixes()
    if args.prefix is not None and args.prefix not in prefixes:
        known = ", ".join(sorted(prefixes))
        raise _Usage(f"no environments with the prefix {args.prefix!r}; the prefixes are: {known}")
    ids = envs.list(args.prefix)
    table = Table(title=f"{len(ids)} environments")
    table.add_column("id")
    table.add_column("entry point")
    table.add_column("defaults")
    for env_id in ids:
        try:
            spec = envs.spec(env_id)
            entry, defaults = str(spec.entry_point), json.dumps(spec.kwargs) if spec.kwargs else ""
        except envs.EnvNotFound:
            entry, defaults = f"{env_id.split(':', 1)[0]}: adapter", ""
        table.add_row(env_id, entry, defaults)
    console.print(table)
    if args.prefix is None:
        others = {p: n for p, n in prefixes.items() if p not in {i.split(":", 1)[0] for i in ids}}
        if others:
            listed = ", ".join(f"{p} ({n})" for p, n in sorted(others.items()))
            console.print(f"{sum(prefixes.values())} ids in all; not listed above: {listed}; "
                          "see them with `tidal envs list --prefix NAME`", highlight=False)
    return 0


async def _check(args: argparse.Namespace, console: Console) -> int:
    env = _make(args)
    try:
        warnings = await acheck_env(env, seed=args.seed)
    except EnvCheckError as exc:
        console.print(f"[red]FAIL[/red] {exc}", markup=True, highlight=False)
        return 1
    for warning in warnings:
        console.print(f"[yellow]warning[/yellow] {args.id}: {warning}", highlight=False)
    console.print(f"[green]OK[/green] {args.id} passes check_env", highlight=False)
    return 0


async def _play(args: argparse.Namespace, console: Console) -> int:
    env = _make(args)
    obs, _ = await env.areset(args.seed)
    solver = env.solver() if args.solver else None
    if args.solver and solver is None:
        raise _Usage(f"{args.id} has no scripted solver; play it by hand without --solver")
    total, turn = 0.0, 0
    while True:
        console.print(f"[bold]observation[/bold]\n{obs}", highlight=False)
        if solver is not None:
            action = solver(obs)
        else:
            line = sys.stdin.readline()
            if not line:
                console.print("(end of input)")
                break
            action = line.rstrip("\n")
        console.print(f"[bold]action[/bold] {action}", highlight=False)
        obs, reward, terminated, truncated, info = await env.astep(action)
        total += reward
        turn += 1
        console.print(f"reward {reward:g}  terminated {terminated}  truncated {truncated}", highlight=False)
        if terminated or truncated:
            console.print(f"[bold]observation[/bold]\n{obs}", highlight=False)
            break
    console.print(f"episode over after {turn} turns: total reward {total:g}", highlight=False)
    await env.aclose()
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tidal envs", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_list = sub.add_parser("list", help="registered env ids")
    p_list.add_argument("--prefix", help="only this suite or adapter (e.g. games, gem)")
    for name, helptext in (("check", "run check_env on an env"), ("play", "play an episode in the terminal")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("id")
        p.add_argument("-k", "--kwarg", action="append", default=[], metavar="KEY=VALUE",
                       help="constructor argument (JSON value or string), repeatable")
        p.add_argument("--seed", type=int, default=0)
        if name == "play":
            p.add_argument("--solver", action="store_true", help="let the scripted solver play")
    args = parser.parse_args(argv)
    console = Console(soft_wrap=True)
    try:
        if args.cmd == "list":
            return _list(args, console)
        return asyncio.run(_check(args, console) if args.cmd == "check" else _play(args, console))
    except _Usage as exc:
        print(f"tidal envs {args.cmd}: {exc}", file=sys.stderr)
        return 2
