"""`tidal run [CONFIG]`: the main job, an inference server, the trainer and the engine, supervised.

Starts the three as child processes, wires them together, supervises them and shows how the run goes.

Start order: model (built or downloaded) -> server (its readiness line, or /model_info) -> trainer
(binds port 0; its `ready` record names the endpoints) -> engine (pointed at both; its `ready`
record). Everything lands in the run dir (engine/runconfig.py `Layout`): the resolved config, each
child's config and log, the metrics JSONL of the engine and the trainer, `run.jsonl` (this
process's events), checkpoints, weights, the spool, and plots redrawn while it runs.

The invariants:
- No child outlives `tidal run` (engine/supervise.py): Ctrl-C or SIGTERM stops every child in reverse
  start order (SIGTERM, a deadline, SIGKILL); a second Ctrl-C kills them at once; a SIGKILLed
  `tidal run` takes them down through PR_SET_PDEATHSIG, and its guard (engine/guard.py) kills their
  own subprocesses.
- It never hangs: every wait has a deadline (`restart.ready_timeout_s`, `restart.stop_timeout_s`)
  and looks at the children and at signals while it waits; a run whose trainer takes no step for
  `restart.stall_timeout_s` fails, saying what the engine last reported.
- A child that dies is reported with the tail of its log, then restarted (the engine resumes from
  its spool, the trainer from its checkpoint, a server from the newest published weights at their
  version) up to `restart.max_restarts` times, after which the run stops cleanly with exit code 1.
  Exit code 2 from a child is a start-up error: never restarted.
- The run ends when the trainer reaches max_steps (it exits 0 after its checkpoint), the engine
  ends by itself (engine.max_episodes), max_minutes pass, or a signal comes.

Exit codes: 0 finished, 1 a child failed for good, 2 a configuration or start-up error, 128 + N
stopped by signal N.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import msgspec
from tidal.engine.plots import NO_MATPLOTLIB
from tidal.engine.runconfig import (
    ExternalInference,
    Layout,
    ReferenceInference,
    RunConfig,
    engine_config,
    serve_config,
    trainer_config,
)
from tidal.engine.runconsole import RunConsole, Status
from tidal.engine.runmetrics import RunMetrics, open_sinks
from tidal.engine.runstart import (
    HttpProbe,
    build_argv,
    child_env,
    download_argv,
    downloaded_path,
    newest_weights,
    python,
    serve_url,
    sglang_argv,
)
from tidal.engine.supervise import Child, Guard, describe_exit
from tidal.protocol.config import add_config_args, config_from_args, to_toml
from tidal.protocol.errors import TidalError
from tidal.protocol.startup import EXIT_STARTUP, fail
from tidal.protocol.telemetry import Telemetry

__all__ = ["Run", "RunFailed", "main"]

log = logging.getLogger("tidal.run")

POLL_S = 0.1
"""Period of the supervision loop: children, signals, metrics."""
TAIL_LINES = 25
"""Lines of a dead child's log quoted in its report."""
PLOT_DEADLINE_S = 120.0
"""The final plot gets this long before it is given up."""
STALL_FIGURES = ("engine/episodes_", "engine/admission_blocked/", "engine/served_version", "engine/trainer_version",
                 "engine/sink/unacked", "engine/backend/servers_healthy", "engine/errors/")
"""The engine's figures a stalled run quotes: what admits work, what serves it, what became of it."""


class Stopped(Exception):
    """A signal asked the run to stop."""


class Finished(Exception):
    """The run is over (a limit, or a child that ended it); the message says why."""


class RunFailed(TidalError, RuntimeError):
    """The run cannot go on; the message says why (a dead child: with the tail of its log)."""


class ChildDied(Exception):
    def __init__(self, child: Child, code: int):
        super().__init__(f"{child.name} {describe_exit(code)}")
        self.child, self.code = child, code


