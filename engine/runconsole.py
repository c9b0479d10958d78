"""The live status of `tidal run` on the terminal: a rich table redrawn in place, or one line at a time.

It shows what the metrics files say (tidal.engine.runmetrics), never asks the children: step and
version, reward, success rate (the eval's when the engine runs one), tokens/s, staleness, queue
sizes, progress toward max_steps or max_minutes, and each child's state. Messages (a child died, a
restart, the stop) go above the table, or as lines of their own, and always to stderr.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

from rich.console import Console
from rich.live import Live
from rich.table import Table

__all__ = ["Status", "RunConsole"]

LIVE_REFRESH_S = 1.0
"""How often the live table is redrawn."""


@dataclass
class Status:
    """One snapshot of the run, from RunMetrics.latest, its step count and the children."""

    elapsed_s: float
    steps: int
    max_steps: int
    max_minutes: float
    latest: dict
    children: list[tuple[str, str]]
    """(name, state) of each child, e.g. ("trainer", "running pid 123, 1 restart")."""

    def fields(self) -> list[tuple[str, str]]:
        m = self.latest

        def num(key: str, fmt: str = ".3f") -> str:
            value = m.get(key)
            return "-" if value is None else format(value, fmt)

        minutes = self.elapsed_s / 60
        progress = [f"{minutes:.1f}" + (f"/{self.max_minutes:g} min" if self.max_minutes else " min")]
        progress.append(f"step {self.steps}" + (f"/{self.max_steps}" if self.max_steps else ""))
        if "engine/eval/success" in m:
            success = f"{num('engine/eval/success', '.2f')} (eval)"
        else:
            success = "-"
        spool_mb = m.get("engine/sink/spool_bytes", 0) / 2**20
        return [
            ("progress", ", ".join(progress)),
            ("version", f"trainer v{self.steps}, served v{num('engine/served_version', '.0f')}"),
            ("reward", f"engine {num('engine/reward_mean')}, trainer {num('trainer/reward_mean')}"),
            ("success", success),
            ("tokens/s", f"generated {num('engine/tokens_per_s', '.0f')}, trained {num('trainer/tokens_per_s', '.0f')}"),
            ("staleness", f"engine {num('engine/staleness_mean', '.2f')}, trainer {num('trainer/staleness_mean', '.2f')}"),
            ("queues", f"in flight {num('engine/episodes_in_flight', '.0f')}, unacked {num('engine/sink/unacked', '.0f')}, "
                       f"spool {spool_mb:.1f} MiB, trainer buffer {num('trainer/intake/buffered', '.0f')}"),
        ]

    def line(self) -> str:
        f = dict(self.fields())
        return (f"[{f['progress']}] {f['version']} | reward {f['reward']} | success {f['success']} | "
                f"tok/s {f['tokens/s']} | staleness {f['staleness']} | {f['queues']}")

    def table(self) -> Table:
        table = Table(title="tidal run", show_header=False, box=None, padding=(0, 1))
        table.add_column(style="bold")
        table.add_column()
        for name, value in self.fields():
            table.add_row(name, value)
        for name, state in self.children:
            table.add_row(name, state)
        return table


class RunConsole:
    """Status on stderr: live (a table redrawn in place), lines (every `every_s`), or off."""

    def __init__(self, mode: str = "auto", every_s: float = 10.0):
        self.console = Console(stderr=True)
        if mode == "auto":
            mode = "live" if self.console.is_terminal else "lines"
        self.mode = mode
        self.every_s = every_s
        self._live: Live | None = None
        self._last_line = 0.0

    def __enter__(self) -> RunConsole:
        if self.mode == "live":
            self._live = Live(console=self.console, refresh_per_second=1 / LIVE_REFRESH_S, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)
            self._live = None

    def show(self, status: Status) -> None:
        if self._live is not None:
            self._live.update(status.table())
        elif self.mode == "lines" and time.monotonic() - self._last_line >= self.every_s:
            self._last_line = time.monotonic()
            self.say(status.line())

    def final(self, status: Status) -> None:
        """The last status, whatever the mode but off."""
        if self._live is not None:
            self._live.update(status.table())
        elif self.mode != "off":
            self.say(status.line())

    def say(self, text: str) -> None:
        """A message for the person at the terminal (above the live table when there is one)."""
        if self._live is not None:
            self._live.console.print(text, markup=False, highlight=False)
        else:
            print(f"tidal run: {text}", file=sys.stderr, flush=True)
