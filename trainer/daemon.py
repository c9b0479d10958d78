"""`tidal trainer CONFIG`: the long-running trainer daemon (also `python -m tidal.trainer`, torchrun-able).

Loop: intake -> one optimizer step -> TrainerStatus -> publish weights when due -> checkpoint when
due -> acknowledge what the checkpoint covers. It resumes by itself from the newest checkpoint, so a
trainer killed at any point and restarted continues at the checkpoint's version, and with the
channel's resends every trajectory is used exactly once (docs/architecture.md invariant 4). SIGTERM (or SIGINT)
is a staged shutdown: finish the running step, write a checkpoint, acknowledge, exit 0.

A step that fails (an exception from the model, an out-of-memory, a loss that is not finite) is bad
input, not a crash: it is logged with its traceback, counted (`trainer/step_errors`), leaves the
model and optimiser as they were (trainer/learner.py `train_step`), and its batch goes to the dead
letter (trainer/dead_letter.py), durably, before its deliveries are acknowledged like any other;
then the next batch trains. `failures.max_consecutive` failed steps in a row stop the daemon with an
error (after the usual final checkpoint), as a fault that persists is not the data's.

Under torchrun that holds for a non-finite step, which every rank sees alike and all ranks agree on
(`_step_together`). Any other exception may be one rank's alone while the others wait in a
collective; the rank that raised ends the whole job at once (trainer/distributed.py `abort`), and
rank 0 neither dead-letters nor acknowledges the batch: torchrun's agent stops the group and, with
`--max-restarts`, restarts it from the last checkpoint, and the engines resend the batch.

Each step writes one JSONL record (metrics, and the ids of the trajectories it used: the ledger
tests and `tidal bench soak` check for loss and reuse), and the trajectories dropped (stale, or
rejected as untrainable) go to `dropped` records, one per version they were dropped at, written after
each step and when a checkpoint's snapshot is taken; a resume writes `{"event": "resume", "step": v}`,
after which records of steps >= v, and of drops at versions > v, from before the restart are superseded.

Trajectories sampled with settings the learner cannot reproduce (top-p, top-k, a logit mask:
trainer/sampling.py) are trained on but counted (`trainer/restricted_sampling`), warned about on
stderr and in a `restricted_sampling` record (once, then every `sampling.WARN_EVERY` of them), and
reported in `TrainerStatus.health` while the latest batch holds any.
"""

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import time
import traceback
from typing import NoReturn

import msgspec
import zmq
from rich.console import Console
from tidal.protocol.config import add_config_args, load_config, load_partial, to_toml
from tidal.protocol.errors import TidalError
from tidal.protocol.grants import GrantTable
from tidal.protocol.messages import TrainerStatus, WeightsPublished
from tidal.protocol.model_source import resolve_model
from tidal.protocol.startup import StartupError, add_debug_arg, fail, reason
from tidal.protocol.telemetry import Telemetry as SinkTelemetry
from tidal.trainer.checkpoint import Checkpointer, CheckpointMeta
from tidal.trainer.config import MetricsConfig, TrainerConfig
from tidal.trainer.dead_letter import DeadLetter
from tidal.trainer.distributed import (
    GATHER_STATE,
    GATHER_WEIGHTS,
    IDLE,
    STEP,
    STOP,
    RanksDisagree,
    World,
    abort,
)
from tidal.trainer.intake import Batch, Intake, IntakePump
from tidal.trainer.learner import NonFiniteStep
from tidal.trainer.publish import DiskPublisher, PublishError, make_publisher
from tidal.trainer.sampling import SamplingMonitor

__all__ = ["main", "Daemon"]

log = logging.getLogger(__name__)

