"""`tidal bench staleness`: the CPU default experiment at max_staleness 0, 2 and 8, each trained with
decoupled PPO and with plain PPO against the behaviour policy.

Six `tidal run`s of the default experiment (bench/experiment.py), one per cell:
- objective `decoupled` (loss.proximal = "recompute", the default): ratio pi_theta / pi_prox clipped,
  weight min(pi_prox / mu, C), pi_prox recomputed by the trainer (AReaL arXiv:2505.24298);
- objective `plain` (loss.proximal = "behaviour"): ratio pi_theta / mu clipped, weight 1, no pi_prox
  pass: PPO as if the data were on-policy;
- max_staleness 0 is `tidal run --sync`; 2 and 8 are async with trainer.intake.max_staleness set, and
  the engine allowed to run ahead: rollout.max_concurrent = (1 + s) batches, so episodes of up to s
  versions ahead are in flight and arrive that stale (the measured staleness of each cell is reported
  from the trainer's metrics: the mean over steps of trainer/staleness_mean, and its largest).
Per cell: final eval success, wall-clock of the training, eval success at each evaluated version.
A PNG of the curves (eval success against version and against wall-clock) goes to `--png`, or beside
`--json OUT` as OUT with .png. No target: AReaL reports that naive PPO degrades as staleness grows
while the decoupled objective holds; one seed per cell on a noisy machine shows a trend at best.
`--quick`: 5 steps of 64 episodes per cell.
"""

from __future__ import annotations

from pathlib import Path

from tidal.bench.experiment import PINNED, build_model, keep_or_temporary, quick_overrides, run_experiment
from tidal.bench.report import bench_parser, case, emit

__all__ = ["main", "STALENESS", "OBJECTIVES"]

STALENESS = (0, 2, 8)
OBJECTIVES = {"decoupled": "recompute", "plain": "behaviour"}
"""Objective name -> loss.proximal."""
BATCH = 256
"""The default experiment's trajectories per step (trainer.intake.batch_size); --quick uses 64."""


def _overrides(staleness: int, proximal: str, batch: int) -> list[str]:
    cell = [f"trainer.learner.loss.proximal={proximal}"]
    if staleness:
        cell += [f"trainer.intake.max_staleness={staleness}", f"engine.rollout.max_concurrent={(1 + staleness) * batch}"]
    return cell


def _plot(rows: list[dict], path: Path) -> bool:
    """Eval success against version and against wall-clock, one line per cell; False without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_version, by_time) = plt.subplots(1, 2, figsize=(11, 4))
    fig.suptitle("eval success: decoupled PPO (solid) vs plain PPO against mu (dashed)")
    colors = {0: "tab:blue", 2: "tab:orange", 8: "tab:red"}
    for r in rows:
        versions, seconds, success = zip(*r["curve"], strict=True)
        style = {"color": colors.get(r["max_staleness"]), "linestyle": "-" if r["objective"] == "decoupled" else "--",
                 "label": f"s={r['max_staleness']} {r['objective']}", "marker": "."}
        by_version.plot(versions, success, **style)
        by_time.plot(seconds, success, **style)
    by_version.set_xlabel("policy version (trainer step)")
    by_time.set_xlabel("seconds since the engine was ready")
    for ax in (by_version, by_time):
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
    return True


def main(argv: list[str]) -> int:
    p = bench_parser("staleness", __doc__.splitlines()[0])
    p.add_argument("--png", help="where the curves go (default: beside --json OUT, as OUT with .png)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V",
                   help="a `tidal run` override for every cell (repeatable)")
    p.add_argument("--keep", metavar="DIR", help="keep the run dirs (logs, metrics) under DIR instead of a temporary one")
    args = p.parse_args(argv)
    common = [*(quick_overrides(steps=5) if args.quick else []), *args.overrides]
    batch = 64 if args.quick else BATCH
    rows = []
    with keep_or_temporary(args.keep, "tidal-bench-staleness-") as tmp:
        model = build_model(Path(tmp) / "model")
        for staleness in STALENESS:
            for objective, proximal in OBJECTIVES.items():
                name = f"s{staleness}-{objective}"
                with case("staleness", f"max_staleness {staleness}, {objective}"):
                    f = run_experiment(Path(tmp) / name, [*common, *_overrides(staleness, proximal, batch)],
                                       sync=staleness == 0, model=model)
                rows.append({"max_staleness": staleness, "objective": objective, "steps": f["steps"],
                             "final_success": f["final_success"], "final_version": f["final_version"],
                             "wall_s": f["wall_s"], "staleness_mean": f["staleness_mean"],
                             "staleness_max": f["staleness_max"], "stale_dropped": f["stale_dropped"],
                             "curve": f["curve"]})
    png = Path(args.png) if args.png else Path(args.json_out).with_suffix(".png") if args.json_out else None
    drawn = png is not None and _plot(rows, png)
    at = {(r["max_staleness"], r["objective"]): r for r in rows}
    summary = {}
    for s in STALENESS:
        for objective in OBJECTIVES:
            summary[f"final_success_s{s}_{objective}"] = at[s, objective]["final_success"]
    for s in STALENESS:
        summary[f"staleness_mean_s{s}"] = sum(at[s, o]["staleness_mean"] for o in OBJECTIVES) / len(OBJECTIVES)
    summary["png"] = str(png) if drawn else ""
    config = {"experiment": "tidal run (the CPU default)", "overrides": common, "pinned": list(PINNED),
              "cells": {f"s{s}-{o}": _overrides(s, proximal, batch) + (["--sync"] if s == 0 else [])
                        for s in STALENESS for o, proximal in OBJECTIVES.items()}}
    emit("staleness", config, rows, summary, args.json_out)
    return 0
