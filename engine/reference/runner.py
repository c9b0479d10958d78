"""The transformers model behind `tidal serve`: batched prefill/decode with a KV cache per sequence.

Runs every forward pass on one worker thread so the event loop (HTTP, streaming) stays responsive.
Each sequence keeps its own per-layer keys/values; a decode step left-pads them to the longest,
masks the padding, runs the whole batch as one forward pass and hands each sequence back its row,
so sequences join and leave the batch at any step (continuous batching).

Logprobs (contract §1.4, what SGLang returns, and what the trainer's importance ratios use as the
behaviour policy mu): for the sampled token x at a step with logits z over the FULL vocabulary,
    logprob(x) = log_softmax(z' / T)[x]
where z' are the logits after logit_bias, repetition/frequency/presence penalties and the
min_new_tokens stop-token mask, and T is the temperature (T = 1 when greedy, T < 1e-6). It is
computed BEFORE top-k / top-p / min-p truncation, which only restrict what may be sampled. Values
are clamped to the float32 minimum, never -inf.
"""

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from engine.reference.prefix_cache import PrefixCache
from engine.reference.scheduler import Seq

__all__ = ["ModelRunner", "sample_row"]

_LOGP_MIN = torch.finfo(torch.float32).min


def sample_row(logits: torch.Tensor, seq: Seq, generator: torch.Generator | None,
               top_n: int) -> tuple[int, float, list[tuple[float, int]] | None]:
    """Pick one token from a (V,) row of logits under the sequence's sampling params.
    Returns (token, logprob as the module docstring defines it, top-`top_n` (logprob, id) or None)."""
    s = seq.sampling
    z = logits.float().clone()
    dev = z.device
    for tok, bias in s.logit_bias:
        if 0 <= tok < z.numel():
            z[tok] += bias
    if s.repetition_penalty != 1.0 or s.frequency_penalty or s.presence_penalty:
        out = torch.tensor(seq.output_ids, dtype=torch.long, device=dev)
        if s.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(seq.prompt) | set(seq.output_ids)), dtype=torch.long, device=dev)
            vals = z[seen]
            z[seen] = torch.where(vals > 0, vals / s.repetition_penalty, vals * s.repetition_penalty)
        if out.numel():
            counts = torch.bincount(out, minlength=z.numel()).float()
            z -= s.frequency_penalty * counts + s.presence_penalty * (counts > 0).float()
    banned = [t for t in seq.stop_ids if 0 <= t < z.numel()] if len(seq.output_ids) < s.min_new_tokens else []
    if banned:
        z[torch.tensor(banned, dtype=torch.long, device=dev)] = float("-inf")
    logp = F.log_softmax(z / (1.0 if s.greedy else s.temperature), dim=-1)
    if s.greedy:
        token = int(torch.argmax(logp))
    else:
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
        token = int(torch.multinomial(probs / probs.sum(), 1, generator=generator))
    logprob = max(float(logp[token]), _LOGP_MIN)
    top = None
    if top_n > 0:
        vals, ids = torch.topk(logp, min(top_n, logp.numel()))
        top = [(max(float(v), _LOGP_MIN), int(i)) for v, i in zip(vals, ids, strict=True)]
    return token, logprob, top


