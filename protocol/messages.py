"""Engine <-> trainer messages (docs/protocol.md, 'Engine <-> trainer messages').

Every message is a msgspec Struct in one tagged union, encoded as msgpack. Per-token arrays travel as
raw little-endian bytes (`tidal.protocol.arrays`) and decode as zero-copy views into the received frame.
On the trajectory channel a Trajectory travels as parts (`encode_parts`): a msgpack head with every
field but the arrays, then each array as its own frame, sent and received without a copy.
Decoding is strict: anything that is not a well-formed message of the current schema version raises
`ProtocolError` naming the problem, and nothing else escapes `decode`.

Schema evolution (docs/protocol.md): new fields get defaults and go last; changing a field's meaning or type
bumps `SCHEMA_VERSION`, which every message carries and every reader checks.

>>> import numpy as np
>>> t = Trajectory.build(id="e0-1", group_id="g0", env_id="games:GuessTheNumber-v0", task_seed=3,
...     tokens=[1, 2, 3, 4], loss_mask=[0, 0, 1, 1], behav_logp=[0, 0, -0.5, -0.25],
...     versions=[-1, -1, 7, 7], turns=[Turn(2, 4, 1.0)], reward=1.0, terminated=True)
>>> u = decode(encode(t))
>>> u.token_ids().tolist(), u.min_version, u.max_version
([1, 2, 3, 4], 7, 7)
"""

from __future__ import annotations

import math
import operator
from typing import Literal, get_args

import msgspec
import numpy as np
from tidal.protocol.arrays import LOGP_DTYPE, MASK_DTYPE, TOKEN_DTYPE, VERSION_DTYPE, view
from tidal.protocol.errors import ProtocolError

__all__ = [
    "SCHEMA_VERSION",
    "NO_VERSION",
    "FinishReason",
    "GenerationFinish",
    "FINISH_REASONS",
    "GENERATION_FINISHES",
    "Turn",
    "Trajectory",
    "DiskWeights",
    "DistributedWeights",
    "WeightsPublished",
    "TrainerStatus",
    "Pause",
    "Resume",
    "Drain",
    "Shutdown",
    "Message",
    "Control",
    "StatusMessage",
    "encode",
    "encode_into",
    "encode_parts",
    "decode",
    "decode_trajectory",
    "decode_parts",
    "ARRAY_FIELDS",
    "PACKED_FIELDS",
    "decode_status",
]

SCHEMA_VERSION = 1
"""Bumped on any change that is not an append of a defaulted field."""

NO_VERSION = -1
"""Policy version of tokens no policy produced: the prompt and environment observations."""

FinishReason = Literal[
    "stop", "length", "abort",
    "terminated", "truncated", "max_turns", "max_tokens", "context_length",
    "env_error", "step_timeout", "backend_error", "drained",
]
"""Why a generation or an episode ended: one vocabulary for backends, envs and trajectories.

Generation endings (a backend's `Finish.reason`, `GenerationFinish`):
  stop            the model ended its turn: EOS, a stop token or a stop string
  length          the generation reached its max_new_tokens
  abort           the generation was aborted on request
Episode endings (`Trajectory.finish_reason`, `tidal.envs.Episode.finish_reason`):
  terminated      the env ended the task (success or failure)
  truncated       the env cut the episode short (its own time limit)
  max_turns       the engine's turn limit, or the horizon schedule's current limit
  max_tokens      the episode's token budget is spent
  context_length  the model's context is full: no room for another turn
  env_error       the env raised (the error is recorded with the episode)
  step_timeout    an env step ran past its time budget
  backend_error   generation failed after the backend's retries
  drained         the engine stopped the episode while draining (shutdown or a drain command)
A generation ending can also end an episode (e.g. `length` on a single-turn task).
"""

GenerationFinish = Literal["stop", "length", "abort"]
"""The endings a backend reports for one generation (`FinishReason`'s first three)."""

FINISH_REASONS: frozenset[str] = frozenset(get_args(FinishReason))
GENERATION_FINISHES: frozenset[str] = frozenset(get_args(GenerationFinish))

PACKED_FIELDS = ("tokens", "behav_logp", "versions", "loss_mask")
"""The arrays' order in `Trajectory.build`'s one buffer (and on the trajectory channel, in one frame):
the 4-byte arrays first, so that each starts 4-byte aligned."""


def _check_schema(name: str, got: int) -> None:
    if got != SCHEMA_VERSION:
        raise ValueError(f"{name}: schema_version {got} is not supported (expected {SCHEMA_VERSION})")


