"""Child processes for the kill/restart test: `engine ENDPOINT ENGINE_ID COUNT` and `trainer ENDPOINT DIR`.

The trainer is a checkpointing consumer: every batch of deliveries is written, together with
`dedup_state(including=batch)`, to one file made atomic by rename, and only then committed. So a
SIGKILL at any instant leaves either the whole batch durable (and acknowledged or about to be) or none
of it (and the engines still hold it).
"""

import asyncio
import json
import os
import sys
from pathlib import Path

import msgspec
from tidal.protocol.channels import DedupState, TrajectoryReceiver, TrajectorySender
from tidal.protocol.messages import Trajectory, Turn

BATCH = 50


def make_trajectory(traj_id: str, n: int = 16) -> Trajectory:
    half = n // 2
    return Trajectory.build(
        id=traj_id, group_id="g", env_id="test:Echo-v0", task_seed=0,
        tokens=list(range(n)), loss_mask=[0] * half + [1] * (n - half),
        behav_logp=[0.0] * half + [-0.5] * (n - half), versions=[-1] * half + [0] * (n - half),
        turns=[Turn(half, n, 1.0)], reward=1.0, terminated=True,
    )


async def engine(endpoint: str, engine_id: str, count: int) -> int:
    async with TrajectorySender(endpoint, engine_id, window=128, resend_after_s=1.0, heartbeat_s=0.1) as tx:
        for i in range(count):
            await tx.send(make_trajectory(f"{engine_id}-{i}"))
        ok = await tx.flush(timeout=90)
        print(json.dumps(msgspec.to_builtins(tx.stats)), flush=True)
    return 0 if ok else 1


def load_checkpoint(state_dir: Path) -> tuple[DedupState | None, int]:
    batches = sorted(state_dir.glob("batch-*.json"))
    if not batches:
        return None, 0
    last = json.loads(batches[-1].read_text())
    return msgspec.convert(last["state"], DedupState), int(batches[-1].stem.split("-")[1]) + 1


async def trainer(endpoint: str, state_dir: Path) -> int:
    state, next_batch = load_checkpoint(state_dir)
    async with TrajectoryReceiver(endpoint, capacity=512, dedup_state=state) as rx:
        print("ready", flush=True)
        batch = []
        while True:
            try:
                async with asyncio.timeout(0.05 if batch else None):
                    batch.append(await rx.recv())
            except TimeoutError:
                pass
            if len(batch) >= BATCH or (batch and rx.queued == 0):
                record = {"ids": [d.traj.id for d in batch], "state": msgspec.to_builtins(rx.dedup_state(batch))}
                tmp = state_dir / f"tmp-{next_batch:06d}"
                tmp.write_text(json.dumps(record))
                os.replace(tmp, state_dir / f"batch-{next_batch:06d}.json")
                rx.commit(batch)
                next_batch += 1
                batch = []


def main(argv: list[str]) -> int:
    if argv[0] == "engine":
        return asyncio.run(engine(argv[1], argv[2], int(argv[3])))
    return asyncio.run(trainer(argv[1], Path(argv[2])))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
