"""`tidal serve --simulate`: the SGLang protocol on a continuous-batching cost model, no model.

The load generator for engine benchmarks. It plugs into the same `Scheduler` as the real model
(one asyncio tick advances every running sequence by one token), so thousands of concurrent
streams cost one sleep per decode step, not one per token per request. A step over a running
batch of B sequences, P of them being prefilled with L_p context tokens each not found in the
prefix cache (prefix_cache.py: what earlier requests left behind), takes

    step_s = step_base_s + step_per_seq_s * B + prefill_per_token_s * sum(L_p)

of simulated GPU time. The GPU starts step k+1 when step k ends (SGLang's overlap scheduler), so
the server's own CPU work hides under the step unless it is longer. Sequences beyond
`max_running` queue. A response ends with EOS after a length drawn from a lognormal (long tail),
or runs to `max_new_tokens` when that is shorter, when `ignore_eos` is set, or when
`lengths = "max_new_tokens"`. Token ids are uniform over the non-special vocabulary; logprobs are
plausible negative floats (-Exp(mean 0.7)).

Defaults are the order of an H100 SXM serving a 7B dense model in bf16 (e.g. Qwen2.5-7B):
- step_base_s 7 ms: a decode step must read the 15 GB of weights at ~3.35 TB/s HBM3 (>= 4.5 ms)
  plus kernel launch and sampling overhead; SGLang's published single-stream decode for 7-8B
  models on one H100 is about 140-160 tokens/s.
- step_per_seq_s 50 us: with KV reads growing per sequence (~1-2k context, GQA), SGLang serves a
  7-8B model at roughly 10-15k output tokens/s with ~250 running requests, i.e. ~20 ms per step.
- prefill_per_token_s 30 us: 2 x 7.6e9 FLOP per token at ~50% of the 989 dense bf16 TFLOP/s.
- max_running 256: what the KV pool left after weights (~60 GB) holds at a few thousand tokens
  per sequence with GQA; beyond it requests queue.
- length_median 400, length_sigma 1.0: agentic/RL turn lengths are long-tailed (a few tokens to
  thousands); median ~400 with the 90th percentile ~1.5k.
`fast = true` sets every cost to zero: the server then emits as fast as it can, for measuring a
client's own overhead.
"""

import asyncio
import math
import time
from typing import Annotated, Literal

import numpy as np
from msgspec import Meta
from tidal.engine.reference.prefix_cache import PrefixCache
from tidal.engine.reference.scheduler import Seq
from tidal.protocol.config import Strict

__all__ = ["SimulateConfig", "Simulator"]

_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ."
_IDLE_SLACK_S = 0.05
"""A gap between steps longer than the step plus this is an idle GPU, not CPU work to overlap."""


class SimulateConfig(Strict):
    """The cost model of `tidal serve --simulate` (defaults: H100 + 7B, see simulate.py)."""

    step_base_s: Annotated[float, Meta(ge=0)] = 7e-3
    """Fixed time of one decode step (weights read once per step), seconds."""
    step_per_seq_s: Annotated[float, Meta(ge=0)] = 5e-5
    """Added decode-step time per running sequence, seconds."""
    prefill_per_token_s: Annotated[float, Meta(ge=0)] = 3e-5
    """Prefill time per context token, seconds."""
    max_running: Annotated[int, Meta(ge=1)] = 256
    """Most sequences in one batch; further requests queue."""
    lengths: Literal["lognormal", "max_new_tokens"] = "lognormal"
    """Where response lengths come from: a lognormal draw (capped by max_new_tokens) or max_new_tokens."""
    length_median: Annotated[float, Meta(gt=0)] = 400.0
    """Median of the lognormal response length, tokens."""
    length_sigma: Annotated[float, Meta(ge=0)] = 1.0
    """Sigma of log(length): the tail's weight."""
    vocab_size: Annotated[int, Meta(ge=512)] = 152064
    """Token ids are drawn below this (Qwen2.5-7B's vocabulary size)."""
    eos_token_id: Annotated[int, Meta(ge=0, lt=256)] = 2
    """The id that ends a response; ids below 256 are special and never drawn."""
    context_length: Annotated[int, Meta(ge=1)] = 32768
    """Prompt + output limit; beyond it a request finishes with `length`."""
    prefix_cache_tokens: Annotated[int, Meta(ge=0)] = 1_000_000
    """KV pool for cached prefixes, tokens (0 = no prefix cache). ~60 GB of KV at ~57 kB per token
    (Qwen2.5-7B: 28 layers x 4 KV heads x 128 dims x 2 x bf16) holds about a million tokens."""
    fast: bool = False
    """Zero every cost: emit as fast as the server can (client-overhead benchmarks)."""
    seed: int = 0
    """Seed of token, logprob and length draws."""