class Turn(msgspec.Struct, array_like=True, frozen=True):
    """One agent turn: the generated span [start, end) of the token sequence and its reward.

    The reward belongs to the turn's last generated token (end - 1), never to an observation token.
    """

    start: int
    end: int
    reward: float = 0.0


_min, _max = np.minimum.reduce, np.maximum.reduce
"""Reductions without ndarray.min/max's Python wrapper: per-call overhead matters at 4k tokens."""

def _generated_version_span(versions: np.ndarray, mask: np.ndarray) -> tuple[int, int]:
    """(min, max) policy version over tokens with mask 1, (NO_VERSION, NO_VERSION) if none; lo < 0
    if one of them has a negative version. This runs on every received trajectory: gathering the
    generated tokens' versions once and reducing that (in cache) costs less than two masked
    reductions over the whole array."""
    generated = versions[mask.view(np.bool_)]  # the caller has checked that mask holds only 0 and 1
    if not generated.size:
        return NO_VERSION, NO_VERSION
    lo, hi = int(_min(generated)), int(_max(generated))
    if lo < 0:
        return -2, 0  # a generated token at a negative version
    return lo, hi


REWARD_TOLERANCE = 1e-5
"""Relative tolerance of `Trajectory.reward` against the sum of its turn rewards (float rounding)."""


def _check_sampling(traj_id: str, sampling: dict) -> None:
    for key, value in sampling.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"trajectory {traj_id}: sampling {key} = {value} is not finite")
    if sampling.get("temperature", 1.0) < 0:
        raise ValueError(f"trajectory {traj_id}: sampling temperature {sampling['temperature']} is negative")


