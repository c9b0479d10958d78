"""`tidal bench soak [--minutes N | --quick] [--fault-every S] [--json OUT]`: the whole pipeline for N
minutes with its processes SIGKILLed and restarted on a schedule; nothing may be lost, nothing may grow.

What runs, as a user's deployment would, each a child process started by engine/supervise.py's
`Child` (tied to this process's life, its own process group, its output in a log file):
- two simulated inference servers (`tidal serve --simulate`, the cost model), both in the engine's
  rotation; a restarted one comes back on its port with the newest published weights at their version;
- the engine daemon (`tidal engine`) on the synthetic multi-turn env, with `metrics.ledger = true`;
- the real trainer (`tidal trainer`) training a tiny Llama on CPU, publishing weights to disk every
  step and checkpointing every few; a restarted one binds the same ports and resumes.
Every `--fault-every` seconds after the previous recovery one process is SIGKILLed (server 0, server
1 in turn, the engine, the trainer, round robin; a quick run injects each kind once at least), restarted
at once, and waited for (its readiness line or `ready` record). A process that exits without being
killed is a finding: it is reported (`unplanned_exits`, with the tail of its log) and restarted.
At the end a final drain: the engine gets SIGTERM (finish what runs, flush), then the trainer (last
step, checkpoint, acknowledge), then the servers; each must exit within DRAIN_TIMEOUT_S (else a hang).

The ledger is computed from the processes' own records, id by id, never from this process's guesses:
- produced: trajectories an engine finished, i.e. wrote durably to its spool; the engine's `spooled`
  records name them (metrics.ledger), and its `recovered` records name what a restarted engine found
  in its spool (a group spooled just before a SIGKILL may have missed its `spooled` record);
- trained: ids in the trainer's `step` records as its run finally stands (a `resume` at version v
  supersedes the steps >= v recorded before it: they were undone with the process);
- dropped_stale / rejected: ids in the trainer's `dropped` records (those at versions > v before a
  resume at v are superseded likewise), not trained;
- dead_lettered: ids of `step_error` records (a failed step's batch, kept in the dead letter);
- pending: ids still durable at the end, neither trained nor dropped: buffered in the trainer's final
  checkpoint, or unacknowledged in the engine's spool (the next run trains them);
- delivered: produced ids the trainer took (trained, dropped, dead-lettered, or in its checkpoint);
- lost: produced, yet in none of the above after the final drain. The target is 0.
produced = trained + dropped_stale + rejected + dead_lettered + pending + lost (`balanced`).
Episodes running in an engine when it is killed are lost *work*, not data (they were never
produced): `lost_work_episodes` estimates them from the killed engine's last metrics record.

RSS of each process (psutil if installed, else VmRSS of /proc/PID/status) is sampled every RSS_EVERY_S
while it is ready; a role's growth is the mean of its last window over the mean of its first, the
window a minute (a fifth of the run when that is shorter); `rss_growth_ratio` is the largest. A
restart resets a process's memory and could hide a leak, so `rss_growth_in_life` is the same ratio
over the longest-lived start of each role (window a minute, or a fifth of that life), the largest.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import tomli_w
from tidal.bench.report import bench_parser, emit
from tidal.engine.supervise import Child, Guard, describe_exit

__all__ = ["main", "ledger", "growth"]

QUICK_MINUTES = 0.75
QUICK_FAULT_EVERY_S = 10.0
FAULT_EVERY_S = 45.0
"""Default gap between a recovery and the next fault in a long run: each role is killed every few
minutes, and lives long enough between kills to show a leak."""
READY_TIMEOUT_S = 180.0
"""A process not ready this long after its start is a hang (the trainer loads torch on a shared CPU)."""
DRAIN_TIMEOUT_S = 90.0
"""The final drain's deadline per process: the engine drains within 30 s, then waits for commits."""
SETTLE_S = 5.0
"""After the last fault's recovery, the pipeline runs this long before the drain: work flows again."""
RSS_EVERY_S = 1.0
POLL_S = 0.1
RSS_WINDOW_S = 60.0
"""The growth windows: the first and last minute (a fifth of the run, when shorter)."""
FAULT_KINDS = ("server", "engine", "trainer")
TINY_BUILDER = "tidal.engine.reference.tiny:build_tiny_model"
VOCAB = 512
"""The tiny model's (padded) vocabulary: `tidal serve --simulate` draws ids from [256, 512)."""
SERVE_READY = "tidal serve ready "

