"""Per-sequence KV caches and their assembly into one batch per decode step.

Each sequence owns growable per-layer key/value buffers (`SeqKV`, doubling like a list), so a decode
step appends one position in place instead of copying the whole cache. A step gathers the running
sequences into left-padded (B, heads, L, dim) tensors with an attention mask over the padding;
the model's new position is then scattered back. Invariant: `SeqKV.n` positions are valid, and they
cover the sequence's tokens except the last sampled one (which the next step feeds).
"""

import torch
from transformers import DynamicCache

__all__ = ["SeqKV", "gather", "scatter_last"]


class SeqKV:
    """One sequence's keys and values: per layer a (1, heads, capacity, dim) buffer, `n` filled."""

    __slots__ = ("keys", "values", "n")

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        self.keys = keys
        self.values = values
        self.n = keys[0].shape[2]

    @classmethod
    def from_layers(cls, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> "SeqKV":
        """From per-layer (1, heads, n, dim) keys and values (views are fine: the first append copies)."""
        return cls([k for k, _ in layers], [v for _, v in layers])

    def view(self, n: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first `n` (default all) positions of every layer, as (keys, values) views."""
        n = self.n if n is None else n
        return [(k[:, :, :n], v[:, :, :n]) for k, v in zip(self.keys, self.values, strict=True)]

    def _grow(self) -> None:
        cap = max(16, 2 * self.keys[0].shape[2])
        for bufs in (self.keys, self.values):
            for i, old in enumerate(bufs):
                new = old.new_empty(old.shape[0], old.shape[1], cap, old.shape[3])
                new[:, :, : self.n] = old[:, :, : self.n]
                bufs[i] = new

    def append(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Add one position: per layer a (heads, dim) key and value."""
        if self.n == self.keys[0].shape[2]:
            self._grow()
        for buf, k in zip(self.keys, keys, strict=True):
            buf[0, :, self.n] = k
        for buf, v in zip(self.values, values, strict=True):
            buf[0, :, self.n] = v
        self.n += 1


def gather(kvs: list[SeqKV]) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
    """Left-pad the sequences' caches to the longest: (cache, attention mask (B, L+1) for the
    cache plus the new token, position ids (B, 1) = each sequence's own length)."""
    lengths = [kv.n for kv in kvs]
    longest = max(lengths)
    layers = []
    for layer in range(len(kvs[0].keys)):
        ref = kvs[0].keys[layer]
        keys = ref.new_zeros(len(kvs), ref.shape[1], longest, ref.shape[3])
        values = torch.zeros_like(keys)
        for b, kv in enumerate(kvs):
            keys[b, :, longest - kv.n:] = kv.keys[layer][0, :, : kv.n]
            values[b, :, longest - kv.n:] = kv.values[layer][0, :, : kv.n]
        layers.append((keys, values))
    device = kvs[0].keys[0].device
    n = torch.tensor(lengths, device=device)
    mask = (torch.arange(longest + 1, device=device)[None, :] >= (longest - n)[:, None]).long()
    return DynamicCache(ddp_cache_data=layers), mask, n[:, None]


def scatter_last(kvs: list[SeqKV], cache: DynamicCache) -> None:
    """Append the batch cache's last position (the token just fed) to each sequence's own cache."""
    new_keys = [layer.keys[:, :, -1] for layer in cache.layers]
    new_values = [layer.values[:, :, -1] for layer in cache.layers]
    for b, kv in enumerate(kvs):
        kv.append([k[b] for k in new_keys], [v[b] for v in new_values])
