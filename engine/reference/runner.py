"""The transformers model behind `tidal serve`: batched prefill/decode with a KV cache per sequence.

Runs every forward pass on one worker thread so the event loop (HTTP, streaming) stays responsive.
Each sequence keeps its own KV (kv.py); a decode step gathers the running sequences into one
left-padded, masked batch, runs a single forward pass, and keeps the batch for the next step while
the same sequences run, so sequences join and leave at any step (continuous batching) and the
steps in between copy no KV. Sampling and the logprob the server returns are defined in
sampling.py (docs/sglang.md §1.4: log softmax of the tempered logits over the full vocabulary).
"""

import asyncio
import inspect
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from tidal.engine.reference.kv import DecodeBatch, Row, SeqKV
from tidal.engine.reference.prefix_cache import PrefixCache
from tidal.engine.reference.sampling import LOGP_MIN, sample
from tidal.engine.reference.scheduler import Seq
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

__all__ = ["ModelRunner"]


class ModelRunner:
    """A causal LM loaded with `from_pretrained(path)`; implements the scheduler's `Stepper`."""

    def __init__(self, path: str | Path, *, device: str = "auto", dtype: str = "float32", seed: int = 0,
                 prefix_cache_tokens: int = 0, local_files_only: bool = False):
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available()
                                   else ("cpu" if device == "auto" else device))
        self.dtype = getattr(torch, dtype)
        self.path = str(path)
        self.local_files_only = local_files_only
        self.model = self._load(self.path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=local_files_only)
        # The name of the KV-cache argument: `cache` since transformers 5.2x, `past_key_values` before
        # (which newer versions still take, with a FutureWarning on every forward pass).
        params = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
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
        self._batch: DecodeBatch | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")

    def _load(self, path: str):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype, local_files_only=self.local_files_only)
        layer_types = set(getattr(model.config, "layer_types", None) or ["full_attention"])
        if layer_types != {"full_attention"}:
            raise ValueError(f"{path}: layer types {sorted(layer_types)}; the reference server keeps full "
                             "KV per sequence and serves full-attention models only")
        return model.to(self.device).eval()

    # --- the Stepper interface ------------------------------------------------------------------

    async def step(self, batch: list[Seq]):
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._step, batch)

    def release(self, seq: Seq) -> None:
        """Keep the sequence's KV in the prefix cache when its length still matches its tokens
        (a sequence aborted during a step may hold KV one token ahead). Called only while no step
        runs (the scheduler defers it), so reading a decode batch's row here is safe."""
        kv = seq.kv
        tokens = (seq.prompt + seq.output_ids)[:-1]
        if self.cache is not None and kv is not None and kv.n == len(tokens):
            self.cache.insert(tokens, kv.materialize() if isinstance(kv, Row) else kv)
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
        rows: list[torch.Tensor | None] = [None] * len(batch)
        plain, decode = [], []
        for i, seq in enumerate(batch):
            if seq.kv is not None:
                decode.append(i)
                continue
            context = seq.prompt + seq.output_ids
            n, cached = 0, None
            wants_input_logprobs = seq.item is not None and seq.item.logprob_start_len >= 0
            if self.cache is not None and not wants_input_logprobs:
                n, cached = self.cache.match(context[:-1])
            if not seq.started_prefill:
                seq.cached_tokens = n
                seq.started_prefill = True
            if n or wants_input_logprobs:
                rows[i] = self._prefill_one(seq, context, n, cached)
            else:
                plain.append(i)
        if plain:
            for i, row in zip(plain, self._prefill([batch[i] for i in plain]), strict=True):
                rows[i] = row
        if decode:
            for i, row in zip(decode, self._decode([batch[i] for i in decode]), strict=True):
                rows[i] = row
        else:
            self._batch = None
        for seq in batch:
            if seq.rng is None and seq.sampling.sampling_seed is not None:
                seq.rng = torch.Generator(device=self.device).manual_seed(seq.sampling.sampling_seed)
        top_ns = [s.item.top_logprobs_num if s.item is not None and s.item.return_logprob else 0 for s in batch]
        return sample(torch.stack(rows), batch, [s.rng or self.generator for s in batch], top_ns)

    def _prefill_one(self, seq: Seq, context: list[int], n: int, cached: SeqKV | None) -> torch.Tensor:
        """Forward one context past its `n` cached positions; keep its KV (and prompt logprobs)."""
        past = DynamicCache(ddp_cache_data=cached.view(n)) if n else None
        out = self.model(input_ids=torch.tensor([context[n:]], device=self.device), use_cache=True,
                         **{self._cache_kw: past})
        seq.kv = SeqKV.from_layers([(layer.keys, layer.values) for layer in out.past_key_values.layers])
        if seq.input_logprobs is None and seq.item is not None and seq.item.logprob_start_len >= 0:
            seq.input_logprobs = self._input_logprobs(out.logits[0], seq)
        return out.logits[0, -1]

    def _prefill(self, seqs: list[Seq]) -> torch.Tensor:
        """Prefill whole contexts (prompt + output so far, after a retraction) as one left-padded,
        masked batch; each sequence keeps its own slice of the KV. (B, V) next-token logits."""
        contexts = [s.prompt + s.output_ids for s in seqs]
        longest = max(len(c) for c in contexts)
        ids = torch.zeros(len(seqs), longest, dtype=torch.long)
        mask = torch.zeros(len(seqs), longest, dtype=torch.long)
        for b, c in enumerate(contexts):
            ids[b, longest - len(c):] = torch.tensor(c)
            mask[b, longest - len(c):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                         use_cache=True)
        layers = out.past_key_values.layers
        for b, (seq, c) in enumerate(zip(seqs, contexts, strict=True)):
            start = longest - len(c)
            seq.kv = SeqKV.from_layers([(layer.keys[b:b + 1, :, start:], layer.values[b:b + 1, :, start:])
                                        for layer in layers])
        return out.logits[:, -1]

    def _input_logprobs(self, logits: torch.Tensor, seq: Seq) -> list[float | None]:
        """Prompt positions start..end: logprob of each prompt token given its prefix (first: null)."""
        start = seq.item.logprob_start_len
        n = len(seq.prompt)
        temp = 1.0 if seq.sampling.greedy else seq.sampling.temperature
        logp = F.log_softmax(logits[: n - 1].float() / temp, dim=-1)
        target = torch.tensor(seq.prompt[1:], device=logp.device)
        values = logp.gather(1, target[:, None])[:, 0].clamp(min=LOGP_MIN).tolist()
        return [None] + values[start:] if start < n else []

    def _decode(self, seqs: list[Seq]) -> torch.Tensor:
        """One batched decode step over sequences with KV: (B, V) logits of their next tokens.
        The batch of the previous step is reused when the same sequences run again (kv.py)."""
        members = tuple(seqs)
        batch = self._batch
        if batch is None or batch.members != members:
            if batch is not None:
                for seq in batch.members:
                    if isinstance(seq.kv, Row) and seq.kv.batch is batch:
                        seq.kv = seq.kv.materialize()
            batch = self._batch = DecodeBatch(members, [s.kv for s in seqs])
            for b, seq in enumerate(seqs):
                seq.kv = Row(batch, b)
        cache, mask, positions = batch.inputs()
        out = self.model(
            input_ids=torch.tensor([[s.output_ids[-1]] for s in seqs], device=self.device),
            attention_mask=mask, position_ids=positions, use_cache=True, **{self._cache_kw: cache},
        )
        batch.advance()
        return out.logits[:, -1]

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
