"""The metrics of a run as `tidal run` sees them: the engine's and the trainer's JSONL files, followed as
they grow, the latest figures for the console, and every record forwarded to W&B or TensorBoard.

The JSONL files are the record (each daemon writes its own, `tidal.protocol.telemetry`); everything
here only reads them. A line is read once it is complete (ends in a newline), so a record being
written is never half-parsed; a line that is not a JSON object is skipped and counted, never fatal.
Forwarding is best effort: a sink that fails is disabled with one warning, the run goes on.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Iterable
from pathlib import Path

import msgspec

__all__ = ["JsonlTail", "RunMetrics", "staleness_mean", "open_sinks"]

log = logging.getLogger("tidal.run")

_SOURCES = ("engine", "trainer")


class JsonlTail:
    """The complete lines a JSONL file gains, read incrementally from where the last read stopped."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.offset = 0
        self.bad_lines = 0
        self._partial = b""
        self._decoder = msgspec.json.Decoder(dict)

    def read(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                size = f.seek(0, 2)
                if size < self.offset:  # replaced or truncated: read it again from the start
                    self.offset, self._partial = 0, b""
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        out = []
        for line in lines:
            if not line.strip():
                continue
            try:
                out.append(self._decoder.decode(line))
            except msgspec.DecodeError:
                self.bad_lines += 1
        return out


def staleness_mean(record: dict) -> float | None:
    """Mean of the engine's staleness histogram (`engine/staleness/K`: trajectories K versions old)."""
    total = weighted = 0.0
    for key, n in record.items():
        if key.startswith("engine/staleness/") and isinstance(n, int | float):
            k = int(key.rsplit("/", 1)[1])
            total += n
            weighted += k * n
    return weighted / total if total else None


class RunMetrics:
    """Follows both JSONL files; `poll()` returns the new records and updates `latest`."""

    def __init__(self, engine_jsonl: Path, trainer_jsonl: Path, sinks: Iterable = ()):
        self.tails = {"engine": JsonlTail(engine_jsonl), "trainer": JsonlTail(trainer_jsonl)}
        self.latest: dict[str, float] = {}
        """Every numeric metric's newest value, by name (engine/..., trainer/...)."""
        self.events: dict[str, list[dict]] = {name: [] for name in _SOURCES}
        """Event records (ready, resume, checkpoint, ...) of each source, in order."""
        self.steps = 0
        """Trainer steps done: the newest step record's version + 1."""
        self.started = time.time()
        self.sinks = list(sinks)

    def poll(self) -> list[tuple[str, dict]]:
        new = []
        for source, tail in self.tails.items():
            for record in tail.read():
                new.append((source, record))
                self._take(source, record)
        if new:
            self._forward(new)
        return new

    def _take(self, source: str, record: dict) -> None:
        event = record.get("event")
        if event == "step":
            self.steps = max(self.steps, int(record.get("step") or 0) + 1)
        elif event == "resume":
            self.steps = int(record.get("step") or 0)
        if event is not None and event not in ("step", "publish"):
            self.events[source].append(record)  # ready, resume, eval, ...: kept for whoever waits on them
        numbers = {k: v for k, v in record.items() if "/" in k and isinstance(v, int | float)}
        if source == "engine" and any(k.startswith("engine/staleness/") for k in numbers):
            for key in [k for k in self.latest if k.startswith("engine/staleness/")]:
                del self.latest[key]  # a histogram: the new one replaces the old whole
            mean = staleness_mean(numbers)
            if mean is not None:
                numbers["engine/staleness_mean"] = mean
        self.latest.update(numbers)

    def _forward(self, records: list[tuple[str, dict]]) -> None:
        for sink in list(self.sinks):
            try:
                for source, record in records:
                    sink.log(source, record, self.started)
            except Exception as exc:  # a metrics sink never takes the run down
                log.warning("tidal run: metrics to %s failed, no more are sent there: %s", sink.name, exc)
                self.sinks.remove(sink)

    def close(self) -> None:
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as exc:
                log.warning("tidal run: closing %s failed: %s", sink.name, exc)
        self.sinks = []


def _scalars(record: dict) -> dict[str, float]:
    return {k: float(v) for k, v in record.items() if "/" in k and isinstance(v, int | float)
            and not isinstance(v, bool)}


def _x(source: str, record: dict, started: float) -> int:
    """The x value of a record: the trainer's version for the trainer, seconds into the run for the engine."""
    if source == "trainer":
        return int(record.get("step") or 0)
    return int(max(0.0, float(record.get("time") or started) - started))


class WandbSink:
    """Weights & Biases: engine metrics against seconds into the run, trainer metrics against its version."""

    name = "Weights & Biases"

    def __init__(self, cfg, run_dir: Path, config: dict):
        import wandb

        self.run = wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name or run_dir.name,
                              tags=cfg.tags, mode=cfg.mode, dir=str(run_dir), config=config,
                              settings=wandb.Settings(silent=True, console="off"))
        self.dir = self.run.dir
        self.run.define_metric("run/elapsed_s")
        self.run.define_metric("run/version")
        self.run.define_metric("engine/*", step_metric="run/elapsed_s")
        self.run.define_metric("trainer/*", step_metric="run/version")

    def log(self, source: str, record: dict, started: float) -> None:
        scalars = _scalars(record)
        if scalars:
            axis = "run/version" if source == "trainer" else "run/elapsed_s"
            self.run.log({axis: _x(source, record, started), **scalars})

    def close(self) -> None:
        self.run.finish()


class TensorBoardSink:
    """TensorBoard event files: the same axes as WandbSink."""

    name = "TensorBoard"

    def __init__(self, log_dir: Path):
        # torch's writer (it needs the tensorboard package): only in `tidal run`'s own process, and only when
        # TensorBoard is configured; the engine process never comes here (tests/engine: no torch imported).
        writer = importlib.import_module("torch.utils.tensorboard").SummaryWriter
        self.writer = writer(str(log_dir))

    def log(self, source: str, record: dict, started: float) -> None:
        step, walltime = _x(source, record, started), record.get("time")
        for key, value in _scalars(record).items():
            self.writer.add_scalar(key, value, step, walltime=walltime)

    def close(self) -> None:
        self.writer.close()


def open_sinks(cfg, run_dir: Path, tensorboard_dir: Path, config: dict, warn) -> list:
    """The sinks the run's config asks for (`cfg` is a RunConfig); a missing package is one warning."""
    sinks = []
    if cfg.wandb.mode != "disabled":
        try:
            sinks.append(WandbSink(cfg.wandb, run_dir, config))
            if cfg.wandb.mode == "offline":
                warn(f"Weights & Biases offline run in {Path(sinks[-1].dir).parent} (`wandb sync` it later)")
        except ImportError:
            warn("wandb is not installed (pip install 'tidal[wandb]'); wandb.mode ignored")
        except Exception as exc:
            warn(f"Weights & Biases could not start ({type(exc).__name__}: {exc}); wandb.mode ignored")
    if cfg.tensorboard.enabled:
        try:
            sinks.append(TensorBoardSink(tensorboard_dir))
        except ImportError:
            warn("tensorboard is not installed (pip install 'tidal[tensorboard]'); tensorboard.enabled ignored")
    return sinks