class ModelRunner:
    """A causal LM loaded with `from_pretrained(path)`; implements the scheduler's `Stepper`."""

    def __init__(self, path: str | Path, *, device: str = "auto", dtype: str = "float32", seed: int = 0,
                 prefix_cache_tokens: int = 0):
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available()
                                   else ("cpu" if device == "auto" else device))
        self.dtype = getattr(torch, dtype)
        self.path = str(path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.model = self._load(self.path)
        config = self.model.config
        self.model_type = getattr(config, "model_type", None)
        self.architectures = list(getattr(config, "architectures", None) or [])
        self.vocab_size = int(config.vocab_size)
        self.context_length = int(getattr(config, "max_position_embeddings", 4096))
        eos = getattr(self.model.generation_config, "eos_token_id", None) or config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if self.tokenizer.eos_token_id is not None:
            eos.append(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.cache = PrefixCache(prefix_cache_tokens) if prefix_cache_tokens else None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")

    def _load(self, path: str):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype)
        return model.to(self.device).eval()

    # --- the Stepper interface ------------------------------------------------------------------

    async def step(self, batch: list[Seq]):
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._step, batch)

    def release(self, seq: Seq) -> None:
        """Keep the sequence's KV in the prefix cache when its length still matches its tokens
        (a sequence aborted during a step may hold KV one token ahead)."""
        kv = seq.kv
        tokens = (seq.prompt + seq.output_ids)[:-1]
        if self.cache is not None and kv is not None and kv[0][0].shape[2] == len(tokens):
            self.cache.insert(tokens, kv)
        seq.kv = None

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)

    async def run(self, fn, *args):
        """Run `fn(*args)` on the model thread (weight loads, broadcasts): never beside a step."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # --- forward passes (model thread) ----------------------------------------------------------

    @torch.inference_mode()
    def _step(self, batch: list[Seq]):
        logits: dict[int, torch.Tensor] = {}
        decode = []
        for i, seq in enumerate(batch):
            if seq.kv is None:
                logits[i] = self._prefill(seq)
            else:
                decode.append(i)
        if decode:
            rows = self._decode([batch[i] for i in decode])
            for i, row in zip(decode, rows, strict=True):
                logits[i] = row
        out = []
        for i, seq in enumerate(batch):
            if seq.rng is None and seq.sampling.sampling_seed is not None:
                seq.rng = torch.Generator(device=self.device).manual_seed(seq.sampling.sampling_seed)
            top_n = seq.item.top_logprobs_num if seq.item is not None and seq.item.return_logprob else 0
            out.append(sample_row(logits[i], seq, seq.rng or self.generator, top_n))
        return out

    def _prefill(self, seq: Seq) -> torch.Tensor:
        """Forward the context (prompt + output so far, after a retraction) past its longest cached
        prefix; keep its KV. Prompt logprobs need every position, so they bypass the cache."""
        context = seq.prompt + seq.output_ids
        n, cached = 0, None
        if self.cache is not None and (seq.item is None or seq.item.logprob_start_len < 0):
            n, cached = self.cache.match(context[:-1])
        if not seq.started_prefill:
            seq.cached_tokens = n
            seq.started_prefill = True
        past = None
        if n:
            past = DynamicCache(ddp_cache_data=[(k[:, :, :n], v[:, :, :n]) for k, v in cached])
        ids = torch.tensor([context[n:]], device=self.device)
        out = self.model(input_ids=ids, past_key_values=past, use_cache=True)
        seq.kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        if seq.input_logprobs is None and seq.item is not None and seq.item.logprob_start_len >= 0:
            seq.input_logprobs = self._input_logprobs(out.logits[0], seq)
        return out.logits[0, -1]

    def _input_logprobs(self, logits: torch.Tensor, seq: Seq) -> list[float | None]:
        """Prompt positions start..end: logprob of each prompt token given its prefix (first: null)."""
        start = seq.item.logprob_start_len
        n = len(seq.prompt)
        temp = 1.0 if seq.sampling.greedy else seq.sampling.temperature
        logp = F.log_softmax(logits[: n - 1].float() / temp, dim=-1)
        target = torch.tensor(seq.prompt[1:], device=logp.device)
        values = logp.gather(1, target[:, None])[:, 0].clamp(min=_LOGP_MIN).tolist()
        return [None] + values[start:] if start < n else []

    def _decode(self, seqs: list[Seq]) -> list[torch.Tensor]:
        """One batched decode step over sequences with KV; each gets its last token's logits row."""
        lengths = [kv[0][0].shape[2] for kv in (s.kv for s in seqs)]
        longest = max(lengths)
        layers = []
        for layer in range(len(seqs[0].kv)):
            keys = torch.cat([F.pad(s.kv[layer][0], (0, 0, longest - n, 0)) for s, n in zip(seqs, lengths, strict=True)])
            values = torch.cat([F.pad(s.kv[layer][1], (0, 0, longest - n, 0)) for s, n in zip(seqs, lengths, strict=True)])
            layers.append((keys, values))
        mask = torch.zeros(len(seqs), longest + 1, dtype=torch.long, device=self.device)
        for b, n in enumerate(lengths):
            mask[b, longest - n:] = 1
        out = self.model(
            input_ids=torch.tensor([[s.output_ids[-1]] for s in seqs], device=self.device),
            attention_mask=mask,
            position_ids=torch.tensor([[n] for n in lengths], device=self.device),
            past_key_values=DynamicCache(ddp_cache_data=layers),
            use_cache=True,
        )
        new = out.past_key_values.layers
        for b, seq in enumerate(seqs):
            seq.kv = [
                (torch.cat([k, new[j].keys[b:b + 1, :, -1:]], dim=2),
                 torch.cat([v, new[j].values[b:b + 1, :, -1:]], dim=2))
                for j, (k, v) in enumerate(seq.kv)
            ]
        return list(out.logits[:, -1])

    # --- weights (model thread) -----------------------------------------------------------------

    @torch.inference_mode()
    def load_from_disk(self, path: str) -> None:
        """Copy the weights of the checkpoint at `path` into the live model (raises on mismatch)."""
        fresh = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype)
        missing, unexpected = self.model.load_state_dict(fresh.state_dict(), strict=False)
        if missing or unexpected:
            raise ValueError(f"checkpoint {path} does not match the served model: "
                             f"missing {missing[:3]}, unexpected {unexpected[:3]}")
        self.path = path

    @torch.inference_mode()
    def load_tensors(self, named: list[tuple[str, torch.Tensor]]) -> None:
        """Copy received tensors into the parameters of the same names."""
        params = dict(self.model.named_parameters())
        params.update(dict(self.model.named_buffers()))
        for name, tensor in named:
            if name not in params:
                raise ValueError(f"unknown parameter {name!r}")
            if tuple(params[name].shape) != tuple(tensor.shape):
                raise ValueError(f"{name}: expected shape {tuple(params[name].shape)}, got {tuple(tensor.shape)}")
            params[name].copy_(tensor)
