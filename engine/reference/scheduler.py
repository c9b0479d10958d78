"""Continuous batching, pause/continue and aborts: the request lifecycle of SGLang's scheduler (docs/sglang.md §2).

One asyncio task (`Scheduler.run`) owns the batch. Each tick admits waiting sequences up to
`max_running` (the rest queue: that is the back-pressure), asks the `Stepper` for one token per
running sequence in a single call, appends the tokens with the weight version that produced them,
and applies the stop conditions. The same scheduler drives the real model (`runner.py`) and the
cost model (`simulate.py`), so both speak the protocol with identical semantics.

Invariants kept here: a sequence finishes exactly once (its `finish` is set once, then `done` is
set); every token is tagged with the version of the weights that sampled it (`spans`), because the
model lock is held from reading the version to applying the step; a step and a weight update never
overlap (both hold `model_lock`); a sequence's KV is released only when no step is using it (an
abort during a step defers the release until the step returns).
"""

import asyncio
import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from tidal.engine.reference.api import Item, Sampling
from tidal.engine.reference.prefix_cache import PrefixCache
from tidal.protocol.sglang import Abort, FinishReason, Length, Stop

__all__ = ["Seq", "Stepper", "Scheduler", "RWLock", "ABORTED", "ABORTED_WAITING"]

log = logging.getLogger(__name__)

ABORTED = Abort(message="Aborted", status_code=None, err_type=None)
"""finish_reason of a request aborted while running (§1.4)."""
ABORTED_WAITING = Abort(message="Abort in waiting queue")
"""finish_reason of a request aborted before it ever ran (§1.4): only two keys."""


@dataclass(slots=True, eq=False)
class Seq:
    """One generation: its prompt, what it produced so far and how it ended."""

    rid: str
    prompt: list[int]
    sampling: Sampling
    stop_ids: frozenset[int]
    item: Item | None = None
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    output_top: list[list[tuple[float, int]]] | None = None
    input_logprobs: list[float | None] | None = None
    spans: list[list] = field(default_factory=list)
    finish: FinishReason | None = None
    started: bool = False
    num_retractions: int = 0
    cached_tokens: int = 0
    started_prefill: bool = False
    """Prompt tokens whose KV came from the prefix cache at the first prefill."""
    created: float = field(default_factory=time.monotonic)
    kv: Any = None
    """The stepper's per-sequence state (KV cache); None means "needs prefill"."""
    rng: Any = None
    target_len: int = 0
    """Simulated response length (cost model only)."""
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def finished(self) -> bool:
        return self.finish is not None

    @property
    def weight_version(self) -> str | None:
        return self.spans[-1][0] if self.spans else None

    def append(self, token: int, logprob: float, top: list[tuple[float, int]] | None, version: str) -> None:
        n = len(self.output_ids)
        self.output_ids.append(token)
        self.output_logprobs.append(logprob)
        if top is not None:
            if self.output_top is None:
                self.output_top = []
            self.output_top.append(top)
        if self.spans and self.spans[-1][0] == version:
            self.spans[-1][2] = n + 1
        else:
            self.spans.append([version, n, n + 1])


class Stepper(Protocol):
    """What produces tokens: the transformers model runner or the cost-model simulator."""

    vocab_size: int
    eos_token_ids: frozenset[int]
    context_length: int
    cache: PrefixCache | None
    """Prefix cache, if enabled: flushed by /flush_cache and by weight updates that flush."""
    model_type: str | None
    architectures: list[str]

    async def step(self, batch: list[Seq]) -> list[tuple[int, float, list[tuple[float, int]] | None]]:
        """One token per sequence, in batch order: (token id, logprob, top logprobs or None).
        Sequences whose `kv` is None are prefilled first (prompt plus any earlier output)."""

    def release(self, seq: Seq) -> None:
        """Drop the sequence's KV state (finished or retracted)."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...

    def encode(self, text: str) -> list[int]: ...

    def token_text(self, token: int) -> str:
        """One token's text, for `return_text_in_logprobs` and OpenAI `logprobs.tokens`."""


class RWLock:
    """SGLang's generation/update lock (§2): many readers, one writer, writer-preferring, so
    once an update waits, new `/generate` calls wait behind it instead of starving it."""

    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @property
    def writers_waiting(self) -> int:
        return self._writers_waiting

    async def acquire_read(self) -> None:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._writer and not self._writers_waiting)
            self._readers += 1

    async def release_read(self) -> None:
        async with self._cond:
            self._readers -= 1
            self._cond.notify_all()

    async def acquire_write(self) -> None:
        async with self._cond:
            self._writers_waiting += 1
            try:
                await self._cond.wait_for(lambda: not self._writer and not self._readers)
            finally:
                self._writers_waiting -= 1
            self._writer = True

    async def release_write(self) -> None:
        async with self._cond:
            self._writer = False
            self._cond.notify_all()