GRANT_EVERY_S = 0.2
"""Longest wait between two turns of the engines' heartbeats into grants; a heartbeat that reports
episodes (`TrajectoryReceiver.reported`) starts a turn at once, so an engine that reports freed slots
is granted them within a round trip."""
REBROADCAST_AFTER_S = 2.0
"""Wait before a failed publish is tried again (each broadcast try takes at most publish.timeout_s).
A broadcast that failed midway leaves servers holding part of it, and the engine keeps them out of
rotation until a version reaches them; a disk write that failed (a full disk) leaves the servers
behind, and the engine stops admitting once they are further behind than max_staleness. Either way,
waiting for the next step's version could wait forever (no generation, no batch, no step)."""
ACK_GRACE_S = 0.2
"""After the final checkpoint's commit, time for the receiver's ack task to send before the socket closes.
The receiver also flushes acks as it closes, but over ipc:// those can be lost; a lost ack costs only a
resend to the next trainer, which drops it as committed, yet a clean stop should leave engines empty."""



def _torch_setup(seed: int, threads: int) -> None:
    """Seeds, and the intra-op threads (`distributed.threads`), before torch builds anything."""
    import random

    import numpy as np
    import torch

    if threads:
        torch.set_num_threads(threads)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _build_learner(cfg: TrainerConfig, world: World):
    from tidal.trainer.learner import Learner

    try:  # a missing directory or an unreachable hub id: one line, at once, before torch loads anything
        resolve_model(cfg.learner.model.path)
    except StartupError as exc:
        raise StartupError(f"learner.model.path: {exc}") from None
    try:
        learner = Learner(
            cfg.learner, device=world.device, rank=world.rank, world_size=world.size,
            all_reduce=world.all_reduce if world.distributed else None,
        )
    except (OSError, ValueError) as exc:  # transformers' errors for a missing, incomplete or broken model
        raise TidalError(f"learner.model.path {cfg.learner.model.path!r}: cannot load the model: "
                         f"{reason(exc)}") from None
    world.parallelize(learner)
    return learner


class Telemetry:
    """The daemon's records: JSONL + Prometheus (tidal.protocol.telemetry), optional TensorBoard, rich console.

    Every record's `step` is the version it concerns; `event` says what happened (start, resume,
    ready, step, publish, checkpoint). A step record carries its metrics and `ids`, the
    comma-separated ids of the trajectories it used (the ledger).
    """

    def __init__(self, cfg: MetricsConfig):
        port = cfg.prometheus_port if cfg.prometheus_port >= 0 else None
        self.sink = SinkTelemetry(cfg.jsonl or None, prometheus_port=port)
        self._tb = None
        if cfg.tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("tidal trainer: tensorboard is not installed; metrics.tensorboard_dir ignored", file=sys.stderr)
            else:
                self._tb = SummaryWriter(cfg.tensorboard_dir)
        self._console = Console(stderr=True) if cfg.console else None

    def event(self, name: str, version: int, **fields: str | float) -> None:
        self.sink.log({"event": name, **fields}, step=version)
        if self._console is not None:
            self._console.log(f"[bold]{name}[/bold] v{version} " + " ".join(f"{k}={v}" for k, v in fields.items()))

    def step(self, version: int, metrics: dict[str, float], ids: list[str]) -> None:
        self.sink.log({"event": "step", "ids": ",".join(ids), **metrics}, step=version)
        self._board(version, metrics)
        if self._console is not None:
            shown = ("trainer/loss", "trainer/tokens_per_s", "trainer/staleness_mean", "trainer/intake/stale_dropped")
            self._console.log(f"step v{version} -> v{version + 1} " + " ".join(
                f"{k.rsplit('/', 1)[-1]}={metrics[k]:.4g}" for k in shown if k in metrics
            ))

    def step_error(self, version: int, metrics: dict[str, float], ids: list[str], error: str, tb: str) -> None:
        self.sink.log({"event": "step_error", "ids": ",".join(ids), "error": error, "traceback": tb, **metrics},
                      step=version)
        self._board(version, metrics)
        if self._console is not None:
            self._console.log(f"[bold red]step v{version} failed[/bold red] ({len(ids)} trajectories to the "
                              f"dead letter): {error}")

    def dropped(self, drops: list[tuple[str, str, int]]) -> None:
        """One `dropped` record per version: the comma-separated ids dropped as `stale` and as `rejected`."""
        by_version: dict[int, dict[str, list[str]]] = {}
        for traj_id, why, version in drops:
            by_version.setdefault(version, {"stale": [], "rejected": []})[why].append(traj_id)
        for version, ids in by_version.items():
            self.sink.log({"event": "dropped", **{k: ",".join(v) for k, v in ids.items()}}, step=version)

    def publish(self, version: int, metrics: dict[str, float]) -> None:
        self.sink.log({"event": "publish", **metrics}, step=version)
        self._board(version, metrics)

    def _board(self, version: int, metrics: dict[str, float]) -> None:
        if self._tb is not None:
            for key, value in metrics.items():
                self._tb.add_scalar(key, value, version)

    def close(self) -> None:
        self.sink.close()
        if self._tb is not None:
            self._tb.close()


