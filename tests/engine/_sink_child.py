"""An engine process for the sink kill test: `ENDPOINT SPOOL_DIR ENGINE_ID COUNT`.

With COUNT > 0 it puts COUNT trajectories (ids ENGINE_ID-0 ...) in groups of GROUP through a
TrajectorySink, printing `spooled K` once the first K are on disk, then waits to be killed. With
COUNT == 0 it puts nothing: it delivers what an earlier run left in the spool, waits until the
trainer has committed all of it, prints its stats as JSON and exits 0 (1 if flush timed out).
"""

import asyncio
import json
import sys

from tidal.engine.sink import TrajectorySink
from tidal.protocol.messages import Trajectory, Turn

GROUP = 4
WINDOW = 16


def make_trajectory(traj_id: str, n: int = 16) -> Trajectory:
    half = n // 2
    return Trajectory.build(
        id=traj_id, group_id=traj_id.rsplit("-", 1)[0], env_id="test:Echo-v0", task_seed=0,
        tokens=list(range(n)), loss_mask=[0] * half + [1] * (n - half),
        behav_logp=[0.0] * half + [-0.5] * (n - half), versions=[-1] * half + [0] * (n - half),
        turns=[Turn(half, n, 1.0)], reward=1.0, terminated=True,
    )


async def main(endpoint: str, spool_dir: str, engine_id: str, count: int) -> int:
    async with TrajectorySink(endpoint, engine_id, spool_dir, window=WINDOW, max_spool_bytes=64 << 20,
                              segment_bytes=4096, resend_after_s=1.0, heartbeat_s=0.1) as sink:
        if count == 0:
            ok = await sink.flush(timeout=60)
            print(json.dumps(sink.stats()), flush=True)
            return 0 if ok else 1
        for start in range(0, count, GROUP):
            ids = range(start, min(start + GROUP, count))
            await sink.put([make_trajectory(f"{engine_id}-{i}") for i in ids])
            print(f"spooled {ids[-1] + 1}", flush=True)
        await asyncio.Event().wait()  # until SIGKILL
    return 1


if __name__ == "__main__":
    endpoint, spool_dir, engine_id, count = sys.argv[1:]
    sys.exit(asyncio.run(main(endpoint, spool_dir, engine_id, int(count))))
