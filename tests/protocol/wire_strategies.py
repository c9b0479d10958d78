"""Hypothesis strategies for valid wire messages, shared by the round-trip and fuzzing tests."""

import numpy as np
from hypothesis import strategies as st
from tidal.protocol.messages import (
    FINISH_REASONS,
    DiskWeights,
    DistributedWeights,
    Drain,
    Pause,
    Resume,
    Shutdown,
    TrainerStatus,
    Trajectory,
    Turn,
    WeightsPublished,
)

text = st.text(max_size=20)
finite = st.floats(allow_nan=False, allow_infinity=False, width=32)
small_int = st.integers(min_value=0, max_value=2**31 - 1)


sampling = st.fixed_dictionaries({}, optional={
    "temperature": st.floats(0, 2), "top_p": st.floats(0, 1), "top_k": st.integers(-1, 1000), "masked": st.booleans(),
})
"""What an engine records it sampled with (Trajectory.sampling)."""


@st.composite
def trajectories(draw, max_tokens: int = 64) -> Trajectory:
    n = draw(st.integers(0, max_tokens))
    mask = np.array(draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)), dtype=np.uint8)
    logp = np.array(draw(st.lists(st.floats(-30, 0, width=32), min_size=n, max_size=n)), dtype=np.float32)
    versions = np.where(mask == 1, draw(st.integers(0, 1000)) + np.arange(n) % 3, -1)
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=6)))
    turns = [Turn(a, b, draw(finite)) for a, b in zip(cuts[::2], cuts[1::2], strict=False)]
    return Trajectory.build(
        id=draw(text), group_id=draw(text), env_id=draw(text), task_seed=draw(st.integers(-(2**63), 2**63 - 1)),
        tokens=draw(st.lists(st.integers(0, 2**32 - 1), min_size=n, max_size=n)),
        loss_mask=mask, behav_logp=logp, versions=versions, turns=turns,
        reward=sum((t.reward for t in turns), 0.0),  # the final reward is the sum of the turns'
        terminated=draw(st.booleans()), truncated=draw(st.booleans()), finish_reason=draw(st.sampled_from(sorted(FINISH_REASONS))),
        timing=draw(st.dictionaries(text, finite, max_size=3)),
        counters=draw(st.dictionaries(text, small_int, max_size=3)),
        info=draw(st.dictionaries(text, st.one_of(text, small_int, finite, st.booleans()), max_size=3)),
        sampling=draw(sampling),
    )


weights = st.builds(
    WeightsPublished,
    version=small_int,
    source=st.one_of(
        st.builds(DiskWeights, path=text),
        st.builds(
            DistributedWeights, master_address=text, master_port=st.integers(1, 65535), group_name=text,
            world_size=st.integers(1, 64), backend=st.sampled_from(["nccl", "gloo"]),
            names=st.lists(text, max_size=3), dtypes=st.lists(text, max_size=3),
            shapes=st.lists(st.lists(st.integers(0, 4096), max_size=3), max_size=3),
        ),
    ),
    checksum=text, nbytes=small_int, published_at=finite,
)
statuses = st.builds(
    TrainerStatus, version=small_int, consumed=small_int, batch_size=st.integers(1, 4096),
    max_staleness=st.integers(0, 16), health=text,
)
deadline = st.floats(0, 1e6, allow_nan=False)
controls = st.one_of(st.builds(Pause), st.builds(Resume), st.builds(Drain, deadline), st.builds(Shutdown, deadline))
status_messages = st.one_of(weights, statuses, controls)
messages = st.one_of(trajectories(), status_messages)
