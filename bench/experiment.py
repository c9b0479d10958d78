"""One `tidal run` of the CPU default experiment, measured from outside: what `tidal bench learning` and
`tidal bench staleness` run.

`run_experiment(run_dir, overrides)` starts `python -m tidal run` (the real CLI, engine/run.py) with the
default experiment (engine/runconfig.py) and `overrides` as `--set K=V`, waits for it to end and reads
the figures back from the run's own records, so nothing in the run changes for being measured:
- run.jsonl: when the engine was ready (training starts) and why the run ended;
- metrics/trainer.jsonl: every step's time, trajectories, step time and staleness;
- metrics/engine.jsonl: the eval records (`engine/eval/success`, greedy, held-out seeds) at each version.
Every run pins the reference server and the trainer to one torch thread each (`PINNED`), so runs
share the cores alike; the engine never loads torch. Console and plots are off (`QUIET`): a plot
child would take CPU from the run it draws. While the run goes, the CPU seconds of each child
(/proc/PID/stat) are sampled, so a result says which process the time went to.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tidal.bench.engine_child import proc_cpu_s
from tidal.engine.runconfig import TASK_BUILDER
from tidal.engine.runmetrics import JsonlTail
from tidal.engine.runstart import build_argv

__all__ = ["PINNED", "QUIET", "build_model", "keep_or_temporary", "run_experiment", "quick_overrides"]

PINNED = ("inference.model.threads=1", "trainer.distributed.threads=1")
"""One torch thread for the reference server and for the trainer."""
QUIET = ('console.mode="off"', "plots.enabled=false")
SAMPLE_S = 0.5
"""Period of the CPU samples of the children."""
CHILDREN = ("server", "trainer", "engine")


def quick_overrides(steps: int = 10) -> list[str]:
    """The small size of the default experiment (`--quick`): `steps` steps of 64 episodes, the cosine
    schedule shortened with it, eval every 5 versions on 16 episodes."""
    return [f"max_steps={steps}", "trainer.intake.batch_size=64", "engine.rollout.max_concurrent=64",
            f"trainer.learner.optim.total_steps={steps * 8}", "engine.eval.episodes=16"]


@contextmanager
def keep_or_temporary(keep: str | None, prefix: str) -> Iterator[str]:
    """`keep` (created; the runs stay there for a look afterwards), or a temporary directory."""
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        yield keep
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield tmp


def build_model(path: Path) -> Path:
    """The default experiment's model, built once into `path` (engine/build_model.py, as `tidal run` does),
    so that the runs of a bench share it and none spends its start-up building it again."""
    if not path.is_dir():
        subprocess.run(build_argv(TASK_BUILDER, path, {}), check=True, stdout=subprocess.DEVNULL)
    return path


def _children(events: list[dict]) -> dict[str, int]:
    """The latest pid of each child, from run.jsonl's `started` events."""
    return {e["child"]: int(e["pid"]) for e in events if e.get("event") == "started" and e.get("child") in CHILDREN}


