"""`tidal bench learning`: the CPU default experiment trained asynchronously and synchronously, to the same
number of trained trajectories.

Each mode is one `tidal run` of the default experiment (bench/experiment.py: the real CLI, the reference
server and the trainer at one torch thread each):
- async: `tidal run` as it is (rollout.mode = "async", max_staleness 2);
- sync: `tidal run --sync` (rollout.mode = "sync", max_staleness 0): generate a batch under one version,
  train, publish, and start the next once the server serves the new version.
Both run max_steps steps of intake.batch_size trajectories (an async batch may hold a few fewer: a group
member that went stale while its group waited is dropped; `trajectories` counts what was trained).
Per run: the wall-clock of the training (engine ready to the trainer's last step; start-up apart),
the final eval success (greedy, 64 held-out seeds, at the last evaluated version), and the CPU
seconds of each child over that wall-clock (`*_cpu_share`: where the time went); `seconds_to_0.9`
is when an evaluation first reached 0.9 (None: never).

The two modes cannot run at once, and a shared machine's speed drifts between runs minutes apart, so
`--rounds N` runs N rounds in ABBA order (async then sync, then sync then async, ...): over an even
number of rounds a machine whose speed drifts linearly in time slows both modes alike. The summary's
`speedup` is sync's total wall-clock over async's, its successes and walls the means over rounds;
`speedup_rounds` has each round's own. The target: async reaches at least `SUCCESS_SHARE` of sync's final success in at most
`WALL_SHARE` of its wall-clock.
`--quick`: one round of 10 steps of 64 episodes per mode (the figures say only that it runs).
"""

from __future__ import annotations

import sys
from pathlib import Path
from statistics import fmean

from tidal.bench.experiment import PINNED, build_model, keep_or_temporary, quick_overrides, run_experiment
from tidal.bench.report import bench_parser, case, emit

__all__ = ["main", "round_order", "summarise", "SUCCESS_SHARE", "WALL_SHARE"]

SUCCESS_SHARE = 0.95
"""Async's final success must reach this share of sync's ..."""
WALL_SHARE = 2 / 3
"""... in at most this share of sync's wall-clock."""
ROUNDS = 2
"""Rounds of the full size (one ABBA pair: about 20 minutes on two cores)."""


def round_order(r: int) -> tuple[str, str]:
    """The modes of round `r` in the order they run: ABBA, so a drift linear in time cancels."""
    return ("async", "sync") if r % 2 == 0 else ("sync", "async")


def _row(mode: str, r: int, figures: dict) -> dict:
    cpu = figures["cpu_s"]
    wall = figures["wall_s"]
    return {"mode": mode, "round": r, "steps": figures["steps"], "trajectories": figures["trajectories"],
            "wall_s": wall, "startup_s": figures["startup_s"], "final_success": figures["final_success"],
            "final_version": figures["final_version"], "first_success": figures["first_success"],
            "train_s": figures["train_s"], "staleness_mean": figures["staleness_mean"],
            "seconds_to_0.9": next((t for _, t, success in figures["curve"] if success >= 0.9), None),
            **{f"{name}_cpu_share": cpu.get(name, 0.0) / wall for name in ("server", "engine", "trainer")},
            "curve": figures["curve"]}


def summarise(rows: list[dict]) -> dict:
    """The summary of every round's rows (see the module docstring)."""
    runs = {mode: [r for r in rows if r["mode"] == mode] for mode in ("async", "sync")}
    wall = {mode: sum(r["wall_s"] for r in runs[mode]) for mode in runs}
    success = {mode: fmean(r["final_success"] for r in runs[mode]) for mode in runs}
    by_round = {(r["round"], r["mode"]): r["wall_s"] for r in rows}
    rounds = sorted({r["round"] for r in rows})
    speedup = wall["sync"] / wall["async"]
    return {"speedup": speedup, "final_success_async": success["async"], "final_success_sync": success["sync"],
            "wall_s_async": wall["async"] / len(runs["async"]), "wall_s_sync": wall["sync"] / len(runs["sync"]),
            "target_met": bool(success["async"] >= SUCCESS_SHARE * success["sync"]
                               and wall["async"] <= WALL_SHARE * wall["sync"]),
            "speedup_rounds": [by_round[k, "sync"] / by_round[k, "async"] for k in rounds]}


def main(argv: list[str]) -> int:
    p = bench_parser("learning", __doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=None, metavar="N",
                   help=f"rounds of both modes, in ABBA order (default {ROUNDS}; 1 with --quick)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V",
                   help="a `tidal run` override for both modes (repeatable), e.g. --set max_steps=100")
    p.add_argument("--keep", metavar="DIR", help="keep the run dirs (logs, metrics) under DIR instead of a temporary one")
    args = p.parse_args(argv)
    rounds = args.rounds if args.rounds is not None else 1 if args.quick else ROUNDS
    if rounds < 1:
        p.error(f"--rounds {rounds}: run at least one round")
    overrides = [*(quick_overrides() if args.quick else []), *args.overrides]
    rows = []
    with keep_or_temporary(args.keep, "tidal-bench-learning-") as tmp:
        model = build_model(Path(tmp) / "model")
        for r in range(rounds):
            for mode in round_order(r):
                with case("learning", f"round {r + 1}/{rounds}, {mode} mode"):
                    rows.append(_row(mode, r, run_experiment(Path(tmp) / f"{mode}-{r}", overrides,
                                                             sync=mode == "sync", model=model)))
    if len({r["steps"] for r in rows}) > 1:
        print(f"tidal bench learning: the runs trained {sorted({r['steps'] for r in rows})} steps (a run "
              "stopped early: max_minutes?); the figures compare unequal work", file=sys.stderr)
    config = {"experiment": "tidal run (the CPU default)", "overrides": overrides, "pinned": list(PINNED),
              "rounds": rounds, "order": "ABBA: " + ", ".join("/".join(round_order(r)) for r in range(rounds)),
              "target": f"async final success >= {SUCCESS_SHARE:g} x sync's, wall <= {WALL_SHARE:.3g} x sync's"}
    emit("learning", config, rows, summarise(rows), args.json_out)
    return 0
