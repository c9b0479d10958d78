"""The backend interface: token ids in, token ids + behaviour logprobs out, streamed (docs/architecture.md invariants 1-2).

A backend turns a `Request` (prompt token ids, sampling, a request id, a session key for affinity) into
an async iterator of `Chunk`s: each carries only the tokens that are new since the previous chunk, their
logprobs and the weight version that produced them; the last one also carries a `Finish` (stop, length
or abort, and counters). The ids are exactly what the server generated (never re-tokenized), the stop
token included, so a trajectory can append them as they come and the trainer sees what was sampled.

Weight versions are ints end to end, as in the trainer's `WeightsPublished.version` and a trajectory's
per-token versions: version k is the policy after k optimizer steps. On SGLang's HTTP API a version is a
string; backends send `str(k)` and read what servers report with
`tidal.protocol.sglang.parse_weight_version`: a digit string is its int, and a server that was never
updated (SGLang's default `"default"`, or `""`) serves version 0, the initial checkpoint the trainer
also starts from (a resumed trainer republishes its weights at start, so servers catch up). Any other
value (a server launched with `--weight-version v7`) is a `BadResponse` naming the server and the
value: launch SGLang without `--weight-version`, or with an integer.

Finish reasons come from the project's one vocabulary, `tidal.protocol.messages.FinishReason`; a
generation ends with one of its first three, `GenerationFinish` (stop, length, abort).

A backend that cannot do something (pause, a distributed weight update) raises `Unsupported`.
Implementations: `tidal.engine.backends.sglang` (default), `tidal.engine.backends.openai`, and any third-party
class registered under the entry-point group `tidal.backends` (see `tidal.engine.backends.registry`).
"""

from __future__ import annotations

import abc
import contextlib
from array import array
from collections.abc import AsyncIterator, Sequence
from typing import ClassVar

import msgspec
from tidal.engine.backends.errors import Unsupported
from tidal.protocol import sglang as wire
from tidal.protocol.messages import GENERATION_FINISHES, GenerationFinish

__all__ = ["Sampling", "Request", "Finish", "Chunk", "Backend"]