class Trajectory(msgspec.Struct, tag="trajectory", kw_only=True, gc=False):
    """One finished episode as a single token sequence (docs/architecture.md invariants 1 and 2).

    Arrays (all of length n = number of tokens):
      tokens      uint32  the exact ids: prompt, then per turn model tokens and observation tokens
      loss_mask   uint8   1 on model-generated tokens, 0 on prompt and observation tokens
      behav_logp  float32 behaviour log-probability mu of each generated token (0 where mask is 0)
      versions    int32   policy version that generated each token (-1 where mask is 0)

    One reward: `reward`, the final reward, is the sum of the turns' rewards (`Turn.reward`), so every
    advantage estimator reads the same signal (GRPO/RLOO the final reward, ReBN/REINFORCE++/GAE the
    turns'). An outcome-only env gives its score to the last turn. Checked on build and decode within
    1e-5 * max(1, |reward|); a trajectory without turns has reward 0.
    """

    id: str
    group_id: str
    env_id: str
    task_seed: int
    tokens: memoryview
    loss_mask: memoryview
    behav_logp: memoryview
    versions: memoryview
    turns: list[Turn]
    reward: float
    terminated: bool = False
    truncated: bool = False
    finish_reason: FinishReason = "terminated"
    """Why the episode ended; decoding any value outside `FinishReason` is a ProtocolError."""
    min_version: int = NO_VERSION
    max_version: int = NO_VERSION
    timing: dict[str, float] = {}
    counters: dict[str, int] = {}
    info: dict[str, str | int | float | bool] = {}
    schema_version: int = SCHEMA_VERSION
    sampling: dict[str, float | int | bool] = {}
    """What the engine sampled with: `temperature`, `top_p`, `top_k` (-1 or 0: off), `min_p`, the
    penalties (`repetition_penalty`, `frequency_penalty`, `presence_penalty`) and `masked` (True when a
    logit mask or an allowed-token list restricted a draw); {} if the engine did not record them.
    behav_logp is the full-vocabulary log_softmax(logits / temperature), before any restriction, so
    the trainer applies the temperature and warns about the rest (tidal.trainer.sampling)."""

    def __post_init__(self) -> None:
        _check_schema("trajectory", self.schema_version)
        if self.finish_reason not in FINISH_REASONS:  # decoding checks it too; this catches a bad build()
            raise ValueError(f"trajectory {self.id}: finish_reason {self.finish_reason!r} is not a FinishReason")
        # msgspec's decoded memoryviews report the whole frame as their shape (nbytes is right):
        # re-cast each to a plain byte view so len() and slicing mean what they say.
        self.tokens = memoryview(self.tokens).cast("B")
        self.loss_mask = memoryview(self.loss_mask).cast("B")
        self.behav_logp = memoryview(self.behav_logp).cast("B")
        self.versions = memoryview(self.versions).cast("B")
        nbytes = len(self.tokens)
        if nbytes % TOKEN_DTYPE.itemsize:
            raise ValueError(f"trajectory {self.id}: tokens is {nbytes} bytes, not a multiple of 4")
        n = nbytes // TOKEN_DTYPE.itemsize
        for field, dtype in (("loss_mask", MASK_DTYPE), ("behav_logp", LOGP_DTYPE), ("versions", VERSION_DTYPE)):
            got = len(getattr(self, field))
            if got != n * dtype.itemsize:
                raise ValueError(
                    f"trajectory {self.id}: {field} is {got} bytes, expected {n * dtype.itemsize} for {n} tokens"
                )
        mask = view(self.loss_mask, MASK_DTYPE)
        if n and _max(mask) > 1:
            raise ValueError(f"trajectory {self.id}: loss_mask holds values other than 0 and 1")
        logp = view(self.behav_logp, LOGP_DTYPE)
        if n and not (_min(logp) > -np.inf and _max(logp) <= 1e-3):  # NaN fails both comparisons
            raise ValueError(f"trajectory {self.id}: behav_logp must be finite log-probabilities <= 0")
        prev_end, turn_sum = 0, 0.0
        for i, turn in enumerate(self.turns):
            if not (prev_end <= turn.start <= turn.end <= n):
                raise ValueError(
                    f"trajectory {self.id}: turn {i} span [{turn.start}, {turn.end}) is out of order or "
                    f"outside the {n} tokens"
                )
            if not math.isfinite(turn.reward):
                raise ValueError(f"trajectory {self.id}: turn {i} reward {turn.reward} is not finite")
            prev_end = turn.end
            turn_sum += turn.reward
        if not math.isfinite(self.reward):
            raise ValueError(f"trajectory {self.id}: reward {self.reward} is not finite")
        if not abs(self.reward - turn_sum) <= REWARD_TOLERANCE * max(1.0, abs(self.reward)):
            raise ValueError(
                f"trajectory {self.id}: reward {self.reward} is not the sum of its {len(self.turns)} turn rewards "
                f"({turn_sum}); the final reward must equal the sum of Turn.reward (0 without turns)"
            )
        if self.sampling:
            _check_sampling(self.id, self.sampling)
        lo, hi = _generated_version_span(view(self.versions, VERSION_DTYPE), mask)
        if lo < 0 and hi != NO_VERSION:
            raise ValueError(f"trajectory {self.id}: a generated token has a negative policy version")
        if (self.min_version, self.max_version) != (lo, hi):
            raise ValueError(
                f"trajectory {self.id}: min_version/max_version are {self.min_version}/{self.max_version}, "
                f"but the generated tokens' versions span {lo}/{hi}"
            )

    @classmethod
    def build(cls, *, tokens, loss_mask, behav_logp, versions, **fields) -> Trajectory:
        """Make a trajectory from sequences or arrays; min/max version are derived from `versions`.

        The arrays are copied into one read-only buffer, laid out in PACKED_FIELDS order: the
        trajectory channel then sends them as one frame, from that buffer, without a copy.
        """
        v = np.asarray(versions, dtype=VERSION_DTYPE)
        m = np.asarray(loss_mask, dtype=MASK_DTYPE)
        gen = v[m.astype(bool)]
        fields.setdefault("min_version", int(gen.min()) if gen.size else NO_VERSION)
        fields.setdefault("max_version", int(gen.max()) if gen.size else NO_VERSION)
        given = {"tokens": (tokens, TOKEN_DTYPE), "behav_logp": (behav_logp, LOGP_DTYPE),
                 "versions": (v, VERSION_DTYPE), "loss_mask": (m, MASK_DTYPE)}
        parts = [np.ascontiguousarray(given[name][0], given[name][1]).reshape(-1).view(np.uint8)
                 for name in PACKED_FIELDS]
        packed = np.concatenate(parts)
        packed.flags.writeable = False
        whole, offset, arrays = memoryview(packed), 0, {}
        for name, part in zip(PACKED_FIELDS, parts, strict=True):
            arrays[name] = whole[offset : offset + part.size]
            offset += part.size
        return cls(**arrays, **fields)

    def __len__(self) -> int:
        return len(self.tokens) // TOKEN_DTYPE.itemsize

    def token_ids(self) -> np.ndarray:
        return view(self.tokens, TOKEN_DTYPE)

    def mask(self) -> np.ndarray:
        return view(self.loss_mask, MASK_DTYPE)

    def behav_logps(self) -> np.ndarray:
        return view(self.behav_logp, LOGP_DTYPE)

    def token_versions(self) -> np.ndarray:
        return view(self.versions, VERSION_DTYPE)

    def staleness(self, trained_version: int) -> int:
        """docs/architecture.md invariant 3: the version being trained minus that of the oldest generated token."""
        return trained_version - self.min_version if self.min_version >= 0 else 0


