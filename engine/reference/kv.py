"""KV caches: one per sequence at rest, one batch kept across decode steps while its members run.

A sequence owns its keys/values (`SeqKV`) after prefill. A decode step gathers the running
sequences into a left-padded batch (`DecodeBatch`) whose layers write each new position in place
(`InPlaceLayer`, growing by doubling) instead of concatenating a new tensor every step, and keeps
that batch for the next step as long as the same sequences run in the same order: the common case
between a join and a finish costs no copy at all. When the membership changes, the members still
running get their rows back as `SeqKV` and a new batch is gathered. A sequence in a batch holds a
`Row` (batch, index) instead of a `SeqKV`; `Row.materialize()` copies its keys/values out.

Invariant: a sequence's KV covers its tokens except the last sampled one (the next step feeds it).
"""

import torch
from transformers.cache_utils import Cache, DynamicLayer

__all__ = ["SeqKV", "Row", "InPlaceLayer", "DecodeBatch"]


class SeqKV:
    """One sequence's keys and values: per layer a (1, heads, n, dim) tensor."""

    __slots__ = ("keys", "values", "n")

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        self.keys = keys
        self.values = values
        self.n = keys[0].shape[2]

    @classmethod
    def from_layers(cls, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> "SeqKV":
        """From per-layer (1, heads, n, dim) keys and values."""
        return cls([k for k, _ in layers], [v for _, v in layers])

    def view(self, n: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first `n` (default all) positions of every layer, as (keys, values) views."""
        n = self.n if n is None else n
        return [(k[:, :, :n], v[:, :, :n]) for k, v in zip(self.keys, self.values, strict=True)]


class InPlaceLayer(DynamicLayer):
    """A transformers cache layer over a preallocated (B, heads, capacity, dim) buffer: `update`
    writes the new positions in place and returns views, instead of `torch.cat` per step."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int):
        super().__init__()
        b, h, n, d = keys.shape
        self._k = keys.new_zeros(b, h, max(capacity, n), d)
        self._v = values.new_zeros(b, h, max(capacity, n), d)
        self._k[:, :, :n] = keys
        self._v[:, :, :n] = values
        self.n = n
        self.device = keys.device
        self.is_initialized = True
        self._expose()

    def _expose(self) -> None:
        self.keys = self._k[:, :, : self.n]
        self.values = self._v[:, :, : self.n]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        t = key_states.shape[-2]
        if self.n + t > self._k.shape[2]:
            cap = 2 * (self.n + t)
            for name in ("_k", "_v"):
                old = getattr(self, name)
                new = old.new_zeros(old.shape[0], old.shape[1], cap, old.shape[3])
                new[:, :, : self.n] = old[:, :, : self.n]
                setattr(self, name, new)
        self._k[:, :, self.n: self.n + t] = key_states
        self._v[:, :, self.n: self.n + t] = value_states
        self.n += t
        self._expose()
        return self.keys, self.values


class Row:
    """Where a sequence's KV lives while it is a member of a decode batch."""

    __slots__ = ("batch", "index")

    def __init__(self, batch: "DecodeBatch", index: int):
        self.batch = batch
        self.index = index

    @property
    def n(self) -> int:
        return self.batch.n - self.batch.starts[self.index]

    def materialize(self) -> SeqKV:
        """A copy of this row's valid positions, as the sequence's own KV."""
        b, start, end = self.index, self.batch.starts[self.index], self.batch.n
        return SeqKV([layer._k[b:b + 1, :, start:end].clone() for layer in self.batch.layers],
                     [layer._v[b:b + 1, :, start:end].clone() for layer in self.batch.layers])


class DecodeBatch:
    """Left-padded KV of a fixed list of sequences, advanced one position per decode step."""

    _HEADROOM = 64
    """Spare positions allocated at gather time, so the first steps of a batch never regrow it."""

    def __init__(self, members: tuple, kvs: list[SeqKV]):
        self.members = members
        lengths = [kv.n for kv in kvs]
        self.n = max(lengths)
        self.starts = [self.n - n for n in lengths]
        self.layers: list[InPlaceLayer] = []
        for layer in range(len(kvs[0].keys)):
            ref = kvs[0].keys[layer]
            keys = ref.new_zeros(len(kvs), ref.shape[1], self.n, ref.shape[3])
            values = torch.zeros_like(keys)
            for b, kv in enumerate(kvs):
                keys[b, :, self.starts[b]:] = kv.keys[layer][0, :, : kv.n]
                values[b, :, self.starts[b]:] = kv.values[layer][0, :, : kv.n]
            self.layers.append(InPlaceLayer(keys, values, self.n + self._HEADROOM))
        device = kvs[0].keys[0].device
        starts = torch.tensor(self.starts, device=device)
        self._mask = (torch.arange(self.n + self._HEADROOM, device=device)[None, :] >= starts[:, None]).long()
        self._positions = torch.tensor(lengths, device=device)[:, None]

    def inputs(self) -> tuple[Cache, torch.Tensor, torch.Tensor]:
        """(cache, attention mask over the cache plus the new token, each row's position id)."""
        if self.n + 1 > self._mask.shape[1]:
            grown = self._mask.new_ones(self._mask.shape[0], 2 * (self.n + 1))
            grown[:, : self._mask.shape[1]] = self._mask
            self._mask = grown
        return Cache(layers=self.layers), self._mask[:, : self.n + 1], self._positions

    def advance(self) -> None:
        """The forward pass wrote one position into every row."""
        self.n += 1
        self._positions = self._positions + 1
