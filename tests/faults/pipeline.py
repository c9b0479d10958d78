"""The assembled pipeline as real processes on loopback, for the fault-injection tests: reference
servers (`tidal serve`), the trainer daemon, engine daemons, each started and stopped by one `Pipeline`
so that a failing test leaves no process behind; and the ledger that says where each trajectory went."""

import asyncio
import time
from pathlib import Path

import msgspec
from tidal.engine.reference.launch import ReferenceServer

from tests.engine.proc import EngineProcess, engine_toml
from tests.trainer.proc import TrainerProcess, records, trainer_toml

SERVER_ARGS = ["--set", "server.health_timeout_s=2"]


class WrappedServer(ReferenceServer):
    """A `tidal serve` run under `wrap`, a command line such as nsenter into a namespace."""

    def __init__(self, *args, wrap: list[str], **kw):
        super().__init__(*args, **kw)
        self.wrap = wrap

    def _command(self, port: int) -> list[str]:
        return [*self.wrap, *super()._command(port)]

    def view(self, path: Path) -> Path:
        """`path` as the server sees it (its mount namespace, through /proc)."""
        return Path(f"/proc/{self.pid}/root") / path.relative_to("/")


def hiding(path: Path) -> list[str]:
    """A wrap for `WrappedServer`: a mount namespace of its own (`unshare -rm`, no root needed) where
    `path` is an empty tmpfs, as on a host that cannot see the shared weights directory. Files the
    test puts under the server's `view(path)` appear to it there."""
    return ["unshare", "-rm", "sh", "-c", 'mount -t tmpfs none "$0" && exec "$@"', str(path)]