class DiskWeights(msgspec.Struct, tag="disk", frozen=True):
    """Weights written as safetensors under `path` (a directory loadable by from_pretrained)."""

    path: str


class DistributedWeights(msgspec.Struct, tag="distributed", frozen=True):
    """Weights broadcast over a torch.distributed group, as SGLang's update_weights_from_distributed.

    `names`, `dtypes` and `shapes` list the tensors in broadcast order (rank 0 is the trainer). The
    trainer sends the notice with `pending` true before it broadcasts; the engine then has its
    servers join the group (if they are not in this one) and receive, bucket by bucket, under its
    pause policy. Once the broadcast is over (done or failed) the trainer sends it again with
    `pending` false.
    """

    master_address: str
    master_port: int
    group_name: str
    world_size: int
    backend: str
    names: list[str]
    dtypes: list[str]
    shapes: list[list[int]]
    buckets: list[int] = []
    """Tensors per broadcast bucket, in broadcast order (they sum to len(names)); each bucket is one
    /update_weights_from_distributed call on every server. Empty: one bucket of every tensor."""
    flatten: bool = False
    """Each bucket is broadcast as one flat tensor (SGLang's load_format "flattened_bucket")."""
    group_id: str = ""
    """Which formation of the group this is: the trainer draws a new id whenever it forms the group
    (its first broadcast, after a failed one, after a restart), so servers that are in a group of the
    same address, port and name but another id join again."""
    pending: bool = False
    """True while the trainer waits for the servers to receive this version; false once the broadcast
    is over. Only a pending notice is acted on, so an engine that subscribes later (the channel
    re-sends the latest notice) never joins a broadcast that is gone."""


class WeightsPublished(msgspec.Struct, tag="weights", kw_only=True, frozen=True):
    """The trainer has weights for `version` ready to fetch by `source`."""

    version: int
    source: DiskWeights | DistributedWeights
    checksum: str = ""
    nbytes: int = 0
    published_at: float = 0.0
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        _check_schema("weights", self.schema_version)
        if self.version < 0:
            raise ValueError(f"weights: version {self.version} is negative")


class TrainerStatus(msgspec.Struct, tag="status", kw_only=True, frozen=True):
    """What engines need for staleness control (docs/architecture.md invariant 3): admission allows at most
    (version + 1 + max_staleness) * batch_size + dropped started trajectories."""

    version: int
    consumed: int
    dropped: int = 0
    """Trajectories the trainer took but will never train on (rejected at intake, dropped as stale,
    dead-lettered by a failed step). They advance no version, so admission adds them back: without
    that, every drop would shrink the engine's budget for good, and enough of them stall training."""
    batch_size: int = 1
    max_staleness: int = 0
    health: str = "ok"
    schema_version: int = SCHEMA_VERSION
    grants: dict[str, int] = {}
    """Episodes each engine incarnation (`tidal.protocol.grants.grant_key`) may have started: the budget
    below shared among engines. An engine absent from it starts nothing until it is granted."""
    max_uncommitted: int = 0
    """Deliveries the trainer lets wait unacknowledged before it checkpoints to acknowledge them (its
    intake.max_uncommitted; 0: unknown). Engines' send windows must together hold that many, or they
    stall waiting for acknowledgements the trainer never has reason to send."""

    @property
    def budget(self) -> int:
        """Episodes all engines together may have started (docs/architecture.md invariant 3)."""
        return (self.version + 1 + self.max_staleness) * self.batch_size + self.dropped

    def __post_init__(self) -> None:
        _check_schema("status", self.schema_version)
        if min(self.version, self.consumed, self.dropped, self.max_staleness) < 0 or self.batch_size < 1:
            raise ValueError(
                f"status: version {self.version}, consumed {self.consumed}, dropped {self.dropped}, "
                f"batch_size {self.batch_size} and max_staleness {self.max_staleness} must be >= 0 "
                "(batch_size >= 1)"
            )


class Pause(msgspec.Struct, tag="pause", frozen=True):
    """Stop admitting new rollouts; in-flight ones continue."""

    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        _check_schema("pause", self.schema_version)


class Resume(msgspec.Struct, tag="resume", frozen=True):
    """Admit rollouts again."""

    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        _check_schema("resume", self.schema_version)


class Drain(msgspec.Struct, tag="drain", frozen=True):
    """Stop admitting, finish or spool in-flight work within `deadline_s`, flush, then idle."""

    deadline_s: float = 30.0
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        _check_deadline("drain", self.deadline_s, self.schema_version)