class Daemon:
    """Rank 0's trainer: owns the channels, the intake, checkpoints and publishing."""

    def __init__(self, cfg: TrainerConfig, world: World):
        self.cfg = cfg
        self.world = world
        self.learner = _build_learner(cfg, world)
        self.checkpointer = Checkpointer(cfg.checkpoint)
        self.checkpointer.discard_partial()
        self.telemetry = Telemetry(cfg.metrics)
        self.dead_letter = DeadLetter(cfg.failures.dead_letter)
        self.counters: dict[str, float] = {"steps": 0, "trajectories": 0, "tokens": 0, "step_errors": 0,
                                           "step_errors_non_finite": 0, "dead_lettered": 0,
                                           "restricted_sampling": 0}
        self.failing = 0
        """Failed steps in a row."""
        self.failure: str | None = None
        """Why the daemon stops on its own (`failures.max_consecutive` reached), or None."""
        self.dedup = None
        restored = self.checkpointer.load()
        self.resumed_from = None if restored is None else restored.path
        if restored is not None:
            self.world.load_state(self.learner, restored.learner_state)
            self.intake = Intake(cfg.intake, restored.meta.intake, check=self._untrainable)
            self.counters.update(restored.meta.counters)
            self.dedup = restored.meta.dedup
            self.telemetry.event("resume", self.version, path=str(restored.path))
        else:
            self.intake = Intake(cfg.intake, check=self._untrainable)
            self.telemetry.event("start", self.version)
        self.sampling = SamplingMonitor(int(self.counters["restricted_sampling"]),
                                        vocab_size=self.learner.vocab_size)
        """Restricted sampling among trained trajectories (trainer/sampling.py): counted, warned, in health."""
        self.publisher = make_publisher(cfg.publish, cfg.learner.model.path, announce=self._announce)
        self.grants = GrantTable(group_size=cfg.intake.group_size, gone_after_s=cfg.intake.engine_timeout_s)
        """The staleness budget shared among engines (tidal.protocol.grants), sent in every status."""
        self._stop = asyncio.Event()
        self._checkpointed = None if restored is None else restored.meta.version
        self._publishing: asyncio.Task | None = None
        self._saving: asyncio.Task | None = None
        self.health = "ok"

    @property
    def version(self) -> int:
        return self.learner.version

    def _untrainable(self, traj) -> str | None:
        """Why this model cannot train `traj` (the intake rejects and counts it), or None."""
        positions = getattr(self.learner.base_model.config, "max_position_embeddings", None)
        if positions is not None and len(traj) > positions:
            return f"trajectory {traj.id}: {len(traj)} tokens, more than the model's {positions} positions"
        return self.learner.reject_reason(traj)

    def status(self, health: str | None = None) -> TrainerStatus:
        """The status to publish; health is `health`, else the latest failure, else a warning about the
        latest batch's sampling (`SamplingMonitor.health`), else "ok"."""
        if health is None:
            health = self.health if self.health != "ok" else self.sampling.health or "ok"
        status = TrainerStatus(
            version=self.version, consumed=int(self.counters["trajectories"]), dropped=self.dropped,
            batch_size=self.cfg.intake.batch_size, max_staleness=self.cfg.intake.max_staleness,
            health=health, max_uncommitted=self.cfg.intake.max_uncommitted,
        )
        return msgspec.structs.replace(status, grants=self.grants.allocate(status.budget))

    async def _grant(self, rx) -> None:
        """Share the budget among the engines the trajectory channel hears from (their heartbeats say
        what they started and run), and publish the status whenever a grant changes."""
        while True:
            rx.reported.clear()
            now = time.monotonic()
            before = self.grants.grants()  # a grant raised by a heartbeat is news too
            for (engine_id, epoch), (hello, heard) in list(rx.engines.items()):
                self.grants.heard(engine_id, epoch, started=hello.started, in_flight=hello.in_flight,
                                  capacity=hello.capacity, now=heard)
            for key in self.grants.expire(now):
                engine_id, _, epoch = key.rpartition("/")
                rx.engines.pop((engine_id, int(epoch)), None)
                log.warning("engine %s went silent: its unfinished episodes count as lost (%d so far)",
                            key, self.grants.lost)
            status = self.status()
            if status.grants != before:
                await self.status_pub.publish(status)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(GRANT_EVERY_S):
                    await rx.reported.wait()

    @property
    def dropped(self) -> int:
        """`TrainerStatus.dropped`: taken, never to be trained on, since the first start (intake's
        counters are checkpointed with it)."""
        c = self.intake.counters
        return int(self.counters["dead_lettered"] + c["rejected"] + c["stale_dropped"])

    async def run(self) -> int:
        from tidal.protocol.channels import DedupState, StatusPublisher, TrajectoryReceiver
        from tidal.protocol.channels.curve import server_keys

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        dedup = msgspec.msgpack.decode(self.dedup, type=DedupState) if self.dedup else None
        async with contextlib.AsyncExitStack() as stack:
            intake = self.cfg.intake
            curve = server_keys(intake.curve_secret_key, intake.curve_allowed_dir)  # ConfigError names the key
            try:
                rx = await stack.enter_async_context(TrajectoryReceiver(
                    intake.endpoint, capacity=intake.capacity, dedup_state=dedup, curve=curve))
                status = await stack.enter_async_context(StatusPublisher(intake.status_endpoint, curve=curve))
            except zmq.ZMQError as exc:
                raise TidalError(
                    f"cannot bind intake.endpoint {intake.endpoint!r} / intake.status_endpoint "
                    f"{intake.status_endpoint!r}: {exc}"
                ) from None
            self.receiver, self.status_pub = rx, status
            self._pump = pump = IntakePump(rx, self.intake, lambda: self.learner.version)
            if self.publisher is not None:
                await self.publisher.start()
            await status.publish(self.status())
            urls = {"prometheus_url": self.telemetry.sink.prometheus_url} if self.telemetry.sink.prometheus_port else {}
            self.telemetry.event("ready", self.version, endpoint=rx.endpoint, status_endpoint=status.endpoint,
                                 device=self.world.device, dtype=self.learner.dtype, **urls)
            lost_future = isinstance(self.publisher, DiskPublisher) and self.publisher.published(after=self.version)
            if self.resumed_from is not None or lost_future:
                # Servers may serve versions this trainer published after its checkpoint (or, with none, in
                # an earlier run) and then lost; the trainer's weights, published again, put them back in
                # step with it. After `ready`: a distributed publish waits for the engine, which may be
                # wired from that record.
                await self._maybe_publish(force=True)
                await self._published()
            try:
                async with asyncio.TaskGroup() as tg:
                    pumping = tg.create_task(pump.run())
                    granting = tg.create_task(self._grant(rx))
                    await self._loop()
                    await self._checkpoint()
                    await self._checkpointed_all()
                    await asyncio.sleep(ACK_GRACE_S)
                    pumping.cancel()
                    granting.cancel()
            except ExceptionGroup as group:  # a TidalError alone (a checkpoint on a full disk): main's one line
                if len(group.exceptions) == 1 and isinstance(group.exceptions[0], TidalError):
                    raise group.exceptions[0] from None
                raise
            finally:
                self._stop.set()  # training is over: a failed publish is not tried again
                await self._checkpointed_all()
                await self._published()
                if self.world.distributed:
                    await asyncio.to_thread(self.world.send, STOP)
                if self.publisher is not None:
                    await self.publisher.close()
                await status.publish(self.status(health="stopped" if self.failure is None else self.failure[:200]))
        if self.failure is not None:
            raise TidalError(self.failure)
        return 0

    async def _loop(self) -> None:
        cfg, pump = self.cfg, self._pump
        stopping = asyncio.create_task(self._stop.wait())
        try:
            while not self._stop.is_set():
                if cfg.max_steps and self.version >= cfg.max_steps:
                    return
                waiting = asyncio.create_task(pump.next_batch())
                pressed = asyncio.create_task(pump.pressure.wait())
                try:  # the other ranks wait for the next command meanwhile: IDLE keeps them waiting
                    await self.world.keep_alive({waiting, stopping, pressed}, cfg.distributed.idle_every_s)
                except Exception as exc:  # an IDLE broadcast failed: another rank is gone
                    self._abort("telling the other ranks to keep waiting failed", exc)
                pressed.cancel()
                if not waiting.done():  # next_batch holds nothing across an await: cancelling loses nothing
                    waiting.cancel()
                    await asyncio.gather(waiting, return_exceptions=True)
                if waiting.cancelled():
                    if not self._stop.is_set():
                        await self._checkpoint()  # intake pressure between steps
                    continue
                trained = await self._step(waiting.result())
                if cfg.intake.commit == "step":
                    pump.stepped()  # a failed batch is in the dead letter by now: acknowledged too
                if self.failure is not None:
                    return
                if trained:
                    await self._maybe_publish()
                due = trained and cfg.checkpoint.every_steps and self.version % cfg.checkpoint.every_steps == 0
                if due or pump.pressure.is_set():
                    await self._checkpoint()
        finally:
            stopping.cancel()

    async def _step(self, batch: Batch) -> bool:
        """Train one batch; False if the step failed (handled by `_failed`)."""
        version = self.version
        try:
            metrics = await asyncio.to_thread(self._train, batch.trajectories)
        except Exception as exc:  # bad input: counted and dead-lettered, the daemon goes on
            if self.world.distributed and not isinstance(exc, NonFiniteStep):
                # perhaps this rank's alone: the job ends, nothing acknowledged
                self._abort(f"step at version {version} failed on {_named(batch.ids)}", exc)
            await self._failed(version, batch, exc)
            return False
        self.failing = 0
        self.health = "ok" if self.health.startswith("step failed") else self.health
        self.counters["steps"] += 1
        self.counters["trajectories"] += len(batch.trajectories)
        self.counters["tokens"] += sum(len(t) for t in batch.trajectories)
        warning = self.sampling.observe(batch.trajectories)
        self.counters["restricted_sampling"] = self.sampling.restricted
        if warning is not None:  # on stderr whatever the console setting, and as a JSONL record
            log.warning("tidal trainer: step at version %d: %s", version, warning)
            self.telemetry.event("restricted_sampling", version, warning=warning)
        record = {
            **metrics,
            "trainer/batch_trajectories": len(batch.trajectories),
            "trainer/trajectory_staleness_max": max(batch.staleness),
            **{f"trainer/intake/{k}": v for k, v in self.intake.counters.items()},
            "trainer/intake/buffered": self.intake.size,
            "trainer/intake/uncommitted": self._pump.uncommitted,
            "trainer/publish/failures": self.counters.get("publish_failures", 0),
            "trainer/step_errors": self.counters["step_errors"],
            "trainer/restricted_sampling": self.counters["restricted_sampling"],
            "trainer/engines/lost_episodes": self.grants.lost,  # in flight in engines gone (since this start)
        }
        self.telemetry.step(version, record, ids=batch.ids)
        self.telemetry.dropped(self.intake.take_drops())
        await self.status_pub.publish(self.status())
        return True

    async def _failed(self, version: int, batch: Batch, exc: Exception) -> None:
        """A failed step: log it with its traceback, count it, and write its batch to the dead letter
        (durable before `_loop` lets the batch's deliveries be acknowledged); after
        `failures.max_consecutive` in a row, set `failure` so the daemon stops."""
        error = f"{type(exc).__name__}: {exc}"
        tb = "".join(traceback.format_exception(exc))
        log.error("step at version %d failed on %d trajectories (%s):\n%s", version, len(batch.ids),
                  ", ".join(batch.ids[:8]), tb)
        self.failing += 1
        self.counters["step_errors"] += 1
        self.counters["step_errors_non_finite"] += isinstance(exc, NonFiniteStep)
        self.counters["dead_lettered"] += len(batch.trajectories)
        await asyncio.to_thread(self.dead_letter.append, version, error, tb, batch.trajectories)
        self.telemetry.step_error(version, {
            "trainer/step_errors": self.counters["step_errors"],
            "trainer/step_errors_non_finite": self.counters["step_errors_non_finite"],
            "trainer/step_errors_consecutive": self.failing,
            "trainer/dead_letter_trajectories": len(batch.trajectories),
        }, batch.ids, error[:2000], tb[-8000:])
        self.telemetry.dropped(self.intake.take_drops())
        self.health = f"step failed: {error}"[:200]
        if self.failing >= self.cfg.failures.max_consecutive:
            self.failure = (f"{self.failing} training steps in a row failed (failures.max_consecutive); the "
                            f"last at version {version}: {error}"[:1000])
        await self.status_pub.publish(self.status())

    def _abort(self, what: str, exc: Exception) -> NoReturn:
        """End the job (trainer/distributed.py `abort`), acknowledging nothing more; the JSONL record is
        flushed and closed first."""
        self.telemetry.close()
        abort(self.world.rank, what, exc)

    async def _gathered(self, what: str, gather, *args):
        """`gather(*args)` in a thread. Under FSDP every rank joins its collectives, so a failure (perhaps
        this rank's alone, an out-of-memory while gathering) ends the job as a failed step does."""
        try:
            return await asyncio.to_thread(gather, *args)
        except Exception as exc:
            if self.world.sharded:
                self._abort(f"gathering {what} failed", exc)
            raise

    def _train(self, batch) -> dict[str, float]:
        if not self.world.distributed:
            return self.learner.train_step(batch)
        self.world.send(STEP, batch)
        return _step_together(self.world, self.learner, batch)

    def _gather(self, command: int) -> dict:
        """Full weights (GATHER_WEIGHTS) or learner state (GATHER_STATE); with FSDP every rank joins."""
        if self.world.sharded:
            self.world.send(command)
        if command == GATHER_WEIGHTS:
            return self.world.full_weights(self.learner)
        return self.world.full_state(self.learner)

    async def _maybe_publish(self, *, force: bool = False) -> None:
        """Publish the current version when due. With `publish.overlap` the weights are copied and
        published by a task while the next step trains; one publish at a time, so notices stay in
        version order."""
        if self.publisher is None or (self.version % self.cfg.publish.every_steps and not force):
            return
        await self._published()
        version = self.version
        tensors = await self._gathered(f"the weights to publish version {version}", self._weights_to_publish)
        if self.cfg.publish.overlap:
            self._publishing = asyncio.create_task(self._publish(version, tensors))
        else:
            await self._publish(version, tensors)

    def _weights_to_publish(self) -> dict:
        tensors = self._gather(GATHER_WEIGHTS)
        if self.cfg.publish.overlap:  # the next step updates the live tensors in place: publish a copy
            tensors = {name: t.detach().to("cpu", copy=True) for name, t in tensors.items()}
        return tensors

    async def _published(self) -> None:
        """Wait for the publish in flight, if any (its failures are handled inside)."""
        if self._publishing is not None:
            await self._publishing
            self._publishing = None

    async def _announce(self, notice: WeightsPublished) -> None:
        """Send a weights notice before its publish ends: a distributed publish announces its version,
        then broadcasts while the engine has the servers receive it."""
        await self.status_pub.publish(notice)

    async def _publish(self, version: int, tensors: dict) -> None:
        """Publish `version`. A failure is counted and reported, and training goes on; it is tried
        again (a broadcast: with a new group) every REBROADCAST_AFTER_S while `version` is still the
        newest and the daemon runs."""
        while True:
            try:
                notice = await self.publisher.publish(version, tensors)
                break
            except (PublishError, OSError, TimeoutError) as exc:
                self.counters["publish_failures"] = self.counters.get("publish_failures", 0) + 1
                self.health = f"publish failed: {exc}"[:200]
                self.telemetry.event("publish_failed", version, error=str(exc)[:500])
                await self.status_pub.publish(self.status())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), REBROADCAST_AFTER_S)
            if self._stop.is_set() or self.version != version:
                return
        self.health = "ok"
        await self.status_pub.publish(notice)
        mb = self.publisher.last_bytes / 2**20
        self.telemetry.publish(version, {
            "trainer/publish/seconds": self.publisher.last_seconds,
            "trainer/publish/mb": mb,
            "trainer/publish/mb_per_s": mb / max(self.publisher.last_seconds, 1e-9),
        })

    async def _checkpoint(self) -> None:
        """Snapshot intake, dedup state and learner together (no await between the first two and
        nothing trains during the third), write, then acknowledge what it covers. With
        `checkpoint.overlap` the write runs from a CPU copy while training goes on; one at a time."""
        await self._checkpointed_all()
        covered = self._pump.pending()
        if (self.version, len(covered)) == (self._checkpointed, 0):
            return  # the newest checkpoint already holds exactly this
        self._checkpointed = self.version
        meta = CheckpointMeta(
            version=self.version, saved_at=time.time(), intake=self.intake.snapshot(),
            dedup=msgspec.msgpack.encode(self.receiver.dedup_state(including=covered)),
            counters=dict(self.counters),
        )
        self.telemetry.dropped(self.intake.take_drops())  # what the snapshot holds as dropped is on record
        state = await self._gathered(f"the state to checkpoint version {meta.version}", self._gather, GATHER_STATE)
        if self.cfg.checkpoint.overlap:
            if not self.world.sharded:  # FSDP's gathered state is a fresh CPU copy already
                state = await asyncio.to_thread(_copy_tensors, state)
            self._saving = asyncio.create_task(self._save(state, meta, covered))
        else:
            await self._save(state, meta, covered)

    async def _save(self, state: dict, meta: CheckpointMeta, covered: list) -> None:
        path = await asyncio.to_thread(self.checkpointer.save, state, meta)
        self._pump.covered_by_checkpoint(covered)
        self.telemetry.event("checkpoint", meta.version, path=str(path))

    async def _checkpointed_all(self) -> None:
        """Wait for the checkpoint being written, if any (a failure to write is fatal: it raises here)."""
        if self._saving is not None:
            saving, self._saving = self._saving, None
            await saving


