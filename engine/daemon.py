"""`tidal engine CONFIG`: the rollout engine daemon (one light asyncio process per host, no torch).

It binds the components: the trainer's status channel (TrainerStatus, WeightsPublished, control) feeds
admission and weight updates; `Rollout` plays episodes through the agent, the backend and the envs;
finished groups go to the sink, which spools them to disk and sends them to the trainer.

Signals and control: SIGTERM/SIGINT or `Shutdown` drain (stop admitting, let in-flight episodes finish
within the deadline, cancel the rest as lost work, flush) and exit 0; `Drain` does the same and then
idles until `Resume`; `Pause`/`Resume` stop and restart admission. Nothing the trainer has not
committed is lost by a SIGKILL: it is in the spool, resent at the next start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
import time

import msgspec
from tidal.engine.admission import Admission
from tidal.engine.agent import create_agent
from tidal.engine.backends.registry import create_backend
from tidal.engine.chat import ChatTokenizer
from tidal.engine.config import EngineConfig
from tidal.engine.evaluate import Evaluator
from tidal.engine.generation import Generator
from tidal.engine.render_pool import RenderPool
from tidal.engine.rollout import Rollout
from tidal.engine.sink import TrajectorySink
from tidal.engine.spool import Spool
from tidal.engine.tasks import TaskSource
from tidal.engine.weights import WeightSync
from tidal.protocol.channels import StatusSubscriber
from tidal.protocol.channels.curve import client_keys
from tidal.protocol.config import add_config_args, config_from_args
from tidal.protocol.errors import ConfigError, TidalError
from tidal.protocol.messages import Drain, Pause, Resume, Shutdown, TrainerStatus, WeightsPublished
from tidal.protocol.startup import freeze_startup_heap, quiet_gc, run_main, starting
from tidal.protocol.telemetry import Telemetry

from tidal import envs

__all__ = ["Engine", "main", "check_config"]

log = logging.getLogger("tidal.engine")

DRAIN_S = 30.0
"""Deadline of a SIGTERM drain: in-flight episodes get this long to finish."""
LAG_PROBE_S = 0.05
"""Period of the event-loop lag probe (`engine/loop_lag_ms`)."""
FLUSH_S = 5.0
"""After a drain, the wait for the trainer's next commit: none for this long ends the wait (the spool
keeps the rest for the next start)."""


def check_config(cfg: EngineConfig) -> ChatTokenizer:
    """What can be checked before anything starts: the model's tokenizer and template, every task's
    env id and kwargs, the agent. Raises ConfigError naming the key."""
    if not cfg.model.path:
        raise ConfigError("model.path: name the checkpoint directory (its tokenizer and chat template)")
    try:
        tokenizer = ChatTokenizer.load(cfg.model.path)
    except (OSError, ValueError, TidalError) as exc:
        raise ConfigError(f"model.path: {exc}") from None
    for i, task in enumerate(cfg.tasks):
        try:
            env = envs.make(task.env, **task.kwargs)
        except envs.EnvNotFound as exc:
            raise ConfigError(f"tasks[{i}].env: {exc}") from None
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"tasks[{i}] ({task.env}) kwargs {task.kwargs}: {exc}") from None
        env.close()
    create_agent(cfg.agent)
    return tokenizer


class Engine:
    """One engine process: `await Engine(cfg).run()` returns its exit code."""

    def __init__(self, cfg: EngineConfig, tokenizer: ChatTokenizer):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.epoch = time.time_ns()
        self.backend = create_backend(cfg.backend)
        self.agent = create_agent(cfg.agent)
        r = cfg.rollout
        self.admission = Admission(cfg.name, self.epoch, group_size=r.group_size, max_concurrent=r.max_concurrent,
                                   sync=r.mode == "sync")
        if cfg.max_episodes:
            self.admission.limit_started = cfg.max_episodes
        self.tasks = TaskSource(cfg.tasks, engine_id=cfg.name, epoch=self.epoch, group_size=r.group_size,
                                engines=r.engines, engine_index=r.engine_index, seed=cfg.seed)
        self.exiting = False
        self.render_pool: RenderPool | None = None
        self.failure: str | None = None
        self.loop_lag_max = 0.0
        self._served_changed = asyncio.Event()
        self._drain_timer: asyncio.TimerHandle | None = None
        with starting(f"cannot open the metrics (metrics.jsonl {cfg.metrics.jsonl!r}, "
                      f"metrics.prometheus_port {cfg.metrics.prometheus_port})"):
            self.telemetry = Telemetry(cfg.metrics.jsonl or None, prometheus_port=(
                cfg.metrics.prometheus_port if cfg.metrics.prometheus_port >= 0 else None))
        self._console = None
        if cfg.metrics.console:
            from rich.console import Console

            self._console = Console(stderr=True)
        if cfg.sampling.restricted:
            log.warning(
                "sampling.top_p = %s, sampling.top_k = %s: the servers report full-vocabulary log-probs, so the "
                "trainer's importance ratios describe another policy than the one acting; restricted sampling can "
                "stop learning altogether. Train with top_p = 1 and top_k = -1.", cfg.sampling.top_p, cfg.sampling.top_k)

    # --- lifecycle

    async def run(self) -> int:
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.drain, DRAIN_S, True)
        link = cfg.trainer
        curve = client_keys(link.curve_secret_key, link.curve_server_key)  # ConfigError names the key
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(self.backend)
            with starting(f"cannot open the spool (trainer.spool_dir {link.spool_dir!r}) or reach "
                          f"trainer.endpoint {link.endpoint!r}"):
                if cfg.metrics.ledger:
                    await asyncio.to_thread(self._record_recovered, link.spool_dir)
                self.sink = await stack.enter_async_context(TrajectorySink(
                    link.endpoint, cfg.name, link.spool_dir, window=link.window,
                    max_spool_bytes=int(link.max_spool_mb * 2**20), epoch=self.epoch, report=self.admission.report,
                    curve=curve))
            with starting(f"cannot subscribe to trainer.status_endpoint {link.status_endpoint!r}"):
                status = await stack.enter_async_context(StatusSubscriber(link.status_endpoint, curve=curve))
            if cfg.model.render_workers:
                with starting(f"cannot start model.render_workers = {cfg.model.render_workers} render workers"):
                    self.render_pool = await stack.enter_async_context(
                        RenderPool(cfg.model.path, cfg.model.render_workers))
            self.gen = Generator(self.backend, self.tokenizer, cfg.sampling, max_context=cfg.model.max_context,
                                 render_pool=self.render_pool)
            put = self._put_recorded if cfg.metrics.ledger else self.sink.put
            self.rollout = Rollout(cfg, self.agent, self.gen, self.admission, self.tasks, put, self.sink.report_now)
            self.weights = WeightSync(self.backend, self._served)
            eval_sampling = msgspec.structs.replace(cfg.sampling, temperature=cfg.eval.temperature)
            self.evaluator = Evaluator(cfg, self.agent, Generator(
                self.backend, self.tokenizer, eval_sampling, max_context=cfg.model.max_context,
                render_pool=self.render_pool),
                self.rollout.step_timeout_s)
            await self.weights.release()
            await self.weights.probe()
            freeze_startup_heap()
            self._event("ready", served_version=self.admission.served_version, epoch=f"{self.epoch:x}")
            helpers = [asyncio.create_task(c) for c in (
                self._follow(status), self.weights.run(), self._watch(status), self._report(), self._lag())]
            if cfg.eval.every_versions and cfg.rollout.engine_index == 0:
                helpers.append(asyncio.create_task(self._evaluate()))
            for task in helpers:
                task.add_done_callback(self._helper_done)
            try:
                await self.rollout.run()
                # Everything finished is in the spool already; the trainer commits at its checkpoints,
                # so wait only briefly for acks: what stays uncommitted is resent by the next start.
                committed = await self._flush()
                self._event("drained", committed=committed, pending=self.sink.stats()["pending"],
                            **self._stats_brief())
            finally:
                for task in helpers:
                    task.cancel()
                results = await asyncio.gather(*helpers, return_exceptions=True)
                self._report_once()
                self.telemetry.close()
            for result in results:
                if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                    raise result
        if self.failure is not None:
            raise TidalError(self.failure)
        return 0

    async def _flush(self) -> bool:
        """Wait for the trainer to commit what was sent while it keeps committing (FLUSH_S without an
        acknowledgement ends the wait: a trainer that commits only at its checkpoints, or is gone; one
        that said it stopped is not waited for at all); what stays uncommitted is in the spool, resent
        by the next start."""
        deadline = time.monotonic() + DRAIN_S
        while time.monotonic() < deadline:
            before = self.sink.stats()["committed"]
            stopped = self.admission.status is not None and self.admission.status.health == "stopped"
            if await self.sink.flush(timeout=0 if stopped else FLUSH_S):
                return True
            if stopped or self.sink.stats()["committed"] == before:
                return False
        return False

    async def _put_recorded(self, group: list) -> None:
        """The sink's `put`, then a `spooled` record naming the group's ids (metrics.ledger): written once
        the group is durable, so every id on record is in the spool or already committed."""
        await self.sink.put(group)
        self.telemetry.log({"event": "spooled", "ids": ",".join(t.id for t in group)})

    def _record_recovered(self, spool_dir: str) -> None:
        """metrics.ledger: a `recovered` record naming what an earlier run left in the spool (sent first).
        A group spooled just before a SIGKILL may have missed its `spooled` record; this names it."""
        if not os.path.isdir(spool_dir):
            return
        with Spool(spool_dir, max_bytes=1 << 40) as spool:
            ids = [traj.id for _, traj in spool.pending()]
        if ids:
            self.telemetry.log({"event": "recovered", "ids": ",".join(ids)})

    def drain(self, deadline_s: float, exit: bool) -> None:
        """Stop admitting; cancel what is still running after `deadline_s`; with `exit`, end the daemon."""
        self.admission.draining = True
        if exit and not self.exiting:
            self.exiting = True
            self.admission.limit_started = self.admission.started  # the admission loop ends
        if self._drain_timer is None:
            loop = asyncio.get_running_loop()
            self._drain_timer = loop.call_later(deadline_s, self._drain_deadline)
        self._event("draining", deadline_s=deadline_s, exit=exit)
        self.rollout.changed()

    def _drain_deadline(self) -> None:
        groups = self.rollout.cancel()
        if groups:
            log.warning("drain deadline passed: %d groups still running were cancelled (lost work)", groups)

    def _helper_done(self, task: asyncio.Task) -> None:
        """A helper loop (status, weights, watch, metrics, eval) must not die quietly: the daemon stops."""
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        log.error("engine task %s failed", task.get_coro().__qualname__, exc_info=exc)
        self.failure = f"{task.get_coro().__qualname__} failed: {type(exc).__name__}: {exc}"
        self.drain(0.0, True)

    def _served(self, version: int | None) -> None:
        self.admission.served_version = version
        self._served_changed.set()
        if hasattr(self, "rollout"):
            self.rollout.changed()

    async def _evaluate(self) -> None:
        """Evaluate whenever the servers reach the next eval version (the trainer's, if they cannot say)."""
        while True:
            a = self.admission
            version = a.served_version if a.served_version is not None else (a.status and a.status.version)
            if self.evaluator.due(version) and not a.draining:
                r = await self.evaluator.evaluate(version)
                self.telemetry.log({"event": "eval", "engine/eval/success": r.success, "engine/eval/reward": r.reward,
                                    "engine/eval/turns": r.turns, "engine/eval/failed": r.failed,
                                    "engine/eval/episodes": r.episodes, "engine/eval/seconds": r.seconds}, step=version)
                if self._console is not None:
                    self._console.log(f"[bold]eval[/bold] v{version}: success {r.success:.3f} reward {r.reward:.3f} "
                                      f"turns {r.turns:.2f} ({r.episodes} episodes, {r.seconds:.1f}s)")
                continue
            self._served_changed.clear()
            await self._served_changed.wait()

    async def _lag(self) -> None:
        """Event-loop lag: how late a 50 ms sleep wakes up (the worst in each report window)."""
        while True:
            t0 = time.monotonic()
            await asyncio.sleep(LAG_PROBE_S)
            self.loop_lag_max = max(self.loop_lag_max, time.monotonic() - t0 - LAG_PROBE_S)

    # --- trainer status

    async def _follow(self, sub: StatusSubscriber) -> None:
        while True:
            msg = await sub.recv()
            match msg:
                case TrainerStatus():
                    if self.cfg.rollout.mode == "sync" and msg.max_staleness != 0:
                        self.failure = (f"rollout.mode = 'sync' needs the trainer's intake.max_staleness = 0 "
                                        f"(the trainer at {self.cfg.trainer.status_endpoint} has {msg.max_staleness})")
                        self.drain(0.0, True)
                    link, r = self.cfg.trainer, self.cfg.rollout
                    if link.window * r.engines < msg.max_uncommitted:
                        self.failure = (
                            f"trainer.window ({link.window}) x rollout.engines ({r.engines}) is below the trainer's "
                            f"intake.max_uncommitted ({msg.max_uncommitted}): the trainer acknowledges only at its "
                            f"checkpoints, forced once that many deliveries wait, so the engines would stall first; "
                            f"raise trainer.window or lower the trainer's intake.max_uncommitted")
                        self.drain(0.0, True)
                    self.admission.status = msg
                case WeightsPublished():
                    self.weights.offer(msg)
                case Pause():
                    self.admission.paused = True
                case Resume():
                    self.admission.paused = False
                    if not self.exiting:
                        self.admission.draining = False
                        if self._drain_timer is not None:
                            self._drain_timer.cancel()
                            self._drain_timer = None
                case Drain(deadline_s=deadline):
                    self.drain(deadline, False)
                case Shutdown(deadline_s=deadline):
                    self.drain(deadline, True)
            self.rollout.changed()

    async def _watch(self, sub: StatusSubscriber) -> None:
        """Trainer liveness, the spool's bound and whether any server serves, polled: each stops admission
        while it holds."""
        timeout = self.cfg.trainer.status_timeout_s
        while True:
            fresh = sub.last_heard is not None and time.monotonic() - sub.last_heard < timeout
            full = self.sink.full
            serving = self.backend.serving() is not False
            a = self.admission
            if (fresh, full, serving) != (a.status_fresh, a.spool_full, a.serving):
                if not fresh and a.status_fresh:
                    log.warning("no word from the trainer at %s for %.0fs: admission stops until it is heard",
                                self.cfg.trainer.status_endpoint, timeout)
                if not serving and a.serving:
                    log.warning("no inference server in rotation: admission waits for one to pass a health probe")
                a.status_fresh, a.spool_full, a.serving = fresh, full, serving
                self.rollout.changed()
            await asyncio.sleep(0.1)

    # --- metrics

    def metrics(self) -> dict[str, float]:
        a, r, g = self.admission, self.rollout, self.gen
        out: dict[str, float] = {
            "engine/episodes_started": a.started, "engine/episodes_in_flight": a.in_flight,
            "engine/episodes_discarded": a.discarded, "engine/allowance": a.allowance(),
            "engine/paused": int(a.paused), "engine/draining": int(a.draining),
            "engine/tokens": g.tokens, "engine/requests": g.requests,
            "engine/trainer_version": -1 if a.status is None else a.status.version,
            "engine/served_version": -1 if a.served_version is None else a.served_version,
            "engine/weight_updates": self.weights.updates, "engine/weight_update_failures": self.weights.failures,
            "engine/weight_update_retries": self.weights.retries,
            "engine/weight_update_seconds": self.weights.last_seconds,
        }
        out.update({f"engine/{k}": v for k, v in r.counters.items()})
        out.update({f"engine/errors/{k}": v for k, v in r.errors.items()})
        out.update({f"engine/admission_blocked/{k}": v for k, v in r.blocked_by.items()})
        out.update({f"engine/sink/{k}": v for k, v in self.sink.stats().items()})
        out.update({f"engine/backend/{k}": v for k, v in self.backend.stats().items()
                    if isinstance(v, int | float)})
        if self.render_pool is not None:
            out.update({f"engine/render/{k}": v for k, v in self.render_pool.stats().items()})
        out.update(r.snapshot())
        return out

    async def _report(self) -> None:
        last_t, last_tokens, last_requests = time.monotonic(), 0, 0
        while True:
            await asyncio.sleep(self.cfg.metrics.every_s)
            now, m = time.monotonic(), self.metrics()
            m["engine/tokens_per_s"] = (m["engine/tokens"] - last_tokens) / (now - last_t)
            m["engine/turns_per_s"] = (m["engine/requests"] - last_requests) / (now - last_t)
            m["engine/loop_lag_ms"], self.loop_lag_max = self.loop_lag_max * 1e3, 0.0
            last_t, last_tokens, last_requests = now, m["engine/tokens"], m["engine/requests"]
            self.telemetry.log(m, step=int(m["engine/trainer_version"]))
            if self._console is not None:
                self._console.log(
                    f"v{int(m['engine/trainer_version'])} served v{int(m['engine/served_version'])} "
                    f"in flight {int(m['engine/episodes_in_flight'])} started {int(m['engine/episodes_started'])} "
                    f"delivered {int(m.get('engine/trajectories_delivered', 0))} "
                    f"tok/s {m['engine/tokens_per_s']:.0f} reward {m.get('engine/reward_mean', 0.0):.3f} "
                    f"spool {m.get('engine/sink/spool_bytes', 0) / 2**20:.1f} MiB "
                    f"blocked {self.admission.blocked() or '-'}")

    def _report_once(self) -> None:
        with contextlib.suppress(Exception):
            self.telemetry.log(self.metrics(), step=-1 if self.admission.status is None else self.admission.status.version)

    def _stats_brief(self) -> dict:
        c = self.rollout.counters
        return {"started": self.admission.started, "delivered": c["trajectories_delivered"],
                "discarded": self.admission.discarded}

    def _event(self, name: str, **fields) -> None:
        self.telemetry.log({"event": name, **{k: v for k, v in fields.items() if v is not None}})
        if self._console is not None:
            self._console.log(f"[bold]{name}[/bold] " + " ".join(f"{k}={v}" for k, v in fields.items()))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tidal engine", description=__doc__.splitlines()[0])
    add_config_args(p, EngineConfig)
    p.add_argument("--check", action="store_true",
                   help="check the configuration (model tokenizer and template, env ids, agent) and exit")
    p.add_argument("--debug", action="store_true", help="log at debug level and show tracebacks")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def body() -> int:
        cfg = config_from_args(EngineConfig, args)
        if cfg is None:
            return 0
        tokenizer = check_config(cfg)
        if args.check:
            print(f"tidal engine: configuration ok ({len(cfg.tasks)} task sources, model {cfg.model.path})")
            return 0
        try:
            import uvloop

            runner = uvloop.run
        except ImportError:
            runner = asyncio.run
        return runner(Engine(cfg, tokenizer).run())

    quiet_gc()
    code = run_main("tidal engine", body, debug=args.debug)
    if threading.active_count() > 1:
        # A thread of an env whose step hung (abandoned by the step timeout) cannot be joined, and
        # interpreter shutdown would wait for it forever: everything is flushed, so leave without it.
        log.warning("leaving %d env threads that never returned", threading.active_count() - 1)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
