"""Checkpoints: a resumed learner takes exactly the step the original would; writes are atomic; keep-last."""

import errno
import time

import msgspec
import pytest
import torch
from tidal.protocol.config import load_config
from tidal.trainer.checkpoint import Checkpointer, CheckpointError, CheckpointMeta
from tidal.trainer.config import CheckpointConfig, TrainerConfig
from tidal.trainer.distributed import World
from tidal.trainer.intake import Intake, IntakeState
from tidal.trainer.learner import Learner

from tests.faults.pipeline import can_unshare
from tests.trainer.producer import Producer


@pytest.fixture(scope="module")
def batches(tiny_model_dir):
    producer = Producer(tiny_model_dir, seed=5, turns=1)
    return [[t for g in range(2) for t in producer.group(f"b{i}g{g}", version=i, size=2)] for i in range(2)]


def learner(tiny_model_dir) -> Learner:
    cfg = load_config(TrainerConfig, overrides=[f"learner.model.path='{tiny_model_dir}'", "learner.model.dtype='float32'",
                                                 "learner.optim.lr=1e-3"])
    return Learner(cfg.learner)


def test_resumed_learner_takes_the_same_step(tmp_path, tiny_model_dir, batches):
    first = learner(tiny_model_dir)
    first.train_step(batches[0])
    ckpt = Checkpointer(CheckpointConfig(dir=str(tmp_path)))
    intake = Intake(load_config(TrainerConfig, overrides=[f"learner.model.path='{tiny_model_dir}'"]).intake)
    for t in batches[1][:3]:
        intake.offer(t, 1)
    meta = CheckpointMeta(version=first.version, saved_at=time.time(), intake=intake.snapshot(), dedup=b"\x90")
    path = ckpt.save(World().full_state(first), meta)  # what the daemon saves: parameter-name keys
    assert path.name == "step-00000001" and {p.name for p in path.iterdir()} == {
        "model.safetensors", "trainer.pt", "intake.msgpack"}
    expected = first.train_step(batches[1])

    second = learner(tiny_model_dir)
    restored = ckpt.load()
    assert set(restored.learner_state["optimizer"]["state"]) == {n for n, _ in first.base_model.named_parameters()}
    World().load_state(second, restored.learner_state)
    assert second.version == 1 and restored.meta.dedup == b"\x90"
    again = Intake(intake.cfg, restored.meta.intake)
    assert again.buffered_ids() == {t.id for t in batches[1][:3]}
    got = second.train_step(batches[1])
    assert got["trainer/loss"] == pytest.approx(expected["trainer/loss"], rel=1e-6, abs=1e-9)
    for (name, a), (_, b) in zip(first.named_weights(), second.named_weights(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_partial_writes_are_never_loaded_and_old_ones_are_pruned(tmp_path):
    ckpt = Checkpointer(CheckpointConfig(dir=str(tmp_path), keep_last=2))
    state = {"model": {"w": torch.ones(3)}, "version": 0}
    for v in range(1, 4):
        ckpt.save({**state, "version": v}, CheckpointMeta(version=v, saved_at=0.0, intake=IntakeState()))
    partial = tmp_path / ".tmp-step-00000009-123"  # a writer killed mid-way leaves this
    partial.mkdir()
    (partial / "trainer.pt").write_bytes(b"truncated")
    assert [p.name for p in ckpt.checkpoints()] == ["step-00000002", "step-00000003"]
    restored = ckpt.load()
    assert restored.meta.version == 3 and restored.learner_state["version"] == 3
    assert torch.equal(restored.learner_state["model"]["w"], torch.ones(3))
    ckpt.discard_partial()
    assert not partial.exists()
    # the same version saved again (after a resume) replaces the old one whole
    ckpt.save({**state, "model": {"w": torch.zeros(3)}, "version": 3},
              CheckpointMeta(version=3, saved_at=1.0, intake=IntakeState(), counters={"steps": 3.0}))
    again = ckpt.load()
    assert torch.equal(again.learner_state["model"]["w"], torch.zeros(3)) and again.meta.counters == {"steps": 3.0}


def test_a_crash_between_the_renames_of_a_replace_puts_the_old_checkpoint_back(tmp_path):
    """Replacing version 3 renames it aside, then the new one in: a kill between the two must not make
    the next start delete the only copy of a checkpoint whose acknowledgements were sent."""
    ckpt = Checkpointer(CheckpointConfig(dir=str(tmp_path), keep_last=2))
    for v in (2, 3):
        ckpt.save({"model": {"w": torch.full((3,), float(v))}, "version": v},
                  CheckpointMeta(version=v, saved_at=0.0, intake=IntakeState()))
    (tmp_path / "step-00000003").rename(tmp_path / ".tmp-old-step-00000003-4242")  # what save() does first
    (tmp_path / ".tmp-step-00000003-4242").mkdir()  # the new one, not renamed in yet
    ckpt.discard_partial()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000002", "step-00000003"]
    assert torch.equal(ckpt.load().learner_state["model"]["w"], torch.full((3,), 3.0))


def test_a_failed_write_raises_checkpoint_error_and_leaves_no_temporary(tmp_path):
    ckpt = Checkpointer(CheckpointConfig(dir=str(tmp_path)))
    ckpt.save({"version": 1}, CheckpointMeta(version=1, saved_at=0.0, intake=IntakeState()))
    with pytest.raises(CheckpointError, match="checkpoint.dir .*step-00000002 failed"):
        ckpt.save({"version": 2, "bad": lambda: 0}, CheckpointMeta(version=2, saved_at=0.0, intake=IntakeState()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001"]


def test_meta_is_plain_msgpack(tmp_path):
    ckpt = Checkpointer(CheckpointConfig(dir=str(tmp_path)))
    path = ckpt.save({"version": 0}, CheckpointMeta(version=0, saved_at=0.0, intake=IntakeState(seen_ids=["a"])))
    raw = msgspec.msgpack.decode((path / "intake.msgpack").read_bytes())
    assert raw["version"] == 0 and raw["intake"]["seen_ids"] == ["a"]


_FULL_DISK_PROBE = r"""
import json, os, sys
import torch
from tidal.trainer.checkpoint import Checkpointer, CheckpointError, CheckpointMeta
from tidal.trainer.config import CheckpointConfig
from tidal.trainer.intake import IntakeState

disk, results = sys.argv[1], []
state = {"model": {"w": torch.ones(20_000)}, "optimizer": {"m": torch.ones(30_000)}, "version": 1}
for filler in range(0, 400_000, 9_000):  # the disk runs out in the safetensors file, in trainer.pt, after
    with open(os.path.join(disk, "filler"), "wb") as f:
        f.write(bytes(os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize - filler))
    try:
        Checkpointer(CheckpointConfig(dir=os.path.join(disk, "ckpt"))).save(
            state, CheckpointMeta(version=1, saved_at=0.0, intake=IntakeState()))
        results.append(None)
    except CheckpointError as exc:
        results.append([exc.errno, str(exc)])
    os.remove(os.path.join(disk, "filler"))
print(json.dumps(results))
"""


@pytest.mark.skipif(not can_unshare(), reason="needs unprivileged user + mount namespaces")
def test_a_full_disk_is_named_as_such_wherever_the_write_runs_out(tmp_path):
    """On a real full tmpfs, at whatever byte of whichever file the space ends, the error is ENOSPC and
    says so: torch's own file writer, given a path, reported only "unexpected pos 64 vs 0"."""
    import json
    import subprocess
    import sys

    disk = tmp_path / "disk"
    disk.mkdir()
    script = 'mount -t tmpfs -o size=1m none "$0" && exec "$@"'
    out = subprocess.run(["unshare", "-rm", "sh", "-c", script, str(disk), sys.executable, "-c", _FULL_DISK_PROBE,
                          str(disk)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout.strip().splitlines()[-1])
    failed = [r for r in results if r is not None]
    assert len(failed) >= 10 and results[-1] is None, results  # it failed at many points, then fit
    for code, message in failed:
        assert code == errno.ENOSPC and "No space left" in message and "checkpoint.dir" in message, message