class Run:
    """One `tidal run`: `Run(cfg).execute()` returns the exit code."""

    def __init__(self, cfg: RunConfig, console: RunConsole | None = None):
        self.cfg = cfg
        run_dir = cfg.resolved_run_dir()
        self.cfg = msgspec.structs.replace(cfg, run_dir=str(run_dir))
        self.layout = Layout(run_dir)
        self.console = console or RunConsole(cfg.console.mode, cfg.console.every_s)
        self.children: dict[str, Child] = {}
        """The started children, in start order (server, trainer, engine)."""
        self.restarts: Counter[str] = Counter()
        self.signals: list[int] = []
        self.model_path = ""
        self.servers: list[str] = []
        self.endpoints: tuple[str, str] | None = None
        self.metrics: RunMetrics | None = None
        self.events: Telemetry | None = None
        self.plotter: Child | None = None
        self.guard: Guard | None = None
        self._plots_ok = cfg.plots.enabled
        self._plotted = 0.0
        self._started = time.monotonic()
        self._progress = (0, self._started)
        """(trainer steps, when that count was first seen): what the stall check measures from."""

    # --- lifecycle

    def execute(self) -> int:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        code = 0
        self.guard = Guard()
        try:
            with self.console:
                try:
                    self._prepare()
                    self._start_all()
                    self._supervise()
                except Finished as done:
                    self._event("finished", reason=str(done))
                    self.console.say(f"finished: {done}")
                except Stopped:
                    code = 128 + self.signals[0]
                    self._event("stopping", reason=signal.Signals(self.signals[0]).name)
                    self.console.say(f"{signal.Signals(self.signals[0]).name}: stopping every child "
                                     "(again to kill them at once)")
                except RunFailed as exc:
                    code = 1
                    self._event("failed", error=str(exc)[:4000])
                    self.console.say(f"failed: {exc}")
                except TidalError as exc:  # the configuration, found wrong before anything started
                    code = EXIT_STARTUP
                    self._event("failed", error=str(exc)[:4000])
                    self.console.say(f"cannot start: {exc}")
                finally:
                    self._stop_all()
                    self._finish()
        finally:
            self.guard.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return code

    def _on_signal(self, signum: int, frame) -> None:
        self.signals.append(signum)

    def _check_signals(self) -> None:
        if self.signals:
            raise Stopped

    def _prepare(self) -> None:
        root = self.layout.root
        resumed = self.layout.config.exists()
        for d in (root, self.layout.configs, self.layout.logs, self.layout.metrics):
            d.mkdir(parents=True, exist_ok=True)
        self.layout.config.write_text(to_toml(self.cfg))
        self.events = Telemetry(self.layout.events)
        self.console.say(f"{'resuming the run in' if resumed else 'run dir'} {root} (config: {self.layout.config})")
        sinks = open_sinks(self.cfg, root, self.layout.tensorboard, msgspec.to_builtins(self.cfg), self.console.say)
        self.metrics = RunMetrics(self.layout.engine_jsonl, self.layout.trainer_jsonl, sinks)
        self._event("start", run_dir=str(root), resumed=int(resumed))

    # --- start-up

    def _start_all(self) -> None:
        self.model_path = self._model()
        self._check_engine()
        try:
            self._start_server()
            self._start_trainer()
            self._start_engine()
        except ChildDied as died:  # no restarts while starting: what fails now fails again
            raise RunFailed(f"{died.child.name} {describe_exit(died.code)} while starting; last lines of "
                            f"{died.child.log_path}:\n{died.child.tail(TAIL_LINES)}") from None
        self.console.say(f"running: server {', '.join(self.servers)}, trainer {self.endpoints[0]}, engine "
                         f"pid {self.children['engine'].pid}; logs in {self.layout.logs}")

    def _model(self) -> str:
        m = self.cfg.model
        if m.builds:
            target = self.layout.model
            if not target.is_dir():
                self.console.say(f"building the model with {m.builder} into {target}")
                self._run_step("model", build_argv(m.builder, target, m.builder_kwargs))
            return str(target.resolve())
        path = Path(m.path).expanduser()
        if path.is_dir():
            return str(path.resolve())
        self.console.say(f"model.path {m.path!r} is not a directory: fetching it from the Hugging Face hub")
        return downloaded_path(self._run_step("download", download_argv(m.path)))

    def _run_step(self, name: str, argv: list[str]) -> str:
        """Run a one-off child (build, download) to its end, interruptibly; its output, or RunFailed."""
        child = Child(name, argv, self.layout.log(name), env=child_env())
        child.start()
        self.guard.watch(child)
        self.children[name] = child
        try:
            self._wait(f"the {name} step", lambda: child.poll() is not None, watch=[])
        finally:
            del self.children[name]
            child.stop(self.cfg.restart.stop_timeout_s)
        if child.poll() != 0:
            raise RunFailed(f"the {name} step failed ({describe_exit(child.poll())}):\n{child.tail(TAIL_LINES)}")
        return child.output()

    def _check_engine(self) -> None:
        """The engine's own start-up check (tokenizer, chat template, env ids, agent), before anything starts."""
        from tidal.engine.daemon import check_config

        check_config(engine_config(self.cfg, self.layout, self.model_path, ["http://127.0.0.1:1"],
                                   "tcp://127.0.0.1:1", "tcp://127.0.0.1:1"))

    def _start_server(self, *, restart: bool = False) -> None:
        inf = self.cfg.inference
        if isinstance(inf, ExternalInference):
            self.servers = list(inf.urls)
            self._wait("the external servers", HttpProbe(self.servers), watch=[])
            return
        weights, version = newest_weights(self.layout.weights) if restart else (None, None)
        if isinstance(inf, ReferenceInference):
            port = int(self.servers[0].rsplit(":", 1)[1]) if restart and self.servers else None
            cfg = serve_config(self.cfg, self.model_path, port=port, weights=weights, version=version)
            path = self.layout.configs / "server.toml"
            path.write_text(to_toml(cfg))
            child = self._child("server", python("-m", "tidal", "serve", str(path)))
            url = self._wait("the reference server", lambda: serve_url(child.output()), watch=[child])
            self.servers = [url]
        else:
            child = self._child("server", sglang_argv(inf, str(weights or self.model_path), version), env=inf.env)
            url = f"http://{inf.host}:{inf.port}"
            self._wait("the SGLang server", HttpProbe([url]), watch=[child])
            self.servers = [url]
        self._event("ready", child="server", url=self.servers[0], weights=str(weights or self.model_path))

    def _start_trainer(self, *, restart: bool = False) -> None:
        path = self.layout.configs / "trainer.toml"
        if not restart:
            path.write_text(to_toml(trainer_config(self.cfg, self.layout, self.model_path)))
        seen = len(self._events_of("trainer", "ready"))
        launch = self.cfg.trainer_launch or ["-m", "tidal", "trainer"]
        child = self._child("trainer", python(*launch, str(path)))
        ready = self._wait("the trainer", lambda: self._new_event("trainer", "ready", seen), watch=[child])
        if not restart:  # a restarted trainer binds the same ports, so the engine finds it again
            self.endpoints = (ready["endpoint"], ready["status_endpoint"])
            cfg = trainer_config(self.cfg, self.layout, self.model_path)
            intake = msgspec.structs.replace(cfg.intake, endpoint=ready["endpoint"],
                                             status_endpoint=ready["status_endpoint"])
            path.write_text(to_toml(msgspec.structs.replace(cfg, intake=intake)))
        self._event("ready", child="trainer", endpoint=ready["endpoint"], version=int(ready.get("step") or 0))

    def _start_engine(self) -> None:
        path = self.layout.configs / "engine.toml"
        path.write_text(to_toml(engine_config(self.cfg, self.layout, self.model_path, self.servers, *self.endpoints)))
        seen = len(self._events_of("engine", "ready"))
        child = self._child("engine", python("-m", "tidal", "engine", str(path)))
        self._wait("the engine", lambda: self._new_event("engine", "ready", seen), watch=[child])
        self._event("ready", child="engine")

    def _child(self, name: str, argv: list[str], env: dict | None = None) -> Child:
        child = self.children.get(name)
        if child is None:
            child = Child(name, argv, self.layout.log(name), env=child_env(env))
            self.children[name] = child
        child.argv = argv
        child.start()
        self.guard.watch(child)
        self._event("started", child=name, pid=child.pid, start=child.starts)
        return child

    def _events_of(self, source: str, name: str) -> list[dict]:
        return [r for r in self.metrics.events[source] if r.get("event") == name]

    def _new_event(self, source: str, name: str, seen: int) -> dict | None:
        found = self._events_of(source, name)
        return found[-1] if len(found) > seen else None

    def _wait(self, what: str, ready, watch: list[Child]):
        """Until `ready()` gives something true: raises Stopped on a signal, ChildDied if a watched child
        exits (RunFailed while starting up), RunFailed after restart.ready_timeout_s."""
        timeout = self.cfg.restart.ready_timeout_s
        deadline = time.monotonic() + timeout
        while True:
            self._check_signals()
            self._check_time()
            self._tick()
            result = ready()
            if result:
                return result
            for child in watch:
                code = child.poll()
                if code is not None:
                    raise ChildDied(child, code)
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {c.name} ({c.log_path}):\n{c.tail(TAIL_LINES)}" for c in watch)
                raise RunFailed(f"{what} was not ready after {timeout:g} s (restart.ready_timeout_s)\n{tails}")
            time.sleep(POLL_S)

    # --- supervision

    def _supervise(self) -> None:
        """Watch the children until the run is over (raises Finished) or a signal comes (Stopped)."""
        self._progressed()
        while True:
            self._check_signals()
            self._check_time()
            self._tick()
            self._check_stall()
            for name, child in list(self.children.items()):
                code = child.poll()
                if code is None:
                    continue
                if code == 0 and name == "trainer":
                    steps = self.metrics.steps
                    raise Finished(f"the trainer stopped at step {steps}" + (
                        " (max_steps)" if self.cfg.max_steps and steps >= self.cfg.max_steps else ""))
                if code == 0 and name == "engine":
                    raise Finished("the engine stopped by itself (engine.max_episodes)")
                self._recover(name, code)
            time.sleep(POLL_S)

    def _check_time(self) -> None:
        """max_minutes counts from the start of `tidal run`, start-up included."""
        limit = self.cfg.max_minutes * 60
        if limit and time.monotonic() - self._started >= limit:
            raise Finished(f"max_minutes ({self.cfg.max_minutes:g}) reached")

    def _progressed(self) -> None:
        self._progress = (self.metrics.steps, time.monotonic())

    def _check_stall(self) -> None:
        """RunFailed when the trainer's step count has not moved for restart.stall_timeout_s."""
        limit = self.cfg.restart.stall_timeout_s
        steps, since = self._progress
        if self.metrics.steps != steps:
            self._progressed()
        elif limit and time.monotonic() - since >= limit:
            figures = ", ".join(f"{k.removeprefix('engine/')} {v:g}" for k, v in sorted(self.metrics.latest.items())
                                if k.startswith(STALL_FIGURES))
            tails = "\n".join(f"--- {c.name} ({c.log_path}):\n{c.tail(TAIL_LINES)}" for c in self.children.values())
            raise RunFailed(f"no trainer step for {limit:g} s (restart.stall_timeout_s) at step {steps}, every "
                            f"child running; the engine's latest figures: {figures or 'none'}\n{tails}")

    def _recover(self, name: str, code: int) -> None:
        """A child died: report it, restart it within the limit (and whatever dies meanwhile), or fail."""
        pending = [(name, code)]
        while pending:
            name, code = pending.pop()
            child = self.children[name]
            report = f"{name} (pid {child.pid}) {describe_exit(code)}; last lines of {child.log_path}:\n" \
                     f"{child.tail(TAIL_LINES)}"
            self._event("died", child=name, code=code, tail=child.tail(TAIL_LINES))
            limit = self.cfg.restart.max_restarts
            if code == EXIT_STARTUP:
                raise RunFailed(f"{report}\n(exit code 2 is a start-up error: not restarted)")
            if self.restarts[name] >= limit:
                raise RunFailed(f"{report}\n(restarted {self.restarts[name]} times already, restart.max_restarts "
                                f"= {limit})")
            self.restarts[name] += 1
            self.console.say(f"{report}\nrestarting {name} ({self.restarts[name]} of {limit})")
            try:
                self._pause(self.cfg.restart.backoff_s)
                {"server": lambda: self._start_server(restart=True),
                 "trainer": lambda: self._start_trainer(restart=True),
                 "engine": self._start_engine}[name]()
                self._event("restarted", child=name, restarts=self.restarts[name])
                self._progressed()
            except ChildDied as died:
                pending.append((died.child.name, died.code))

    def _pause(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self._check_signals()
            time.sleep(min(POLL_S, max(0.0, end - time.monotonic())))

    def _tick(self) -> None:
        """Metrics, console and plots: what every wait does between its checks."""
        if self.metrics is None:
            return
        self.metrics.poll()
        self.console.show(self._status())
        every = self.cfg.plots.every_s
        if self._plots_ok and every and time.monotonic() - self._plotted >= every:
            self._plot()

    def _status(self) -> Status:
        children = []
        for name, child in self.children.items():
            state = f"pid {child.pid}" if child.running else describe_exit(child.poll())
            if self.restarts[name]:
                state += f", {self.restarts[name]} restart{'s' if self.restarts[name] > 1 else ''}"
            children.append((name, state))
        return Status(time.monotonic() - self._started, self.metrics.steps, self.cfg.max_steps,
                      self.cfg.max_minutes, self.metrics.latest, children)

    def _plot(self) -> None:
        """Start a plot child unless one still runs; a missing matplotlib is said once."""
        if self.plotter is not None:
            code = self.plotter.poll()
            if code is None:
                return
            if code == NO_MATPLOTLIB:
                self._no_matplotlib()
                return
        self._plotted = time.monotonic()
        if self.plotter is None:
            self.plotter = Child("plots", [], self.layout.log("plots"))
        self.plotter.argv = python("-m", "tidal.engine.plots", str(self.layout.root))
        self.plotter.start()
        self.guard.watch(self.plotter)

    def _no_matplotlib(self) -> None:
        if self._plots_ok:
            self._plots_ok = False
            self.console.say("matplotlib is not installed (pip install 'tidal[train]'): no plots")

    # --- stopping

    def _stop_all(self) -> None:
        """Every child, in reverse start order: SIGTERM, up to restart.stop_timeout_s, SIGKILL. A second
        signal stops the waiting (SIGKILL at once)."""
        for name, child in reversed(list(self.children.items())):
            if child.running:
                self.console.say(f"stopping {name} (pid {child.pid})")
            code = child.stop(self.cfg.restart.stop_timeout_s, abandon=lambda: len(self.signals) >= 2)
            if self.events is not None:
                self._event("stopped", child=name, code=code if code is not None else 0)
        if self.plotter is not None:
            self.plotter.stop(5.0)

    def _finish(self) -> None:
        if self.metrics is None:
            return
        self.metrics.poll()
        self.console.final(self._status())
        if self._plots_ok and len(self.signals) < 2:
            self._plot()
            if self.plotter is not None and self._plots_ok:
                end = time.monotonic() + PLOT_DEADLINE_S
                while self.plotter.running and time.monotonic() < end and len(self.signals) < 2:
                    time.sleep(POLL_S)
                self.plotter.stop(1.0)
                if self.plotter.poll() == 0:
                    self.console.say(f"plots in {self.layout.plots}")
                elif self.plotter.poll() == NO_MATPLOTLIB:
                    self._no_matplotlib()
        self.metrics.close()
        self._event("end", steps=self.metrics.steps)
        self.events.close()

    def _event(self, name: str, **fields) -> None:
        if self.events is not None:
            self.events.log({"event": name, **fields}, step=self.metrics.steps if self.metrics else None)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tidal run", description=__doc__.splitlines()[0])
    add_config_args(p, RunConfig)
    p.add_argument("--sync", action="store_true",
                   help="synchronous rollouts: the engine's rollout.mode = sync, the trainer's max_staleness = 0")
    p.add_argument("--run-dir", help="where the run writes (run_dir); an existing run resumes")
    p.add_argument("--debug", action="store_true", help="log at debug level and show tracebacks")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.sync:
        args.overrides.append("sync=true")
    if args.run_dir:
        args.overrides.append(f"run_dir={json.dumps(args.run_dir)}")
    try:
        cfg = config_from_args(RunConfig, args)
        if cfg is None:
            return 0
        return Run(cfg).execute()
    except TidalError as exc:
        return fail("tidal run", exc, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
