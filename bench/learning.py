"""`tidal bench learning`: the CPU default experiment trained asynchronously and synchronously, to the same
number of trained trajectories.

Each mode is one `tidal run` of the default experiment (bench/experiment.py: the real CLI, the reference
server and the trainer at one torch thread each):
- async: `tidal run` as it is (rollout.mode = "async", max_staleness 1);
- sync: `tidal run --sync` (rollout.mode = "sync", max_staleness 0): generate a batch under one version,
  train, publish, and start the next once the server serves the new version.
Both run max_steps steps of intake.batch_size trajectories (an async batch may hold a few fewer: a group
member that went stale while its group waited is dropped; `trajectories` counts what was trained).
Per mode: the wall-clock of the training (engine ready to the trainer's last step; start-up apart),
the final eval success (greedy, 64 held-out seeds, at the last evaluated version), and the CPU
seconds of each child over that wall-clock (`*_cpu_share`: where the time went); `seconds_to_0.9`
is when an evaluation first reached 0.9 (None: never). The target:
async reaches at least `SUCCESS_SHARE` of sync's final success in at most `WALL_SHARE` of its wall-clock.
`--quick`: 10 steps of 64 episodes per mode (the figures say only that it runs).
"""

from __future__ import annotations

import sys
from pathlib import Path

from tidal.bench.experiment import PINNED, build_model, keep_or_temporary, quick_overrides, run_experiment
from tidal.bench.report import bench_parser, case, emit

__all__ = ["main", "SUCCESS_SHARE", "WALL_SHARE"]

SUCCESS_SHARE = 0.95
"""Async's final success must reach this share of sync's ..."""
WALL_SHARE = 2 / 3
"""... in at most this share of sync's wall-clock."""


def _row(mode: str, figures: dict) -> dict:
    cpu = figures["cpu_s"]
    wall = figures["wall_s"]
    return {"mode": mode, "steps": figures["steps"], "trajectories": figures["trajectories"], "wall_s": wall,
            "startup_s": figures["startup_s"], "final_success": figures["final_success"],
            "final_version": figures["final_version"], "first_success": figures["first_success"],
            "train_s": figures["train_s"], "staleness_mean": figures["staleness_mean"],
            "seconds_to_0.9": next((t for _, t, success in figures["curve"] if success >= 0.9), None),
            **{f"{name}_cpu_share": cpu.get(name, 0.0) / wall for name in ("server", "engine", "trainer")},
            "curve": figures["curve"]}


def main(argv: list[str]) -> int:
    p = bench_parser("learning", __doc__.splitlines()[0])
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V",
                   help="a `tidal run` override for both modes (repeatable), e.g. --set max_steps=100")
    p.add_argument("--keep", metavar="DIR", help="keep the run dirs (logs, metrics) under DIR instead of a temporary one")
    args = p.parse_args(argv)
    overrides = [*(quick_overrides() if args.quick else []), *args.overrides]
    rows = []
    with keep_or_temporary(args.keep, "tidal-bench-learning-") as tmp:
        model = build_model(Path(tmp) / "model")
        for mode in ("async", "sync"):
            with case("learning", f"{mode} mode"):
                rows.append(_row(mode, run_experiment(Path(tmp) / mode, overrides, sync=mode == "sync",
                                                      model=model)))
    at = {r["mode"]: r for r in rows}
    if at["async"]["steps"] != at["sync"]["steps"]:
        print(f"tidal bench learning: the modes ran {at['async']['steps']} and {at['sync']['steps']} steps (a "
              "run stopped early: max_minutes?); the figures compare unequal work", file=sys.stderr)
    a, s = at["async"], at["sync"]
    summary = {"speedup": s["wall_s"] / a["wall_s"], "final_success_async": a["final_success"],
               "final_success_sync": s["final_success"], "wall_s_async": a["wall_s"], "wall_s_sync": s["wall_s"],
               "target_met": bool(a["final_success"] >= SUCCESS_SHARE * s["final_success"]
                                  and a["wall_s"] <= WALL_SHARE * s["wall_s"])}
    config = {"experiment": "tidal run (the CPU default)", "overrides": overrides, "pinned": list(PINNED),
              "target": f"async final success >= {SUCCESS_SHARE:g} x sync's, wall <= {WALL_SHARE:.3g} x sync's"}
    emit("learning", config, rows, summary, args.json_out)
    return 0
