"""ZeroMQ channels between engine and trainer (docs/protocol.md).

`trajectories`: engine -> trainer, at-least-once on the wire, exactly once to the consumer, commit-
driven acknowledgements. `status`: trainer -> engines, latest TrainerStatus / WeightsPublished /
control, re-sent at once to a late joiner. Every frame is decoded strictly; rejections are counted.
"""

from tidal.protocol.channels.dedup import DedupState, StreamMark
from tidal.protocol.channels.frames import ChannelStats, Delivery, bind
from tidal.protocol.channels.status import StatusPublisher, StatusStats, StatusSubscriber
from tidal.protocol.channels.trajectories import TrajectoryReceiver, TrajectorySender

__all__ = [
    "TrajectorySender",
    "TrajectoryReceiver",
    "Delivery",
    "DedupState",
    "StreamMark",
    "ChannelStats",
    "StatusPublisher",
    "StatusSubscriber",
    "StatusStats",
    "bind",
]