try:
    import psutil
except ImportError:
    psutil = None
_GONE = (OSError, ValueError) + ((psutil.Error,) if psutil is not None else ())
"""What reading a process's memory raises once it has exited."""


class SoakError(RuntimeError):
    """The soak could not go on (a process that never became ready); the message quotes its log."""


def rss_mib(pid: int) -> float | None:
    """Resident memory of `pid` now, MiB; None once it is gone."""
    try:
        if psutil is not None:
            return psutil.Process(pid).memory_info().rss / 2**20
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except _GONE:
        return None
    return None


class Jsonl:
    """A metrics JSONL file read incrementally (complete lines only), across the writer's restarts."""

    def __init__(self, path: Path):
        self.path = path
        self.records: list[dict] = []
        self._offset = 0

    def poll(self) -> list[dict]:
        if self.path.exists():
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
            end = data.rfind(b"\n") + 1
            self._offset += end
            for line in data[:end].splitlines():
                try:
                    self.records.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a SIGKILL mid-write
                    continue
        return self.records

    def events(self, name: str) -> list[dict]:
        return [r for r in self.poll() if r.get("event") == name]


def _python(*args: str) -> list[str]:
    return [sys.executable, "-u", *args]


# --- the ledger ----------------------------------------------------------------------------------------


def _ids(field: str | None) -> list[str]:
    return [i for i in (field or "").split(",") if i]


def ledger(engine_records: list[dict], trainer_records: list[dict], buffered: set[str], spooled: set[str]) -> dict:
    """Where every produced trajectory went (definitions in the module docstring); `buffered` are the ids
    in the trainer's final checkpoint, `spooled` those still pending in the engine's spool."""
    produced = {i for r in engine_records if r.get("event") in ("spooled", "recovered") for i in _ids(r.get("ids"))}
    steps: dict[int, list[str]] = {}
    drops: list[tuple[int, str, list[str]]] = []
    errors: list[str] = []
    for r in trainer_records:
        match r.get("event"):
            case "resume":
                steps = {v: ids for v, ids in steps.items() if v < r["step"]}
                drops = [d for d in drops if d[0] <= r["step"]]
            case "step":
                steps[r["step"]] = _ids(r.get("ids"))
            case "step_error":
                errors += _ids(r.get("ids"))
            case "dropped":
                drops += [(r["step"], why, _ids(r.get(why))) for why in ("stale", "rejected")]
    used = Counter(i for ids in steps.values() for i in ids)
    trained = set(used)
    stale = {i for _, why, ids in drops if why == "stale" for i in ids} - trained
    rejected = {i for _, why, ids in drops if why == "rejected" for i in ids} - trained - stale
    dead = set(errors) - trained - stale - rejected
    taken = trained | stale | rejected | dead
    pending = (buffered | spooled) - taken
    lost = produced - taken - pending
    counts = {
        "produced": len(produced),
        "delivered": len(produced & (taken | buffered)),
        "trained": len(produced & trained),
        "dropped_stale": len(produced & stale),
        "rejected": len(produced & rejected),
        "dead_lettered": len(produced & dead),
        "pending": len(produced & pending),
        "lost": len(lost),
        "trained_twice": sum(1 for n in used.values() if n > 1),
        "unrecorded": len((taken | pending) - produced),
    }
    counts["balanced"] = counts["produced"] == sum(counts[k] for k in (
        "trained", "dropped_stale", "rejected", "dead_lettered", "pending", "lost"))
    return {**counts, "lost_ids": sorted(lost)[:20]}


def final_checkpoint_ids(ckpt_dir: Path) -> set[str]:
    """Ids buffered in the newest complete checkpoint (read without torch)."""
    import msgspec
    from tidal.protocol.messages import decode_trajectory
    from tidal.trainer.checkpoint import CheckpointMeta

    found = sorted(p for p in ckpt_dir.glob("step-*") if (p / "intake.msgpack").is_file())
    if not found:
        return set()
    meta = msgspec.msgpack.decode((found[-1] / "intake.msgpack").read_bytes(), type=CheckpointMeta)
    return {decode_trajectory(frame).id for frame in meta.intake.buffered}


