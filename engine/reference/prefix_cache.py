"""Which token prefixes the server still holds KV for: SGLang's radix cache at block granularity.

Multi-turn rollouts resend the whole trajectory every turn; a server that kept the previous turn's
KV prefills only the new tokens, and reports them as `cached_tokens` (docs/sglang.md §1.3). The index is a chain
of block hashes (as vLLM's prefix caching): block i's key hashes block i's tokens together with
block i-1's key, so one dictionary lookup per block finds the longest cached prefix, in whole
blocks. Entries are evicted least-recently-used once they hold more than `capacity_tokens`.

Thread-safe: the model thread matches while the event loop inserts finished sequences.
"""

import threading
from collections import OrderedDict
from typing import Any

__all__ = ["PrefixCache"]


class PrefixCache:
    """Longest-cached-prefix lookup; each entry may carry a payload (the KV tensors) or None."""

    def __init__(self, capacity_tokens: int, block: int = 16):
        if block < 1:
            raise ValueError(f"block must be at least 1, got {block}")
        self.capacity_tokens = capacity_tokens
        self.block = block
        self._entries: OrderedDict[int, tuple[int, Any, list[int]]] = OrderedDict()
        self._by_hash: dict[int, int] = {}
        self._next_id = 0
        self._lock = threading.Lock()
        self.tokens = 0
        self.lookups = 0
        self.hit_tokens = 0

    def _keys(self, tokens: list[int]) -> list[int]:
        keys, key, b = [], 0, self.block
        for start in range(0, len(tokens) - b + 1, b):
            key = hash((key, tuple(tokens[start:start + b])))
            keys.append(key)
        return keys

    def match(self, tokens: list[int]) -> tuple[int, Any]:
        """(n, payload): the first n tokens (whole blocks) are cached in the entry carrying payload."""
        keys = self._keys(tokens)
        with self._lock:
            self.lookups += 1
            found = None
            n = 0
            for i, key in enumerate(keys):
                entry = self._by_hash.get(key)
                if entry is None or entry not in self._entries:
                    break
                found, n = entry, (i + 1) * self.block
            if found is None:
                return 0, None
            self._entries.move_to_end(found)
            self.hit_tokens += n
            return n, self._entries[found][1]

    def insert(self, tokens: list[int], payload: Any = None) -> None:
        """Remember that the KV of `tokens` is held (payload covers at least their whole blocks)."""
        keys = self._keys(tokens)
        if not keys or self.capacity_tokens <= 0:
            return
        with self._lock:
            entry = self._next_id
            self._next_id += 1
            n = len(keys) * self.block
            self._entries[entry] = (n, payload, keys)
            self.tokens += n
            for key in keys:
                self._by_hash[key] = entry
            while self.tokens > self.capacity_tokens and self._entries:
                old, (size, _, old_keys) = self._entries.popitem(last=False)
                self.tokens -= size
                for key in old_keys:
                    if self._by_hash.get(key) == old:
                        del self._by_hash[key]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._by_hash.clear()
            self.tokens = 0

    def stats(self) -> dict:
        return {"prefix_cache_tokens": self.tokens, "prefix_cache_entries": len(self._entries),
                "prefix_cache_lookups": self.lookups, "prefix_cache_hit_tokens": self.hit_tokens}