def _sample(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds of each child now (a child that ended is left out)."""
    cpu = {}
    for name, pid in pids.items():
        try:
            cpu[name] = proc_cpu_s(pid)
        except (OSError, ValueError, IndexError):
            pass
    return cpu


def _cpu_between(samples: list[tuple[float, dict[str, float]]], t0: float, t1: float) -> dict[str, float]:
    """CPU seconds each child spent from `t0` to `t1` (wall-clock times), from the samples nearest inside."""
    inside = [(t, cpu) for t, cpu in samples if t0 <= t <= t1]
    if len(inside) < 2:
        return {}
    (a, first), (b, last) = inside[0], inside[-1]
    return {name: (last[name] - first[name]) * (t1 - t0) / (b - a) for name in CHILDREN
            if name in first and name in last}


def run_experiment(run_dir: Path, overrides: list[str], *, sync: bool = False, model: Path | None = None,
                   timeout_s: float = 1800.0) -> dict:
    """Run the experiment once into `run_dir` (on `model`, from `build_model`, else built by the run) and
    return its figures (see `_figures`)."""
    argv = [sys.executable, "-m", "tidal", "run", "--run-dir", str(run_dir)]
    argv += ["--sync"] if sync else []
    given = [f"model.path={json.dumps(str(model))}"] if model else []
    for item in (*PINNED, *QUIET, *given, *overrides):
        argv += ["--set", item]
    if run_dir.exists():  # tidal run would resume the run there
        raise FileExistsError(f"{run_dir} exists: a bench runs every experiment from its start (an empty --keep)")
    run_dir.mkdir(parents=True)
    log_path = run_dir.parent / f"{run_dir.name}.log"
    events = JsonlTail(run_dir / "run.jsonl")
    seen: list[dict] = []
    samples: list[tuple[float, dict[str, float]]] = []
    started = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            while proc.poll() is None:
                if time.monotonic() - started > timeout_s:
                    raise TimeoutError(f"tidal run still running after {timeout_s:g} s")
                seen += events.read()
                samples.append((time.time(), _sample(_children(seen))))
                time.sleep(SAMPLE_S)
        finally:
            if proc.poll() is None:
                proc.terminate()  # tidal run stops its children (engine/supervise.py), then exits
                try:
                    proc.wait(120)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    run_s = time.monotonic() - started
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"tidal run exited with {proc.returncode} ({' '.join(argv)}):\n{tail}")
    return _figures(run_dir, run_s, samples)


def _figures(run_dir: Path, run_s: float, samples: list[tuple[float, dict[str, float]]]) -> dict:
    """What a run shows, from its records:
    - wall_s: from the engine's `ready` to the trainer's last step (the training; start-up, the same
      in every configuration, is `startup_s`, and `run_s` is the whole `tidal run`);
    - final_success, final_version: the last evaluation's success and the version it evaluated;
    - curve: every evaluation as [version, seconds since the engine was ready, success];
    - trajectories: trained trajectories (sum of each step's batch);
    - staleness_mean, staleness_max: mean over steps of the trainer's token staleness mean, and its
      largest; stale_dropped: trajectories the trainer dropped as too stale;
    - train_s: the trainer's step time summed; cpu_s: CPU seconds of each child during `wall_s`
      (scaled from the samples taken inside it)."""
    events = JsonlTail(run_dir / "run.jsonl").read()
    start = next(e["time"] for e in events if e.get("event") == "start")
    ready = [e["time"] for e in events if e.get("event") == "ready" and e.get("child") == "engine"][0]
    steps = {int(r["step"]): r for r in JsonlTail(run_dir / "metrics" / "trainer.jsonl").read()
             if r.get("event") == "step"}
    records = [steps[k] for k in sorted(steps)]
    if not records:
        raise RuntimeError(f"{run_dir}: the trainer recorded no step")
    evals = [r for r in JsonlTail(run_dir / "metrics" / "engine.jsonl").read() if r.get("event") == "eval"]
    if not evals:
        raise RuntimeError(f"{run_dir}: the engine recorded no evaluation")
    last = records[-1]
    return {
        "steps": len(records),
        "trajectories": int(sum(r.get("trainer/batch_trajectories", 0) for r in records)),
        "wall_s": last["time"] - ready,
        "startup_s": ready - start,
        "run_s": run_s,
        "final_success": evals[-1]["engine/eval/success"],
        "final_version": int(evals[-1]["step"]),
        "first_success": evals[0]["engine/eval/success"],
        "train_s": sum(r.get("trainer/step_s", 0.0) for r in records),
        "staleness_mean": sum(r.get("trainer/staleness_mean", 0.0) for r in records) / len(records),
        "staleness_max": max(r.get("trainer/staleness_max", 0.0) for r in records),
        "stale_dropped": int(last.get("trainer/intake/stale_dropped", 0)),
        "cpu_s": {name: round(v, 2) for name, v in _cpu_between(samples, ready, last["time"]).items()},
        "curve": [[int(e["step"]), round(e["time"] - ready, 2), e["engine/eval/success"]] for e in evals],
    }