def spool_ids(spool_dir: Path) -> set[str]:
    """Ids still pending in an engine's spool (the engine has exited)."""
    from tidal.engine.spool import Spool

    if not spool_dir.is_dir():
        return set()
    with Spool(spool_dir, max_bytes=1 << 40) as spool:
        return {traj.id for _, traj in spool.pending()}


def growth(samples: list[tuple[float, float]], window_s: float) -> float | None:
    """Mean RSS of the last `window_s` over the mean of the first (samples: (seconds, MiB))."""
    if len(samples) < 2:
        return None
    t0, t1 = samples[0][0], samples[-1][0]
    first = [m for t, m in samples if t <= t0 + window_s]
    last = [m for t, m in samples if t >= t1 - window_s]
    return (sum(last) / len(last)) / (sum(first) / len(first))


# --- the processes -------------------------------------------------------------------------------------


class Role:
    """One supervised process of the pipeline: how it starts, when it is ready, its RSS over time."""

    def __init__(self, name: str, child: Child, soak: Soak):
        self.name, self.child, self.soak = name, child, soak
        self.ready = False
        self.rss: list[tuple[float, float]] = []
        self.lives: list[int] = []
        """Which start each RSS sample belongs to (a restart begins a new life)."""

    def start(self) -> None:
        self.ready = False
        self.child.start()
        self.soak.guard.watch(self.child)

    def is_ready(self) -> bool:
        raise NotImplementedError

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self.is_ready():
            if self.child.poll() is not None:
                raise SoakError(f"{self.name} {describe_exit(self.child.poll())} while starting:\n{self.child.tail()}")
            if time.monotonic() > deadline:
                self.soak.hangs.append(f"{self.name} not ready {READY_TIMEOUT_S:g} s after its start")
                raise SoakError(f"{self.name} not ready after {READY_TIMEOUT_S:g} s:\n{self.child.tail()}")
            self.soak.sample()
            time.sleep(POLL_S)
        self.ready = True

    def sample(self, now: float) -> None:
        if self.ready and self.child.running:
            mib = rss_mib(self.child.pid)
            if mib is not None:
                self.rss.append((now, mib))
                self.lives.append(self.child.starts)

    def longest_life(self) -> list[tuple[float, float]]:
        """The RSS samples of the start that ran longest: growth within one life, which restarts cannot hide."""
        best = Counter(self.lives).most_common(1)
        return [s for s, life in zip(self.rss, self.lives, strict=True) if best and life == best[0][0]]


class Server(Role):
    def __init__(self, name: str, soak: Soak):
        super().__init__(name, Child(name, [], soak.dir / "logs" / f"{name}.log"), soak)
        self.port = 0
        self.url = ""

    def argv(self) -> list[str]:
        weights = sorted(self.soak.weights.glob("v[0-9]*")) if self.soak.weights.is_dir() else []
        model = [str(weights[-1]), "--weight-version", str(int(weights[-1].name[1:]))] if weights \
            else [str(self.soak.model)]
        sets = {"simulate.vocab_size": VOCAB, "simulate.length_median": 6, "simulate.length_sigma": 0.5,
                "simulate.prefix_cache_tokens": 20000, "simulate.seed": int(self.name[-1]),
                "server.health_timeout_s": 2}
        return _python("-m", "tidal", "serve", "--simulate", "--port", str(self.port), "--model", *model,
                       *(a for k, v in sets.items() for a in ("--set", f"{k}={v}")))

    def start(self) -> None:
        self.child.argv = self.argv()
        super().start()

    def is_ready(self) -> bool:
        for line in self.child.output().splitlines():
            if line.startswith(SERVE_READY):
                self.url = line[len(SERVE_READY):].strip()
                self.port = int(self.url.rsplit(":", 1)[1])
                return True
        return False


class Daemon(Role):
    """The trainer or the engine: ready at its next `ready` record."""

    def __init__(self, name: str, soak: Soak, config: Path, jsonl: Path):
        super().__init__(name, Child(name, _python("-m", "tidal", name, str(config)),
                                    soak.dir / "logs" / f"{name}.log", env=soak.child_env), soak)
        self.config = config
        self.jsonl = Jsonl(jsonl)
        self._seen = 0

    def start(self) -> None:
        self._seen = len(self.jsonl.events("ready"))
        super().start()

    def is_ready(self) -> bool:
        return len(self.jsonl.events("ready")) > self._seen

    def ready_record(self) -> dict:
        return self.jsonl.events("ready")[-1]