def _copy_tensors(obj):
    """`obj` with every tensor copied to CPU memory (nested dicts and lists), for a write in the background."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _copy_tensors(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_copy_tensors(v) for v in obj)
    return obj


def _named(ids: list[str]) -> str:
    return f"{len(ids)} trajectories ({', '.join(ids[:8])}{', ...' if len(ids) > 8 else ''})"


def _step_together(world: World, learner, batch: list) -> dict[str, float]:
    """Every rank's step under torchrun: train, then agree (`World.reduce_step`, the one all-reduce
    that also sums the step's metrics) on whether it failed.

    Only `NonFiniteStep` joins the agreement: it is raised after the step's last collective, on every
    rank alike since the gradient norm is global, so when every rank reports it, it is raised here on
    every rank and the step is skipped as one process skips it. Any other exception propagates at
    once, unagreed: the other ranks may be inside a collective of the step that this rank will never
    join, so the caller ends the job. Ranks that disagree raise `RanksDisagree`.
    """
    version = learner.version
    skipped = None
    try:
        metrics = learner.train_step(batch)
    except NonFiniteStep as exc:
        metrics, skipped = {}, exc
    failed, metrics = world.reduce_step(metrics, failed=skipped is not None)
    if failed == 0:
        return metrics
    if failed == world.size:
        raise skipped
    raise RanksDisagree(f"the step at version {version} was non-finite on {failed} of {world.size} ranks and "
                        f"applied on the others (this rank: {'skipped' if skipped else 'applied'})") from skipped


def _follow(cfg: TrainerConfig, world: World) -> int:
    """Ranks > 0: train on what rank 0 broadcasts until it says stop (`_obey`).

    SIGTERM and SIGINT are ignored here: torchrun forwards them to every rank, and only rank 0 decides
    when to stop (after its final checkpoint), then says so with STOP.
    """
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    learner = _build_learner(cfg, world)
    restored = Checkpointer(cfg.checkpoint).load()
    if restored is not None:
        world.load_state(learner, restored.learner_state)
    return _obey(world, learner)


def _obey(world: World, learner) -> int:
    """Carry out rank 0's commands until STOP (then 0); IDLE (rank 0 is waiting for a batch) only means
    wait again.

    A non-finite step, skipped by every rank together, is logged and the next command awaited (rank 0
    counts it and dead-letters the batch). Any other exception ends the job (`abort`): in a step or a
    gather, as the other ranks would wait for this one in a collective until the backend's timeout;
    in `receive`, as rank 0 has said nothing for `distributed.timeout_s` (it is gone or hangs); and an
    unknown command.
    """
    while True:
        command, batch, version = None, [], learner.version
        try:
            command, batch = world.receive()
            if command == IDLE:
                continue
            if command == STEP:
                try:
                    _step_together(world, learner, batch)
                except NonFiniteStep:
                    log.warning("step at version %d skipped on rank %d (non-finite on every rank)", version,
                                world.rank, exc_info=True)
            elif command == GATHER_WEIGHTS:
                world.full_weights(learner)
            elif command == GATHER_STATE:
                world.full_state(learner)
            elif command == STOP:
                return 0
            else:
                raise TidalError(f"unknown command {command} from rank 0 (expected STEP {STEP}, STOP {STOP}, "
                                 f"GATHER_WEIGHTS {GATHER_WEIGHTS}, GATHER_STATE {GATHER_STATE} or IDLE {IDLE})")
        except Exception as exc:
            what = {STEP: f"step at version {version} failed on {_named([t.id for t in batch])}",
                    GATHER_WEIGHTS: "gathering the weights to publish failed",
                    GATHER_STATE: "gathering the state to checkpoint failed"}
            abort(world.rank, what.get(command, "waiting for rank 0's next command failed"), exc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tidal trainer", description=__doc__.splitlines()[0])
    add_config_args(parser, TrainerConfig)
    add_debug_arg(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    world = World.from_env()
    try:
        if args.print_config:  # resolved: what "auto" chooses here (device, dtype); keys not given marked
            shown, missing = load_partial(TrainerConfig, args.config, args.overrides)
            print(to_toml(shown.resolved(world.choose_device(shown.distributed.device)), missing=missing), end="")
            return 0
        cfg = load_config(TrainerConfig, args.config, args.overrides)
    except TidalError as exc:
        return fail("tidal trainer", exc, debug=args.debug)
    world.strategy = cfg.distributed.strategy
    try:
        world.init(cfg.distributed.backend, cfg.distributed.device, cfg.distributed.timeout_s)
        cfg = cfg.resolved(world.device)
        _torch_setup(cfg.seed, cfg.distributed.threads)
        if world.rank:
            return _follow(cfg, world)
        daemon = Daemon(cfg, world)
        try:
            return asyncio.run(daemon.run())
        finally:
            daemon.telemetry.close()
    except TidalError as exc:
        return fail("tidal trainer", exc, debug=args.debug)
    finally:
        world.close()
