"""PNG plots of a run from its metrics JSONL files: `python -m tidal.engine.plots RUN_DIR`.

`tidal run` runs this in a child process every `plots.every_s` and once at the end, so matplotlib is
never imported by `tidal run` itself (nor by the engine). It reads <run_dir>/metrics/engine.jsonl and
trainer.jsonl and writes <run_dir>/plots/:
  reward.png      reward against trainer step and against wall-clock (engine: the recent window's
                  mean, `engine/reward_mean`; trainer: each step's batch, `trainer/reward_mean`)
  success.png     eval success rate (`engine/eval/success`) against step and wall-clock, when present
  throughput.png  generated tokens/s (`engine/tokens_per_s`) and trained tokens/s (`trainer/tokens_per_s`)
  staleness.png   staleness of trajectories: the engine's recent histogram's mean (`engine/staleness/K`)
                  and each step's mean and max (`trainer/staleness_mean`, `trainer/trajectory_staleness_max`)
Each file is written under a temporary name and renamed, so a reader never sees half a PNG. A
trainer step recorded twice (before and after a resume) is plotted once, the later record winning.
Without matplotlib: exit code 3 and one line (`tidal run` then warns once and stops plotting).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tidal.engine.runmetrics import JsonlTail, staleness_mean

__all__ = ["Series", "load", "plot_run", "main", "NO_MATPLOTLIB"]

NO_MATPLOTLIB = 3
"""Exit code when matplotlib is not installed."""


class Series:
    """The records of one run as plottable columns."""

    def __init__(self, engine: list[dict], trainer: list[dict]):
        times = [r["time"] for r in engine + trainer if isinstance(r.get("time"), int | float)]
        self.t0 = min(times) if times else 0.0
        self.engine = engine  # metric records, and eval records (event "eval") with engine/eval/...
        steps: dict[int, dict] = {}
        for r in trainer:
            if r.get("event") == "step":
                steps[int(r["step"])] = r  # a step re-run after a resume supersedes the earlier record
        self.steps = [steps[k] for k in sorted(steps)]

    def minutes(self, r: dict) -> float:
        return (r["time"] - self.t0) / 60.0

    def engine_xy(self, key: str, x: str = "minutes") -> tuple[list[float], list[float]]:
        """(x, y) of an engine metric; x is minutes into the run, or the trainer version ("step")."""
        xs, ys = [], []
        for r in self.engine:
            y = staleness_mean(r) if key == "engine/staleness_mean" else r.get(key)
            if isinstance(y, int | float) and r.get("time") is not None:
                xs.append(self.minutes(r) if x == "minutes" else r.get("step", 0))
                ys.append(y)
        return xs, ys

    def trainer_xy(self, key: str, x: str = "step") -> tuple[list[float], list[float]]:
        xs, ys = [], []
        for r in self.steps:
            y = r.get(key)
            if isinstance(y, int | float):
                xs.append(r["step"] + 1 if x == "step" else self.minutes(r))
                ys.append(y)
        return xs, ys


def load(run_dir: Path) -> Series:
    metrics = Path(run_dir) / "metrics"
    return Series(JsonlTail(metrics / "engine.jsonl").read(), JsonlTail(metrics / "trainer.jsonl").read())


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)


def _panels(plt, title: str):
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4))
    fig.suptitle(title)
    by_step.set_xlabel("trainer step (policy version)")
    by_time.set_xlabel("wall-clock (minutes)")
    for ax in (by_step, by_time):
        ax.grid(alpha=0.3)
        ax.ticklabel_format(axis="y", useOffset=False)  # a flat curve reads as its value, not an offset
    return fig, by_step, by_time


_COLORS = {"trainer": "tab:blue", "engine": "tab:orange", "eval": "tab:green"}
"""One colour per source in every panel."""


def _line(ax, xy, label: str, **kw) -> bool:
    xs, ys = xy
    if not xs:
        return False
    color = _COLORS.get(label.split(":")[0].split()[0], None)
    ax.plot(xs, ys, label=label, marker="." if len(xs) < 50 else None, color=color, **kw)
    ax.legend(loc="best", fontsize=8)
    return True


def plot_run(run_dir: Path) -> list[Path]:
    """Write the PNGs for the run in `run_dir`; returns the files written (none while there is no data)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = load(run_dir)
    out_dir = Path(run_dir) / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    def finish(fig, name: str, drew: bool) -> None:
        if drew:
            fig.tight_layout()
            _save(fig, out_dir / name)
            written.append(out_dir / name)
        plt.close(fig)

    fig, by_step, by_time = _panels(plt, "reward")
    drew = _line(by_step, s.trainer_xy("trainer/reward_mean"), "trainer: batch mean")
    drew |= _line(by_step, s.engine_xy("engine/reward_mean", x="step"), "engine: recent mean", alpha=0.6)
    drew |= _line(by_time, s.trainer_xy("trainer/reward_mean", x="minutes"), "trainer: batch mean")
    drew |= _line(by_time, s.engine_xy("engine/reward_mean"), "engine: recent mean", alpha=0.6)
    finish(fig, "reward.png", drew)

    fig, by_step, by_time = _panels(plt, "eval success rate")
    drew = _line(by_step, s.engine_xy("engine/eval/success", x="step"), "eval success")
    drew |= _line(by_time, s.engine_xy("engine/eval/success"), "eval success")
    for ax in (by_step, by_time):
        ax.set_ylim(-0.02, 1.02)
    finish(fig, "success.png", drew)

    fig, by_step, by_time = _panels(plt, "throughput (tokens/s)")
    drew = _line(by_step, s.trainer_xy("trainer/tokens_per_s"), "trainer: trained tokens/s")
    drew |= _line(by_time, s.engine_xy("engine/tokens_per_s"), "engine: generated tokens/s")
    drew |= _line(by_time, s.trainer_xy("trainer/tokens_per_s", x="minutes"), "trainer: trained tokens/s")
    finish(fig, "throughput.png", drew)

    fig, by_step, by_time = _panels(plt, "staleness (versions)")
    drew = _line(by_step, s.trainer_xy("trainer/staleness_mean"), "trainer: batch mean")
    drew |= _line(by_step, s.trainer_xy("trainer/trajectory_staleness_max"), "trainer: batch max", alpha=0.5,
                  linestyle="--")
    drew |= _line(by_time, s.engine_xy("engine/staleness_mean"), "engine: recent mean")
    drew |= _line(by_time, s.trainer_xy("trainer/staleness_mean", x="minutes"), "trainer: batch mean")
    finish(fig, "staleness.png", drew)
    return written


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m tidal.engine.plots RUN_DIR", file=sys.stderr)
        return 2
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is not installed (pip install 'tidal[train]'): no plots", file=sys.stderr)
        return NO_MATPLOTLIB
    written = plot_run(Path(argv[0]))
    print(f"plots: {', '.join(p.name for p in written) or 'no data yet'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
