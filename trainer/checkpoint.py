"""Durable trainer checkpoints: the learner, the intake and the channel's dedup state, as one unit.

A checkpoint is a directory `step-XXXXXXXX/` (XXXXXXXX = the policy version it holds) with
  model.safetensors  the model's tensors (from the learner state's "model" entry)
  trainer.pt         the rest of the learner state: optimiser, scheduler, version, RNG (torch.save,
                     loaded with weights_only=True so no code runs on load; tensors and plain values)
  intake.msgpack     `CheckpointMeta`: version, the intake snapshot (buffered trajectories, seen ids,
                     counters) and the channel's dedup state
It is written under a temporary name, every file fsynced, then renamed into place (atomic on POSIX),
so a reader sees a whole checkpoint or none (docs/architecture.md invariant 4: resume loses and repeats nothing).
The newest `keep_last` are kept.

Fault injection: with TIDAL_FAULT_CHECKPOINT_PAUSE_S set, `save` sleeps that long between the fsynced
temporary directory and its rename, so a test (tests/faults) can SIGKILL the trainer mid-write.
"""

import errno
import os
import shutil
import time
from pathlib import Path

import msgspec
from tidal.protocol.errors import TidalError
from tidal.trainer.config import CheckpointConfig
from tidal.trainer.intake import IntakeState

__all__ = ["CheckpointError", "CheckpointMeta", "Checkpointer", "Restored", "untie"]

_PREFIX = "step-"
_TMP = ".tmp-"
PAUSE_ENV = "TIDAL_FAULT_CHECKPOINT_PAUSE_S"
"""Seconds `save` sleeps before renaming a written checkpoint into place: a test's window to kill the
trainer mid-write. Unset (no pause) outside tests."""


class CheckpointError(TidalError, OSError):
    """A checkpoint could not be written (`errno` ENOSPC: the disk is full); the message names the
    directory. Nothing it would cover is acknowledged, and the checkpoints before it are intact."""


class CheckpointMeta(msgspec.Struct, kw_only=True):
    """The non-tensor part of a checkpoint (msgpack, no pickle)."""

    version: int
    saved_at: float
    intake: IntakeState
    dedup: bytes = b""
    """The trajectory channel's dedup state, msgpack-encoded by the receiver's owner."""
    counters: dict[str, float] = {}
    """Daemon counters (steps, trajectories used) carried across restarts."""


class Restored(msgspec.Struct):
    path: Path
    learner_state: dict
    meta: CheckpointMeta


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def untie(tensors: dict) -> dict:
    """CPU tensors for safetensors, which refuses tensors sharing storage (tied embeddings): repeats get
    their own copy."""
    seen: set[int] = set()
    out = {}
    for name, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        t = t.detach().to("cpu").contiguous()
        out[name] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return out


class _OSErrorKeeper:
    """A file for `torch.save` that keeps the OSError of a failed write (ENOSPC), which torch's C++
    writer would otherwise replace with a message about stream positions."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.f.flush()


class Checkpointer:
    """Writes, lists, prunes and loads checkpoints under `cfg.dir`."""

    def __init__(self, cfg: CheckpointConfig):
        self.cfg = cfg
        self.dir = Path(cfg.dir)
        self.dir.mkdir(parents=True, exist_ok=True)

    def discard_partial(self) -> None:
        """Delete what a crash mid-write left (never a complete checkpoint). Only the writer calls it.
        A crash between the two renames of a replace (`save` of a version saved before) left the old
        checkpoint under its temporary name and none under its own: it is put back, as the
        acknowledgements it covered were sent."""
        for old in self.dir.glob(f"{_TMP}old-{_PREFIX}*"):
            final = self.dir / old.name.removeprefix(f"{_TMP}old-").rsplit("-", 1)[0]
            if not final.exists():
                old.rename(final)
        for stale in self.dir.glob(f"{_TMP}*"):
            shutil.rmtree(stale, ignore_errors=True)

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        return sorted(p for p in self.dir.glob(f"{_PREFIX}*") if p.is_dir())

    def latest(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def save(self, learner_state: dict, meta: CheckpointMeta) -> Path:
        """Write one checkpoint atomically; return its final path. Blocking (run it off the event loop).
        A failed write (a full disk) raises `CheckpointError` and leaves the checkpoints before it as they were."""
        final = self.dir / f"{_PREFIX}{meta.version:08d}"
        tmp = self.dir / f"{_TMP}{final.name}-{os.getpid()}"
        try:
            self._write(tmp, learner_state, meta)
        except Exception as exc:  # OSError; torch and safetensors raise their own types for ENOSPC
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                free = f"{shutil.disk_usage(self.dir).free / 2**20:.1f} MiB free there"
            except OSError:
                free = "free space unknown"
            code = exc.errno if isinstance(exc, OSError) and exc.errno else (
                errno.ENOSPC if "No space left" in str(exc) else errno.EIO)
            raise CheckpointError(code, f"checkpoint.dir {self.dir}: writing {final.name} failed ({free}): "
                                  f"{type(exc).__name__}: {exc}"[:1000]) from exc
        if pause := os.environ.get(PAUSE_ENV):
            time.sleep(float(pause))
        if final.exists():  # the same version saved again after a resume: replace it whole
            old = self.dir / f"{_TMP}old-{final.name}-{os.getpid()}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        _fsync_dir(self.dir)
        for path in self.checkpoints()[: -self.cfg.keep_last]:
            shutil.rmtree(path, ignore_errors=True)
        return final

    @staticmethod
    def _write(tmp: Path, learner_state: dict, meta: CheckpointMeta) -> None:
        """Every file of the checkpoint into `tmp`, fsynced."""
        import torch
        from safetensors.torch import save_file

        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        state = dict(learner_state)
        model = state.pop("model", None)
        if model is not None:
            save_file(untie(model), tmp / "model.safetensors")
        with open(tmp / "trainer.pt", "wb") as f:
            sink = _OSErrorKeeper(f)
            try:
                torch.save(state, sink)
            except RuntimeError as exc:  # torch's writer turns a full disk into "unexpected pos 64 vs 0"
                if sink.error is None:
                    raise
                raise sink.error from exc
        (tmp / "intake.msgpack").write_bytes(msgspec.msgpack.encode(meta))
        for f in tmp.iterdir():
            _fsync_file(f)
        _fsync_dir(tmp)

    def load(self, path: Path | None = None) -> Restored | None:
        """Load `path` or the newest checkpoint; None when there is none."""
        import torch
        from safetensors.torch import load_file

        path = path or self.latest()
        if path is None:
            return None
        state = torch.load(path / "trainer.pt", weights_only=True, map_location="cpu")
        if (path / "model.safetensors").exists():
            state["model"] = load_file(path / "model.safetensors")
        meta = msgspec.msgpack.decode((path / "intake.msgpack").read_bytes(), type=CheckpointMeta)
        return Restored(path, state, meta)