class Shutdown(msgspec.Struct, tag="shutdown", frozen=True):
    """Drain, then exit."""

    deadline_s: float = 30.0
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        _check_deadline("shutdown", self.deadline_s, self.schema_version)


def _check_deadline(name: str, deadline_s: float, schema_version: int) -> None:
    _check_schema(name, schema_version)
    if not (math.isfinite(deadline_s) and deadline_s >= 0):
        raise ValueError(f"{name}: deadline_s {deadline_s} must be a finite number of seconds >= 0")


Control = Pause | Resume | Drain | Shutdown
Message = Trajectory | WeightsPublished | TrainerStatus | Pause | Resume | Drain | Shutdown
StatusMessage = TrainerStatus | WeightsPublished | Pause | Resume | Drain | Shutdown
"""What rides the status channel, trainer -> engines."""

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)
_trajectory_decoder = msgspec.msgpack.Decoder(Trajectory)
_status_decoder = msgspec.msgpack.Decoder(StatusMessage)

ARRAY_FIELDS = ("tokens", "loss_mask", "behav_logp", "versions")
"""The per-token arrays of a Trajectory, in the order `encode_parts` sends them."""


def _head_field(f: msgspec.structs.FieldInfo) -> tuple:
    if f.default is not msgspec.NODEFAULT:
        return f.name, f.type, f.default
    if f.default_factory is not msgspec.NODEFAULT:
        return f.name, f.type, msgspec.field(default_factory=f.default_factory)
    return f.name, f.type


_Head = msgspec.defstruct(
    "TrajectoryHead",
    [_head_field(f) for f in msgspec.structs.fields(Trajectory) if f.name not in ARRAY_FIELDS],
    tag="trajectory",
    gc=False,
)
"""A Trajectory without its arrays: typed on decode, validated with the arrays in `decode_parts`."""
_HEAD_FIELDS = _Head.__struct_fields__
_head_values = operator.attrgetter(*_HEAD_FIELDS)
"""A trajectory's head fields in `_Head`'s order, in one C call (built positionally on every send)."""
_head_decoder = msgspec.msgpack.Decoder(_Head)


def encode(msg: Message) -> bytes:
    """msgpack bytes of one message (reuses one encoder)."""
    return _encoder.encode(msg)


def encode_into(msg: Message, buf: bytearray, offset: int = 0) -> None:
    """Encode into a reusable buffer, avoiding an allocation per message on hot paths."""
    _encoder.encode_into(msg, buf, offset)


def _decode(decoder: msgspec.msgpack.Decoder, what: str, frame):
    try:
        return decoder.decode(frame)
    except msgspec.DecodeError as exc:  # ValidationError is a subclass
        raise ProtocolError(f"bad {what} frame ({len(frame)} bytes): {exc}") from None
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        raise ProtocolError(f"bad {what} frame: {type(exc).__name__}: {exc}") from None


def encode_parts(traj: Trajectory) -> list:
    """The trajectory as 5 frames: its msgpack head, then the arrays' own buffers (no copy).

    For a multipart send (ZeroMQ sends the arrays from where they lie): `decode_parts` inverts it.
    """
    head = _Head(*_head_values(traj))
    return [_encoder.encode(head), traj.tokens, traj.loss_mask, traj.behav_logp, traj.versions]


def decode_parts(parts: list) -> Trajectory:
    """A Trajectory from the 5 frames of `encode_parts`, its arrays views into them, validated as
    strictly as `decode_trajectory`. Raises ProtocolError on anything malformed."""
    if len(parts) != 1 + len(ARRAY_FIELDS):
        raise ProtocolError(f"bad trajectory: expected a head and {len(ARRAY_FIELDS)} arrays, got {len(parts)} parts")
    head = _decode(_head_decoder, "trajectory head", parts[0])
    tokens, loss_mask, behav_logp, versions = parts[1:]
    try:
        return Trajectory(
            tokens=tokens, loss_mask=loss_mask, behav_logp=behav_logp, versions=versions,
            **msgspec.structs.asdict(head),
        )
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"bad trajectory: {exc}") from None


def decode(frame) -> Message:
    """Decode one frame (bytes, memoryview or zmq buffer). Raises ProtocolError on anything malformed.

    Array fields are views into `frame`: keep the frame alive as long as the arrays are used.
    """
    return _decode(_decoder, "message", frame)


def decode_trajectory(frame) -> Trajectory:
    """Decode a frame that must hold a Trajectory (the payload of the trajectory channel)."""
    return _decode(_trajectory_decoder, "trajectory", frame)


def decode_status(frame) -> StatusMessage:
    """Decode a frame of the status channel: TrainerStatus, WeightsPublished or a control message."""
    return _decode(_status_decoder, "status", frame)