class SmallDisks:
    """Small filesystems without root: a holder process in a user + mount namespace of its own, with a
    tmpfs of `size` mounted on each of `dirs` (created first). Children started under `wrap` (nsenter
    into that namespace) write to the tmpfs, and get ENOSPC when it is full; the test sees the same files
    under `view(path)` and can fill the disk (`fill`) and free it (`free`) while they run. The tmpfs
    outlive the children (a restarted daemon finds what its predecessor left), not the holder."""

    def __init__(self, dirs: list[Path], size: str = "4m"):
        self.dirs = dirs
        self.size = size
        self.proc = None

    def __enter__(self) -> "SmallDisks":
        import subprocess

        for d in self.dirs:
            d.mkdir(parents=True, exist_ok=True)
        mounts = " && ".join(f"mount -t tmpfs -o size={self.size} none '{d}'" for d in self.dirs)
        self.proc = subprocess.Popen(["unshare", "-rm", "sh", "-c", f"{mounts} && echo up && exec sleep 3600"],
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "up", "could not mount the small filesystems"
        return self

    def __exit__(self, *exc) -> None:
        self.proc.kill()
        self.proc.wait()

    @property
    def wrap(self) -> list[str]:
        return ["nsenter", "-t", str(self.proc.pid), "-U", "-m", "--preserve-credentials", "--"]

    def view(self, path: Path) -> Path:
        return Path(f"/proc/{self.proc.pid}/root") / path.relative_to("/")

    def fill(self, d: Path) -> None:
        """Fill the filesystem at `d` to the last byte."""
        import os

        fd = os.open(self.view(d) / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            for size in (1 << 16, 1):
                try:
                    while os.write(fd, b"\0" * size):
                        pass
                except OSError:
                    pass
        finally:
            os.close(fd)

    def free(self, d: Path) -> None:
        (self.view(d) / "filler").unlink()


def can_unshare() -> bool:
    """Whether this machine lets an unprivileged user make a user + mount namespace and mount a tmpfs."""
    import subprocess

    probe = ["unshare", "-rm", "sh", "-c", "mount -t tmpfs none /mnt"]
    try:
        return subprocess.run(probe, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class Pipeline:
    """Factory of servers, trainer and engines under `tmp`; `close` kills whatever still runs."""

    def __init__(self, tmp: Path, model_dir: Path):
        self.tmp = tmp
        self.model_dir = model_dir
        self.servers: list[ReferenceServer] = []
        self.trainers: list[TrainerProcess] = []
        self.engines: list[EngineProcess] = []

    def server(self, args=(), env=None, wrap=()) -> ReferenceServer:
        """A started `tidal serve` of the tiny model (the real trainer trains on its tokens), run under
        `wrap` if given (`WrappedServer`)."""
        if wrap:
            srv = WrappedServer(self.model_dir, args=[*SERVER_ARGS, *args], env=env, wrap=list(wrap))
        else:
            srv = ReferenceServer(self.model_dir, args=[*SERVER_ARGS, *args], env=env)
        self.servers.append(srv)
        return srv.start()

    def trainer(self, env=None, wrap=(), **sections) -> TrainerProcess:
        """A trainer (not started) with small batches, a checkpoint every 2 steps, disk weights every step,
        on ipc endpoints under `tmp` (a restart binds the same ones)."""
        cfg = trainer_toml(self.tmp, self.model_dir, **{
            "intake": {"batch_size": 4, "group_size": 2, "max_staleness": 1, "max_uncommitted": 64,
                       # fixed endpoints: a restarted trainer is where the engines look for it
                       "endpoint": f"ipc://{self.tmp}/traj", "status_endpoint": f"ipc://{self.tmp}/status"},
            "checkpoint": {"dir": str(self.tmp / "ckpt"), "every_steps": 2},
            **sections})
        proc = TrainerProcess(self.tmp, cfg, env=env, wrap=wrap)
        self.trainers.append(proc)
        return proc

    def engine(self, urls: list[str], ready: dict, name: str = "engine", env=None, wrap=(),
               **sections) -> EngineProcess:
        """An engine (not started) on `urls`, fed to the trainer whose `ready` record is given."""
        cfg = engine_toml(self.tmp, self.model_dir, urls[0], ready, **{
            "backend": {"type": "sglang", "urls": urls, "health_interval_s": 0.3, "eject_after": 1},
            "agent": {"type": "chat", "max_turns": 2, "max_new_tokens": 6},
            "rollout": {"group_size": 2, "max_concurrent": 8},
            "trainer": {"endpoint": ready["endpoint"], "status_endpoint": ready["status_endpoint"],
                        "spool_dir": str(self.tmp / f"{name}-spool"), "window": 256, "status_timeout_s": 3.0},
            "metrics": {"jsonl": str(self.tmp / f"{name}.jsonl"), "every_s": 0.3, "console": False},
            **sections})
        proc = EngineProcess(self.tmp, cfg, name, env=env, wrap=wrap)
        self.engines.append(proc)
        return proc

    def explain(self) -> str:
        """Each engine's and trainer's latest metrics and log tail: why a wait timed out."""
        return "\n".join([*(_safely(_engine_state, e) for e in self.engines),
                           *(_safely(_trainer_state, t) for t in self.trainers)])

    async def until(self, cond, timeout: float, what: str, every: float = 0.1):
        """`until` whose timeout message carries `explain()`."""
        return await until(cond, timeout, what, every, explain=self.explain)

    def close(self) -> None:
        for proc in [*self.engines, *self.trainers]:
            proc.stop()
        for srv in self.servers:
            srv.kill()


def _safely(describe, proc) -> str:
    try:
        return describe(proc)
    except Exception as exc:  # an explanation must not hide the timeout it explains
        return f"({type(exc).__name__}: {exc})"


def _engine_state(engine: EngineProcess) -> str:
    return f"engine {engine.name} (start {engine.starts}): {metrics(engine)}\n{engine.log()[-1500:]}"


def _trainer_state(trainer: TrainerProcess) -> str:
    return f"trainer: last step {steps(trainer)[-1:]}\n{trainer.log()[-1500:]}"


def metrics(engine: EngineProcess) -> dict:
    """The engine's latest metrics row of its current run (after its latest `ready`); {} before any."""
    rows = records(engine.jsonl)
    starts = [i for i, r in enumerate(rows) if r.get("event") == "ready"]
    current = rows[starts[-1]:] if starts else rows
    found = [r for r in current if "engine/episodes_started" in r]
    return found[-1] if found else {}


def latest_status(endpoint: str, wait_s: float = 2.0) -> str:
    """What the trainer publishes on its status channel now (the latest of each kind), for a hang's
    explanation: its version, budget terms and grants say why engines wait."""
    import zmq
    from tidal.protocol.messages import decode_status

    latest = {}
    with zmq.Context() as ctx, ctx.socket(zmq.SUB) as sock:
        sock.linger = 0
        sock.subscribe(b"")
        sock.connect(endpoint)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if sock.poll(100):
                msg = decode_status(sock.recv())
                latest[type(msg).__name__] = msg
    return "\n".join(map(repr, latest.values()))


def steps(trainer: TrainerProcess) -> list[dict]:
    return [r for r in records(trainer.jsonl) if r.get("event") == "step"]


def trained(trainer: TrainerProcess) -> list[str]:
    """Ids of the trajectories the trainer's steps used, as its run finally stands: a resume at version v
    supersedes the steps >= v recorded before it (they were lost with the process)."""
    by_version: dict[int, list[str]] = {}
    for r in records(trainer.jsonl):
        if r.get("event") == "resume":
            by_version = {v: ids for v, ids in by_version.items() if v < r["step"]}
        elif r.get("event") == "step":
            by_version[r["step"]] = r["ids"].split(",")
    return [i for v in sorted(by_version) for i in by_version[v]]


def last_checkpoint(ckpt_dir: Path):
    """(version, CheckpointMeta) of the newest complete checkpoint, read without torch."""
    from tidal.trainer.checkpoint import CheckpointMeta

    path = sorted(p for p in ckpt_dir.glob("step-*") if p.is_dir())[-1]
    return int(path.name[5:]), msgspec.msgpack.decode((path / "intake.msgpack").read_bytes(), type=CheckpointMeta)


def spool_pending(spool_dir: Path) -> list[str]:
    """Ids of the trajectories still in an engine's spool (that engine must have exited)."""
    from tidal.engine.spool import Spool

    with Spool(spool_dir, max_bytes=1 << 30) as spool:
        return [traj.id for _, traj in spool.pending()]


def ledger(trainer: TrainerProcess, ckpt_dir: Path, spools: list[Path]) -> dict:
    """Where every trajectory went, once the trainer stopped with a checkpoint and the engines exited:
    trained (ids, as the run stands), buffered in the trainer's last checkpoint (ids), dropped as stale or
    rejected (counts, checkpointed with the intake), or still in a spool (ids)."""
    from tidal.protocol.messages import decode_trajectory

    _, meta = last_checkpoint(ckpt_dir)
    used = trained(trainer)
    return {
        "trained": used,
        "buffered": [decode_trajectory(b).id for b in meta.intake.buffered],
        "stale_dropped": meta.intake.counters.get("stale_dropped", 0),
        "rejected": meta.intake.counters.get("rejected", 0),
        "pending": [i for d in spools for i in spool_pending(d)],
    }


def assert_nothing_lost(book: dict, produced: int) -> None:
    """Every trajectory the engines produced (`produced`: their spooled counters) was trained on exactly
    once, waits in the trainer's checkpoint or an engine's spool, or was dropped with a count."""
    used = book["trained"]
    assert len(used) == len(set(used)), f"trained twice: {sorted(i for i in set(used) if used.count(i) > 1)}"
    waiting = (set(book["buffered"]) | set(book["pending"])) - set(used)
    accounted = len(used) + len(waiting) + book["stale_dropped"] + book["rejected"]
    assert accounted == produced, f"{produced} produced, {accounted} accounted for: {book}"


async def until(cond, timeout: float, what: str, every: float = 0.1, explain=None):
    """Wait for `cond()` (a hang guard, not a timing assertion): its last value. On a timeout the
    message carries `explain()` (the processes' last metrics and logs), so a hang says where it stuck."""
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}" + (f"\n{explain()}" if explain else ""))
        await asyncio.sleep(every)
    return value
