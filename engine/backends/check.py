"""`check_backend`: the rules every backend keeps, checked against a live instance.

The engine appends what `generate` yields straight into trajectories, so a backend that repeats a
token, misses a logprob or ends without a `Finish` corrupts training data silently. Run this on a
new backend (the tests run it on every built-in one and on the example plugin):

    async with create_backend(cfg) as backend:
        await check_backend(backend)
"""

from __future__ import annotations

import math

from tidal.engine.backends.base import Backend, Chunk, Request, Sampling

__all__ = ["BackendContractError", "check_backend"]


class BackendContractError(AssertionError):
    """A backend broke one of the interface's rules; the message names the rule and what came."""


def _fail(backend: Backend, rule: str, got) -> None:
    raise BackendContractError(f"{type(backend).__name__}: {rule}; got {got!r}")


def _check_stream(backend: Backend, chunks: list[Chunk], budget: int) -> int:
    """The rules of one finished stream; returns how many tokens it carried."""
    if not chunks or chunks[-1].finish is None:
        _fail(backend, "the last chunk must carry a Finish", chunks[-1:] or "no chunk")
    total = 0
    for i, chunk in enumerate(chunks):
        if chunk.finish is not None and i != len(chunks) - 1:
            _fail(backend, f"only the last chunk may carry a Finish, chunk {i} of {len(chunks)} did", chunk)
        if len(chunk.token_ids) != len(chunk.logprobs):
            _fail(backend, "each token needs exactly one logprob", chunk)
        if not all(isinstance(t, int) and t >= 0 for t in chunk.token_ids):
            _fail(backend, "token ids are non-negative ints", chunk.token_ids)
        if not all(isinstance(lp, float) and math.isfinite(lp) and lp <= 0 for lp in chunk.logprobs):
            _fail(backend, "logprobs are finite floats <= 0", chunk.logprobs)
        version = chunk.weight_version
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            _fail(backend, "weight_version is the policy version, an int >= 0 (0: the initial checkpoint)",
                  version)
        total += len(chunk.token_ids)
    finish = chunks[-1].finish
    if total > budget:
        _fail(backend, f"at most max_new_tokens={budget} tokens", total)
    if finish.completion_tokens != total:
        _fail(backend, f"Finish.completion_tokens counts the {total} tokens yielded", finish.completion_tokens)
    return total


async def check_backend(backend: Backend, prompt: list[int] = (1, 2, 3, 4), max_new_tokens: int = 8) -> None:
    """Generate, then abort a long generation; raise `BackendContractError` on the first broken rule."""
    budget = Request(input_ids=list(prompt), request_id="check-length",
                     sampling=Sampling(max_new_tokens=max_new_tokens, ignore_eos=True))
    chunks = [c async for c in backend.generate(budget)]
    total = _check_stream(backend, chunks, max_new_tokens)
    finish = chunks[-1].finish
    if finish.reason not in ("stop", "length"):
        _fail(backend, "an unaborted generation ends with stop or length", finish.reason)
    if finish.reason == "length" and total != max_new_tokens:
        _fail(backend, f"a length finish means max_new_tokens={max_new_tokens} tokens", total)

    long = Request(input_ids=list(prompt), request_id="check-abort",
                   sampling=Sampling(max_new_tokens=1 << 20, ignore_eos=True))
    chunks = []
    async for chunk in backend.generate(long):
        chunks.append(chunk)
        if len(chunks) == 1 and chunk.finish is None:
            await backend.abort("check-abort")
    _check_stream(backend, chunks, 1 << 20)
    if chunks[-1].finish.reason != "abort":
        _fail(backend, "abort(request_id) ends its stream with finish reason abort", chunks[-1].finish)

    stats = backend.stats()
    if not (isinstance(stats, dict) and all(isinstance(k, str) and isinstance(v, int) for k, v in stats.items())):
        _fail(backend, "stats() maps names to int counters", stats)