class Simulator:
    """Implements the scheduler's `Stepper` with the cost model instead of a forward pass."""

    def __init__(self, cfg: SimulateConfig):
        self.cfg = cfg
        self.vocab_size = cfg.vocab_size
        self.context_length = cfg.context_length
        self.eos_token_ids = frozenset([cfg.eos_token_id])
        self.model_type = "simulated"
        self.prefix_stable_decode = True
        """decode(a + b) == decode(a) + decode(b): one character per token."""
        self.architectures = ["SimulatedForCausalLM"]
        self._rng = np.random.default_rng(cfg.seed)
        self.cache = PrefixCache(cfg.prefix_cache_tokens) if cfg.prefix_cache_tokens else None
        self._gpu_free_at = 0.0
        self.busy_s = 0.0
        """Simulated GPU seconds spent in steps so far (utilisation = its growth / wall time)."""

    def step_cost(self, batch_size: int, prefill_tokens: int) -> float:
        """Simulated GPU seconds of one step (the formula in the module docstring)."""
        if self.cfg.fast:
            return 0.0
        c = self.cfg
        return c.step_base_s + c.step_per_seq_s * batch_size + c.prefill_per_token_s * prefill_tokens

    def _target_len(self, seq: Seq) -> int:
        cap = seq.sampling.max_new_tokens
        if seq.sampling.ignore_eos or self.cfg.lengths == "max_new_tokens":
            return cap + 1
        draw = self._rng.lognormal(math.log(self.cfg.length_median), self.cfg.length_sigma)
        return max(1, int(math.ceil(draw)))

    async def step(self, batch: list[Seq]):
        prefill_tokens = 0
        for seq in batch:
            if seq.kv is None:
                seq.kv = True
                context = seq.prompt + seq.output_ids
                cached = self.cache.match(context[:-1])[0] if self.cache is not None else 0
                if not seq.started_prefill:
                    seq.cached_tokens = cached
                    seq.started_prefill = True
                prefill_tokens += len(context) - cached
            if not seq.target_len:
                seq.target_len = max(seq.sampling.min_new_tokens, self._target_len(seq))
        cost = self.step_cost(len(batch), prefill_tokens)
        self.busy_s += cost
        now = time.monotonic()
        if now - self._gpu_free_at > cost + _IDLE_SLACK_S:
            self._gpu_free_at = now + cost  # the GPU was idle: this step starts now
        else:
            self._gpu_free_at = max(self._gpu_free_at + cost, now)  # it began when the last one ended
        await asyncio.sleep(max(0.0, self._gpu_free_at - now))
        n = len(batch)
        tokens = self._rng.integers(256, self.vocab_size, n).tolist()
        logprobs = (-self._rng.exponential(0.7, n)).tolist()
        out = []
        for seq, tok, lp in zip(batch, tokens, logprobs, strict=True):
            if len(seq.output_ids) + 1 >= seq.target_len:
                tok = self.cfg.eos_token_id
            top = None
            if seq.item is not None and seq.item.return_logprob and seq.item.top_logprobs_num:
                k = seq.item.top_logprobs_num
                top = [(lp, tok)] + [(lp - 1.0 - j, 256 + j) for j in range(k - 1)]
            out.append((tok, lp, top))
        return out

    def stats(self) -> dict:
        return {"sim_gpu_busy_s": self.busy_s}

    def release(self, seq: Seq) -> None:
        """The sequence's KV (all but its last token) stays in the prefix cache."""
        if seq.kv is not None and self.cache is not None:
            self.cache.insert((seq.prompt + seq.output_ids)[:-1])
        seq.kv = None

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(_ALPHABET[i % 64] for i in ids if i >= 256 or not skip_special_tokens)

    def encode(self, text: str) -> list[int]:
        return [256 + b for b in text.encode()]

    def token_text(self, token: int) -> str:
        return _ALPHABET[token % 64]