class Scheduler:
    """Owns every in-flight sequence; see the module docstring for the tick."""

    def __init__(self, stepper: Stepper, *, max_running: int, version: str):
        self.stepper = stepper
        self.max_running = max_running
        self.version = version
        self.model_lock = asyncio.Lock()
        self.gen_lock = RWLock()
        self.paused = False
        self.waiting: collections.deque[Seq] = collections.deque()
        self.running: list[Seq] = []
        self.seqs: dict[str, Seq] = {}
        self._wake = asyncio.Event()
        self._stepping: set[Seq] = set()
        """The batch of the step in flight; its sequences' KV is the model thread's until it returns."""
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        self.steps = 0
        self.tokens_generated = 0
        self.requests_finished = 0
        self.requests_aborted = 0
        self.num_retractions = 0
        self.step_failures = 0

    # --- admission and aborts -------------------------------------------------------------------

    def submit(self, seq: Seq) -> None:
        """Queue a sequence (the caller checked that its rid is free)."""
        self.seqs[seq.rid] = seq
        if seq.sampling.max_new_tokens == 0:
            self._finish(seq, Length(length=0))
            return
        self.waiting.append(seq)
        self._wake.set()

    def abort(self, rid: str | None = None, *, abort_all: bool = False) -> int:
        """Abort in-flight sequences whose rid starts with `rid` (SGLang matches by prefix), or all."""
        victims = [s for r, s in self.seqs.items() if abort_all or (rid is not None and r.startswith(rid))]
        for seq in victims:
            self._finish(seq, ABORTED if seq.started else ABORTED_WAITING)
        self.running = [s for s in self.running if not s.finished]
        if victims:
            self.waiting = collections.deque(s for s in self.waiting if not s.finished)
        return len(victims)

    def cancel(self, seq: Seq) -> None:
        """Abort this one sequence if it has not finished (its client went away)."""
        if not seq.finished:
            self._finish(seq, ABORTED if seq.started else ABORTED_WAITING)
            self.running = [s for s in self.running if not s.finished]
            self.waiting = collections.deque(s for s in self.waiting if not s.finished)

    def _finish(self, seq: Seq, reason: FinishReason) -> None:
        if seq.finished:
            return
        seq.finish = reason
        if isinstance(reason, Abort):
            self.requests_aborted += 1
        self.requests_finished += 1
        if seq not in self._stepping:  # the model thread may be reading its KV: released after the step
            self.stepper.release(seq)
        if self.seqs.get(seq.rid) is seq:
            del self.seqs[seq.rid]
        seq.changed.set()
        seq.done.set()

    # --- pause / continue (§2, §4) --------------------------------------------------------------

    async def pause(self, mode: str) -> None:
        """abort: finish everything in flight as aborted; retract: stop and requeue running
        sequences without their KV (recomputed on continue, or found in the prefix cache if it is
        on and was not flushed); in_place: stop, KV kept."""
        self.paused = True
        async with self.model_lock:
            if mode == "abort":
                self.abort(abort_all=True)
            elif mode == "retract":
                for seq in reversed(self.running):
                    self.stepper.release(seq)
                    seq.kv = None
                    seq.num_retractions += 1
                    self.num_retractions += 1
                    self.waiting.appendleft(seq)
                self.running = []

    def resume(self) -> None:
        self.paused = False
        self._wake.set()

    # --- the tick -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Forever: admit, step every running sequence once, apply tokens and stop conditions."""
        while True:
            while self.paused or not (self.waiting or self.running):
                self._wake.clear()
                await self._wake.wait()
            async with self.model_lock:
                if self.paused:
                    continue
                while self.waiting and len(self.running) < self.max_running:
                    seq = self.waiting.popleft()
                    seq.started = True
                    self.running.append(seq)
                batch = list(self.running)
                version = self.version
                self._stepping = set(batch)
                try:
                    out = await self.stepper.step(batch)
                except Exception as exc:  # a failed step fails its batch, never the server
                    log.exception("generation step over %d sequences failed", len(batch))
                    self.step_failures += 1
                    out = exc
                finally:
                    self._stepping = set()
                for seq in batch:
                    if seq.finished:  # aborted during the step: its KV is free only now
                        self.stepper.release(seq)
                if isinstance(out, Exception):
                    failed = Abort(message=f"generation step failed: {out!r}", status_code=500,
                                   err_type="InternalServerError")
                    for seq in batch:
                        self._finish(seq, failed)
                    self.running = []
                    continue
                self.steps += 1
                self.batch_sizes[len(batch)] += 1
                for seq, (token, logprob, top) in zip(batch, out, strict=True):
                    if seq.finished:
                        continue
                    seq.append(token, logprob, top, version)
                    self.tokens_generated += 1
                    reason = self._stop_reason(seq, token)
                    if reason is not None:
                        self._finish(seq, reason)
                    else:
                        seq.changed.set()
                self.running = [s for s in self.running if not s.finished]

    def _stop_reason(self, seq: Seq, token: int) -> FinishReason | None:
        s = seq.sampling
        n = len(seq.output_ids)
        if n >= s.min_new_tokens and token in seq.stop_ids:
            return Stop(matched=token)
        if s.stop and n >= s.min_new_tokens:
            longest = max(len(x) for x in s.stop)
            tail = self.stepper.decode(seq.output_ids[-(longest + 4):], s.skip_special_tokens)
            for stop in s.stop:
                if stop in tail:
                    return Stop(matched=stop)
        if n >= s.max_new_tokens:
            return Length(length=s.max_new_tokens)
        if len(seq.prompt) + n >= self.stepper.context_length:
            return Length(length=n)
        return None

    def internal_state(self) -> dict:
        """Counters for `/server_info` `internal_states` (tests read batch sizes here, not timings)."""
        return {
            "num_running_reqs": len(self.running),
            "num_waiting_reqs": len(self.waiting),
            "paused": self.paused,
            "num_weight_updates_waiting": self.gen_lock.writers_waiting,
            "max_running_requests": self.max_running,
            "num_decode_steps": self.steps,
            "max_batch_size_seen": max(self.batch_sizes, default=0),
            "batch_size_histogram": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "num_generated_tokens": self.tokens_generated,
            "num_finished_reqs": self.requests_finished,
            "num_aborted_reqs": self.requests_aborted,
            "num_retractions": self.num_retractions,
            "num_step_failures": self.step_failures,
            "weight_version": self.version,
        } | (self.stepper.cache.stats() if self.stepper.cache is not None else {}) | (
            self.stepper.stats() if hasattr(self.stepper, "stats") else {})
