"""One finish-reason vocabulary (`FinishReason`): a backend's generation endings, an env episode's
endings and a trajectory's all come from it, and a trajectory with any other reason is refused."""

import typing

import msgspec
import pytest
from tidal.engine.backends import Finish
from tidal.envs import Episode
from tidal.protocol.errors import ProtocolError
from tidal.protocol.messages import (
    FINISH_REASONS,
    GENERATION_FINISHES,
    Trajectory,
    Turn,
    decode,
    decode_parts,
    decode_trajectory,
    encode,
    encode_parts,
)


def trajectory(**fields) -> Trajectory:
    return Trajectory.build(id="t0", group_id="g0", env_id="e", task_seed=0, tokens=[1, 2, 3],
                            loss_mask=[0, 1, 1], behav_logp=[0, -0.5, -0.25], versions=[-1, 4, 4],
                            turns=[Turn(1, 3, 1.0)], reward=1.0, **fields)


def test_the_vocabulary_covers_generation_and_episode_endings():
    assert FINISH_REASONS == {"stop", "length", "abort", "terminated", "truncated", "max_turns", "max_tokens",
                              "context_length", "env_error", "step_timeout", "backend_error", "drained"}
    assert GENERATION_FINISHES == {"stop", "length", "abort"}


def test_backends_and_envs_speak_it():
    generation = set(typing.get_args(typing.get_type_hints(Finish)["reason"]))
    episode = set(typing.get_args(typing.get_args(typing.get_type_hints(Episode)["finish_reason"])[0]))
    assert generation == GENERATION_FINISHES and episode == FINISH_REASONS


@pytest.mark.parametrize("reason", sorted(FINISH_REASONS))
def test_every_reason_travels(reason):
    t = trajectory(finish_reason=reason)
    assert decode(encode(t)).finish_reason == reason
    assert decode_parts(encode_parts(t)).finish_reason == reason


def test_an_episode_ends_terminated_unless_said_otherwise():
    assert trajectory().finish_reason == "terminated"


def test_a_reason_outside_the_vocabulary_is_refused_naming_it():
    with pytest.raises(ValueError, match="trajectory t0: finish_reason 'timeout' is not a FinishReason"):
        trajectory(finish_reason="timeout")
    good = trajectory(finish_reason="drained")
    frame = encode(good).replace(b"drained", b"drainex")  # same length: only the reason differs
    for decoder in (decode, decode_trajectory):
        with pytest.raises(ProtocolError, match=r"'drainex' - at `\$.finish_reason`"):
            decoder(frame)
    head, *arrays = encode_parts(good)
    with pytest.raises(ProtocolError, match=r"'drainex' - at `\$.finish_reason`"):
        decode_parts([head.replace(b"drained", b"drainex"), *arrays])
    raw = msgspec.msgpack.decode(encode(good))
    assert raw["finish_reason"] == "drained"  # the wire spelling is the name itself
