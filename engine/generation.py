"""The generation client agents use: a backend, the model's chat tokenizer, and the engine's bookkeeping.

`Generator.generate(transcript, ...)` streams one generation into a `Transcript` (engine/chat.py): the
exact token ids the server returned, each with its behaviour log-probability and the policy version
that produced it (docs/architecture.md invariants 1 and 2), never re-tokenized. It sizes the request to what the
episode has left (context and token budget), keeps later turns of an episode on the same server
(the session key is the episode id), and counts tokens and finishes for the engine's metrics. It also
carries the engine's `RenderPool` (engine/render_pool.py; None: templates render inline), which agents
pass to `Transcript.create` and `Transcript.add_messages_async`.
"""

from __future__ import annotations

import zlib
from collections import Counter

from tidal.engine.backends.base import Backend, Finish, Request, Sampling
from tidal.engine.chat import ChatTokenizer, Transcript
from tidal.engine.config import SamplingConfig
from tidal.engine.render_pool import RenderPool

__all__ = ["Generator"]


class Generator:
    """Shared by every episode of one engine; `generate` may be awaited from thousands of tasks."""

    def __init__(self, backend: Backend, tokenizer: ChatTokenizer, sampling: SamplingConfig, *,
                 max_context: int, render_pool: RenderPool | None = None):
        self.backend = backend
        self.tokenizer = tokenizer
        self.render_pool = render_pool
        """Worker processes for the chat-template work (model.render_workers); None: inline on the loop."""
        self.sampling = sampling
        self.max_context = max_context
        self.tokens = 0
        """Generated tokens received, all episodes."""
        self.requests = 0
        self.finishes: Counter[str] = Counter()
        self._stop_ids = tuple(tokenizer.eos_token_ids)

    @property
    def sampling_info(self) -> dict:
        """What the acting policy sampled with, recorded on every trajectory (the trainer warns when
        it is restricted: the behaviour log-probs then describe another policy than the one acting)."""
        s = self.sampling
        return {"temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k, "masked": False}

    def room(self, transcript: Transcript) -> int:
        """Tokens a generation may add before the episode's context is full."""
        return self.max_context - len(transcript)

    def _seed(self, key: str) -> int | None:
        """A per-request sampling seed from the base seed and what the request is (env, task seed, member,
        turn), not when or by which engine: the same episode draws the same tokens whatever else runs
        beside it, so sync and async runs compare equal."""
        if self.sampling.seed is None:
            return None
        return (self.sampling.seed + zlib.crc32(key.encode())) % (1 << 31)

    async def generate(self, transcript: Transcript, *, request_id: str, max_new_tokens: int,
                       session_key: str | None = None, seed_key: str | None = None) -> Finish:
        """Generate the next assistant turn onto `transcript`; returns how it finished.

        Raises the backend's `BackendError` when the generation fails after its retries; the tokens
        already appended stay (the caller ends the episode).
        """
        s = self.sampling
        request = Request(
            input_ids=transcript.tokens[:], request_id=request_id, session_key=session_key,
            sampling=Sampling(max_new_tokens=max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                              top_k=s.top_k, stop_token_ids=self._stop_ids, seed=self._seed(seed_key or request_id)),
        )
        self.requests += 1
        finish = None
        async for chunk in self.backend.generate(request):
            if chunk.token_ids:
                transcript.append_generation(chunk.token_ids, chunk.logprobs, chunk.weight_version)
                self.tokens += len(chunk.token_ids)
            if chunk.finish is not None:
                finish = chunk.finish
        if finish is None:  # the backend contract puts a Finish on the last chunk
            finish = Finish(reason="abort")
        self.finishes[finish.reason] += 1
        return finish