class Sampling(msgspec.Struct, frozen=True, kw_only=True):
    """What every backend must honour. `temperature=0` is greedy; `top_k=-1` is the whole vocabulary.
    There is no `n`: n samples are n `Request`s with their own ids (each can be aborted and routed)."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop_token_ids: tuple[int, ...] = ()
    """Ends generation when sampled (in addition to the model's EOS); the token is kept in the output."""
    stop: tuple[str, ...] = ()
    """Stop strings, matched by the server on the detokenized text."""
    seed: int | None = None
    ignore_eos: bool = False
    """Keep generating past EOS until another stop condition (benchmarks and tests want fixed lengths)."""


class Request(msgspec.Struct, kw_only=True):
    """One generation. `request_id` must be unique among in-flight requests and not a prefix of another
    (SGLang aborts by rid prefix); `session_key` (e.g. the trajectory id) keeps later turns on the server
    that holds the prefix in its cache."""

    input_ids: Sequence[int]
    """The prompt: a list, or (from the engine) an `array('I')`, a snapshot of the transcript that the
    cyclic GC never walks, as a list of thousands of ints held by each of thousands of requests would be."""
    sampling: Sampling = Sampling()
    request_id: str
    session_key: str | None = None

    def prompt_with(self, received: Sequence[int]) -> list[int]:
        """`input_ids` then the tokens `received` so far, as a fresh list for one request body (a retry
        resubmits the prompt with what the failed attempt generated)."""
        ids = self.input_ids.tolist() if isinstance(self.input_ids, array) else list(self.input_ids)
        ids += received
        return ids


class Finish(msgspec.Struct, kw_only=True):
    """How a generation ended, on its last chunk.

    `reason`: stop (EOS, a stop token or string: `matched`), length (budget reached) or abort (asked for
    through `abort`): the generation subset of `FinishReason`, checked when a Finish is made. Counters
    cover the whole generation, across any retries on other servers.
    """

    reason: GenerationFinish
    matched: int | str | list[int] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    retries: int = 0
    """Times the request moved to another server (or was resubmitted after a pause abort)."""
    server: str = ""
    """URL of the server that produced the last tokens."""

    def __post_init__(self) -> None:
        if self.reason not in GENERATION_FINISHES:
            raise ValueError(f"Finish.reason {self.reason!r} is not a generation ending "
                             f"({', '.join(sorted(GENERATION_FINISHES))})")


class Chunk(msgspec.Struct, gc=False):
    """New tokens since the previous chunk; `logprobs[i]` is the behaviour logprob of `token_ids[i]`."""

    token_ids: list[int]
    logprobs: list[float]
    weight_version: int
    """The policy version whose weights produced these tokens (0: the initial checkpoint)."""
    finish: Finish | None = None


class Backend(abc.ABC):
    """An inference client. Use as `async with`; `generate` may be called from thousands of tasks."""

    config_type: ClassVar[type[msgspec.Struct]]
    """The Struct `create_backend` validates this backend's options against."""

    @abc.abstractmethod
    def generate(self, request: Request) -> AsyncIterator[Chunk]:
        """Stream the generation; raises a `BackendError` (after any chunks already yielded) on failure."""

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None:
        """End an in-flight request; its stream yields a last chunk with finish reason `abort`."""

    async def start(self) -> None:
        """Open connections and start background work (health checks). Idempotent."""
        return None

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop background work and close connections."""

    async def health(self) -> dict[str, bool]:
        """Server URL -> healthy now."""
        raise Unsupported(f"{type(self).__name__} has no health check")

    async def weight_version(self) -> dict[str, int]:
        """Server URL -> the policy version it serves now (0 if it was never updated)."""
        raise Unsupported(f"{type(self).__name__} does not report weight versions")

    async def pause(self) -> None:
        """Stop generation on every server; in-flight requests finish or wait, per the backend's config."""
        raise Unsupported(f"{type(self).__name__} cannot pause generation")

    async def resume(self) -> None:
        raise Unsupported(f"{type(self).__name__} cannot resume generation")

    async def update_weights_from_disk(self, path: str, version: int) -> dict[str, int]:
        """Load the checkpoint of policy `version` on every server; returns URL -> version served afterwards."""
        raise Unsupported(f"{type(self).__name__} cannot update weights from disk")

    async def init_weights_group(self, master_address: str, master_port: int, *,
                                 group_name: str = wire.WEIGHT_UPDATE_GROUP, backend: str = "gloo",
                                 world_size: int | None = None) -> int:
        """Have every server join a torch.distributed group whose rank 0 is the trainer; returns its
        world size (a `BackendError` before any call if `world_size` is given and the servers bring
        another). The trainer must join concurrently: the servers' calls block until the group forms."""
        raise Unsupported(f"{type(self).__name__} cannot join a weight-update group")

    def distributed_update(self, version: int, calls: int) -> contextlib.AbstractAsyncContextManager[None]:
        """Scope of one distributed update to policy `version` made of `calls` bucket calls
        (`update_weights_from_distributed`, in the trainer's bucket order). The backend's pause policy
        holds over the whole scope, as around a disk update, so no token is generated by a mix of two
        versions' weights; the scope raises a `BackendError` if the update failed. A backend without
        a pause policy updates as its servers do."""
        return contextlib.nullcontext()

    async def update_weights_from_distributed(
        self, names: list[str], dtypes: list[str], shapes: list[list[int]], version: int, *,
        group_name: str = wire.WEIGHT_UPDATE_GROUP, flattened: bool = False,
    ) -> dict[str, int]:
        """Receive one bucket of policy `version`'s tensors, broadcast from rank 0 (in this order,
        concurrently with this call; `flattened`: as one flat tensor). Inside `distributed_update`,
        the last bucket sets the served version and returns URL -> version served; the others return
        {}. A call outside that scope is an update of one bucket."""
        raise Unsupported(f"{type(self).__name__} cannot receive distributed weight updates")

    async def destroy_weights_group(self, group_name: str = wire.WEIGHT_UPDATE_GROUP) -> None:
        raise Unsupported(f"{type(self).__name__} has no weight-update group")

    def serving(self) -> bool | None:
        """Whether any server is in rotation now (None: this backend cannot tell). The engine admits no
        episode while it is False: each would fail at once."""
        return None

    def stats(self) -> dict[str, int]:
        """Counters since start: requests, tokens, retries, errors by kind, ejections..."""
        return {}

    async def __aenter__(self):
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
