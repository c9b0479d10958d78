"""Choosing the next token of every sequence in a batch, and the logprob the server returns for it.

Logprobs (docs/sglang.md §1.4, what SGLang returns, and what the trainer's importance ratios use as the
behaviour policy mu): for the sampled token x at a step with logits z over the FULL vocabulary,

    logprob(x) = log_softmax(z' / T)[x]

where z' are the logits after logit_bias, repetition/frequency/presence penalties and the
min_new_tokens stop-token mask, and T is the temperature (T = 1 when greedy, T < 1e-6). It is
computed BEFORE top-k / top-p / min-p truncation, which only restrict what may be sampled. Values
are clamped to the float32 minimum, never -inf.
"""

import torch
from tidal.engine.reference.scheduler import Seq

__all__ = ["sample", "LOGP_MIN"]

LOGP_MIN = torch.finfo(torch.float32).min


def _penalise(z: torch.Tensor, seq: Seq) -> None:
    """Apply the sequence's logit_bias, penalties and min_new_tokens mask to its (V,) logits, in place.
    Repetition divides positive (multiplies negative) logits of every token seen (prompt and output);
    frequency subtracts its value per earlier output occurrence, presence once per output token."""
    s, dev = seq.sampling, z.device
    for tok, bias in s.logit_bias:
        if 0 <= tok < z.numel():
            z[tok] += bias
    if s.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(seq.prompt) | set(seq.output_ids)), dtype=torch.long, device=dev)
        vals = z[seen]
        z[seen] = torch.where(vals > 0, vals / s.repetition_penalty, vals * s.repetition_penalty)
    if (s.frequency_penalty or s.presence_penalty) and seq.output_ids:
        counts = torch.bincount(torch.tensor(seq.output_ids, dtype=torch.long, device=dev),
                                minlength=z.numel()).float()
        z -= s.frequency_penalty * counts + s.presence_penalty * (counts > 0).float()
    if len(seq.output_ids) < s.min_new_tokens:
        banned = [t for t in seq.stop_ids if 0 <= t < z.numel()]
        if banned:
            z[torch.tensor(banned, dtype=torch.long, device=dev)] = float("-inf")


def _needs_penalty(seq: Seq) -> bool:
    s = seq.sampling
    return bool(s.logit_bias or s.repetition_penalty != 1.0 or s.frequency_penalty or s.presence_penalty
                or (len(seq.output_ids) < s.min_new_tokens and seq.stop_ids))


def _draw(logp: torch.Tensor, seq: Seq, generator: torch.Generator) -> int:
    """Sample from the (V,) tempered log-distribution after top-k, top-p and min-p truncation."""
    s = seq.sampling
    probs = logp.exp()
    if s.top_k < probs.numel():
        kth = torch.topk(probs, s.top_k).values[-1]
        probs = torch.where(probs < kth, 0.0, probs)
    if s.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        drop = (sorted_p.cumsum(0) - sorted_p) > s.top_p
        probs = probs.scatter(0, order[drop], 0.0)
    if s.min_p > 0.0:
        probs = torch.where(probs < s.min_p * probs.max(), 0.0, probs)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


def sample(logits: torch.Tensor, seqs: list[Seq], generators: list[torch.Generator],
           top_ns: list[int]) -> list[tuple[int, float, list[tuple[float, int]] | None]]:
    """One token per row of `logits` (B, V): (token, logprob as the module docstring defines it,
    the top `top_ns[b]` (logprob, id) pairs or None). Greedy rows take the argmax."""
    z = logits.float().clone()
    for b, seq in enumerate(seqs):
        if _needs_penalty(seq):
            _penalise(z[b], seq)
    temps = torch.tensor([1.0 if s.sampling.greedy else s.sampling.temperature for s in seqs],
                         device=z.device)
    logp = torch.log_softmax(z / temps[:, None], dim=-1)
    tokens = logp.argmax(dim=-1)
    for b, seq in enumerate(seqs):
        if not seq.sampling.greedy:
            tokens[b] = _draw(logp[b], seq, generators[b])
    chosen = logp.gather(1, tokens[:, None])[:, 0].clamp(min=LOGP_MIN).tolist()
    k = min(max(top_ns, default=0), logp.shape[1])
    tops: list = [None] * len(seqs)
    if k > 0:
        vals, ids = torch.topk(logp, k, dim=-1)
        vals, ids = vals.clamp(min=LOGP_MIN).tolist(), ids.tolist()
        tops = [list(zip(vals[b][:n], ids[b][:n], strict=True)) if n > 0 else None
                for b, n in enumerate(top_ns)]
    return [(t, lp, top) for t, lp, top in zip(tokens.tolist(), chosen, tops, strict=True)]