# --- the soak ------------------------------------------------------------------------------------------


class Soak:
    def __init__(self, workdir: Path, minutes: float, fault_every_s: float, *, every_kind: bool):
        self.dir = workdir
        self.minutes = minutes
        self.fault_every_s = fault_every_s
        self.every_kind = every_kind
        self.model = workdir / "model"
        self.weights = workdir / "weights"
        self.child_env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                          "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}
        self.guard: Guard | None = None
        self.roles: list[Role] = []
        self.faults: list[dict] = []
        self.unplanned: list[dict] = []
        self.hangs: list[str] = []
        self.lost_work = 0
        self.t0 = time.monotonic()
        self._sampled = 0.0

    def now(self) -> float:
        return time.monotonic() - self.t0

    def sample(self) -> None:
        if time.monotonic() - self._sampled >= RSS_EVERY_S:
            self._sampled = time.monotonic()
            for role in self.roles:
                role.sample(self.now())

    # --- start-up

    def build_model(self) -> None:
        child = Child("model", _python("-m", "tidal.engine.build_model", TINY_BUILDER, str(self.model),
                                       json.dumps({"vocab_size": VOCAB})),
                      self.dir / "logs" / "model.log", env=self.child_env)
        child.start()
        self.guard.watch(child)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while child.poll() is None and time.monotonic() < deadline:
            time.sleep(POLL_S)
        if child.stop(1.0) != 0:
            raise SoakError(f"building the tiny model failed:\n{child.tail()}")

    def start(self) -> None:
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        self.build_model()
        self.servers = [Server(f"server-{i}", self) for i in range(2)]
        for server in self.servers:
            self.roles.append(server)
            server.start()
        for server in self.servers:
            server.wait_ready()
        trainer_cfg = {
            "learner": {"model": {"path": str(self.model), "dtype": "float32"}, "optim": {"lr": 1e-4}},
            "intake": {"endpoint": "tcp://127.0.0.1:0", "status_endpoint": "tcp://127.0.0.1:0", "batch_size": 8,
                       "group_size": 2, "max_staleness": 1, "capacity": 256, "max_uncommitted": 64},
            "checkpoint": {"dir": str(self.dir / "checkpoints"), "every_steps": 5},
            "publish": {"type": "disk", "dir": str(self.weights)},
            "metrics": {"jsonl": str(self.dir / "trainer.jsonl"), "console": False},
            "failures": {"dead_letter": str(self.dir / "dead_letter.jsonl")},
        }
        path = self.dir / "trainer.toml"
        path.write_text(tomli_w.dumps(trainer_cfg))
        self.trainer = Daemon("trainer", self, path, self.dir / "trainer.jsonl")
        self.roles.append(self.trainer)
        self.trainer.start()
        self.trainer.wait_ready()
        ready = self.trainer.ready_record()
        endpoints = {"endpoint": ready["endpoint"], "status_endpoint": ready["status_endpoint"]}
        trainer_cfg["intake"].update(endpoints)  # a restarted trainer binds the same ports
        path.write_text(tomli_w.dumps(trainer_cfg))
        engine_cfg = {
            "model": {"path": str(self.model), "max_context": 1024},
            "tasks": [{"env": "synthetic:Turns-v0", "kwargs": {"turns": 2}}],
            "backend": {"type": "sglang", "urls": [s.url for s in self.servers], "health_interval_s": 0.3,
                        "eject_after": 1},
            "agent": {"type": "chat", "max_turns": 2, "max_new_tokens": 8},
            "sampling": {"seed": 0},
            "rollout": {"group_size": 2, "max_concurrent": 8},
            "trainer": {**endpoints, "spool_dir": str(self.dir / "spool"), "window": 256, "status_timeout_s": 3.0},
            "metrics": {"jsonl": str(self.dir / "engine.jsonl"), "every_s": 1.0, "console": False, "ledger": True},
        }
        path = self.dir / "engine.toml"
        path.write_text(tomli_w.dumps(engine_cfg))
        self.engine = Daemon("engine", self, path, self.dir / "engine.jsonl")
        self.roles.append(self.engine)
        self.engine.start()
        self.engine.wait_ready()

    # --- faults

    def _victims(self) -> list[Role]:
        """The fault order: server-0, engine, trainer, server-1, engine, trainer, ..."""
        n = len(self.faults)
        kind = FAULT_KINDS[n % len(FAULT_KINDS)]
        if kind == "server":
            return [self.servers[(n // len(FAULT_KINDS)) % len(self.servers)]]
        return [self.engine if kind == "engine" else self.trainer]

    def inject(self) -> None:
        (role,) = self._victims()
        kind = role.name.split("-")[0]
        in_flight = self._engine_in_flight() if role is self.engine else 0
        at = self.now()
        pid = role.child.pid
        role.ready = False
        role.child.kill()
        self.lost_work += in_flight
        role.start()
        role.wait_ready()
        fault = {"at_s": round(at, 1), "kind": kind, "process": role.name, "pid": pid,
                 "recovered_in_s": round(self.now() - at, 1)}
        if role is self.engine:
            fault["episodes_in_flight"] = in_flight
        self.faults.append(fault)
        print(f"tidal bench soak: {at:.0f} s: SIGKILL {role.name} (pid {pid}), back in "
              f"{fault['recovered_in_s']:.1f} s", file=sys.stderr, flush=True)

    def _engine_in_flight(self) -> int:
        """Episodes running in the engine by its last metrics record (lost work if it dies now)."""
        since = max((i for i, r in enumerate(self.engine.jsonl.poll()) if r.get("event") == "ready"), default=0)
        for r in reversed(self.engine.jsonl.records[since:]):
            if "engine/episodes_in_flight" in r:
                return int(r["engine/episodes_in_flight"])
        return 0

    def watch(self) -> None:
        """A process that exits without being killed is a finding: report it, restart it."""
        for role in self.roles:
            code = role.child.poll()
            if code is not None:
                self.unplanned.append({"at_s": round(self.now(), 1), "process": role.name,
                                       "exit": describe_exit(code), "tail": role.child.tail(15)})
                print(f"tidal bench soak: {role.name} {describe_exit(code)} unprompted:\n{role.child.tail(15)}",
                      file=sys.stderr, flush=True)
                role.start()
                role.wait_ready()

    def run(self) -> None:
        end = self.now() + self.minutes * 60
        next_fault = self.now() + self.fault_every_s
        self.soak_started = self.now()
        while True:
            self.sample()
            self.watch()
            kinds = {f["kind"] for f in self.faults}
            owed = self.every_kind and kinds != set(FAULT_KINDS)
            if self.now() >= next_fault and (self.now() < end - SETTLE_S or owed):
                self.inject()
                next_fault = self.now() + self.fault_every_s
                end = max(end, self.now() + SETTLE_S)
            elif self.now() >= end and not owed:
                break
            time.sleep(POLL_S)
        self.soak_s = self.now() - self.soak_started

    # --- the end

    def drain(self) -> dict[str, str]:
        """SIGTERM in order: the engine, the trainer, the servers; each within DRAIN_TIMEOUT_S."""
        exits = {}
        for role in [self.engine, self.trainer, *self.servers]:
            role.ready = role.ready and role is not self.engine  # keep sampling the others meanwhile
            started = time.monotonic()
            role.child.signal_group(signal.SIGTERM)
            while role.child.running and time.monotonic() - started < DRAIN_TIMEOUT_S:
                self.sample()
                time.sleep(POLL_S)
            if role.child.running:
                self.hangs.append(f"{role.name} still running {DRAIN_TIMEOUT_S:g} s after SIGTERM (killed)")
            role.ready = False
            exits[role.name] = describe_exit(role.child.stop(1.0))
        return exits

    def close(self) -> None:
        for role in reversed(self.roles):
            role.child.kill()


def _summary(soak: Soak, book: dict, exits: dict) -> tuple[list[dict], dict]:
    window = min(RSS_WINDOW_S, soak.soak_s / 5)
    rows = []
    for role in soak.roles:
        ratio = growth(role.rss, window)
        life = role.longest_life()
        life_s = life[-1][0] - life[0][0] if life else 0.0
        within = growth(life, min(RSS_WINDOW_S, life_s / 5))
        rows.append({"process": role.name, "starts": role.child.starts, "rss_samples": len(role.rss),
                     "rss_first_mib": round(role.rss[0][1], 1) if role.rss else None,
                     "rss_last_mib": round(role.rss[-1][1], 1) if role.rss else None,
                     "rss_peak_mib": round(max(m for _, m in role.rss), 1) if role.rss else None,
                     "rss_growth": None if ratio is None else round(ratio, 3),
                     "longest_life_s": round(life_s), "rss_growth_in_life": None if within is None else round(within, 3),
                     "exit": exits.get(role.name, "")})
    ratios = [r["rss_growth"] for r in rows if r["rss_growth"] is not None]
    in_life = [r["rss_growth_in_life"] for r in rows if r["rss_growth_in_life"] is not None]
    summary = {
        "minutes": round(soak.soak_s / 60, 2),
        "produced": book["produced"], "delivered": book["delivered"], "trained": book["trained"],
        "dropped_stale": book["dropped_stale"], "rejected": book["rejected"],
        "dead_lettered": book["dead_lettered"], "pending": book["pending"], "lost": book["lost"],
        "balanced": book["balanced"], "trained_twice": book["trained_twice"], "unrecorded": book["unrecorded"],
        "lost_work_episodes": soak.lost_work,
        "rss_growth_ratio": max(ratios) if ratios else None,
        "rss_growth_in_life": max(in_life) if in_life else None,
        "rss_window_s": round(window, 1),
        "faults_injected": len(soak.faults),
        "faults_by_kind": dict(Counter(f["kind"] for f in soak.faults)),
        "unplanned_exits": len(soak.unplanned), "hangs": len(soak.hangs),
    }
    return rows, summary


def main(argv: list[str]) -> int:
    parser = bench_parser("soak", __doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=None,
                        help=f"how long the faults go on (default 10; --quick: {QUICK_MINUTES})")
    parser.add_argument("--fault-every", type=float, default=None, metavar="S",
                        help=f"seconds from one recovery to the next fault (default {FAULT_EVERY_S:g}; "
                             f"--quick or under 2 minutes: {QUICK_FAULT_EVERY_S:g})")
    parser.add_argument("--dir", help="keep the run's files here (default: a temporary directory, removed)")
    args = parser.parse_args(argv)
    minutes = args.minutes if args.minutes is not None else (QUICK_MINUTES if args.quick else 10.0)
    short = args.quick or minutes < 2
    every = args.fault_every if args.fault_every is not None else (QUICK_FAULT_EVERY_S if short else FAULT_EVERY_S)
    # SIGTERM (a test's timeout, a `kill`) unwinds like Ctrl-C: every child is stopped, the temporary dir removed
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    with tempfile.TemporaryDirectory(prefix="tidal-soak-") as tmp:
        workdir = Path(args.dir) if args.dir else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        soak = Soak(workdir, minutes, every, every_kind=short)
        soak.guard = Guard()
        try:
            soak.start()
            soak.run()
            exits = soak.drain()
        except SoakError as exc:
            print(f"tidal bench soak: {exc}", file=sys.stderr)
            return 1
        finally:
            soak.close()
            soak.guard.close()
        book = ledger(soak.engine.jsonl.poll(), soak.trainer.jsonl.poll(),
                      final_checkpoint_ids(workdir / "checkpoints"), spool_ids(workdir / "spool"))
        rows, summary = _summary(soak, book, exits)
        config = {"minutes": minutes, "fault_every_s": every, "fault_kinds": list(FAULT_KINDS),
                  "servers": 2, "rss_every_s": RSS_EVERY_S, "rss_source": "psutil" if psutil else "/proc VmRSS",
                  "definitions": __doc__.split("The ledger")[1].split("RSS of each")[0].strip()}
        report = emit("soak", config, rows, summary, None)
        report.update({"faults": soak.faults, "unplanned_exits": soak.unplanned, "hangs": soak.hangs,
                       "lost_ids": book["lost_ids"],
                       "rss_mib": {r.name: [[round(t, 1), round(m, 1)] for t, m in r.rss] for r in soak.roles}})
        if args.json_out:
            Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json_out).write_text(json.dumps(report, indent=2))
    ok = book["lost"] == 0 and not soak.hangs and not soak.unplanned
    return 0 if ok else 1
