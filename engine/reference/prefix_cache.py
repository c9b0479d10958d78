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
    """Longest-cached-prefix lookup; each entry may carry a payload (the KV tensors) or None.

    A block shared by several entries (a group's common prompt, an episode's earlier turns) is held
    once, as in SGLang's radix tree: `tokens` counts distinct blocks, and a block lives while any
    entry holding it does. Evicting the least recently used entry frees only the blocks no other
    entry holds, and never hides a live entry's prefix.
    """

    def __init__(self, capacity_tokens: int, block: int = 16):
        if block < 1:
            raise ValueError(f"block must be at least 1, got {block}")
        self.capacity_tokens = capacity_tokens
        self.block = block
        self._entries: OrderedDict[int, tuple[Any, list[int]]] = OrderedDict()
        """entry id -> (payload, its block keys), least recently used first."""
        self._holders: dict[int, dict[int, None]] = {}
        """block key -> the entries holding it, oldest first (an insertion-ordered set)."""
        self._next_id = 0
        self._lock = threading.Lock()
        self.lookups = 0
        self.hit_tokens = 0

    @property
    def tokens(self) -> int:
        """Tokens held: distinct cached blocks times the block size."""
        return len(self._holders) * self.block

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
            holders = None
            n = 0
            for i, key in enumerate(keys):
                found = self._holders.get(key)
                if not found:
                    break
                holders, n = found, (i + 1) * self.block
            if holders is None:
                return 0, None
            entry = next(reversed(holders))  # any holder of the last block holds the whole prefix
            self._entries.move_to_end(entry)
            self.hit_tokens += n
            return n, self._entries[entry][0]

    def insert(self, tokens: list[int], payload: Any = None) -> None:
        """Remember that the KV of `tokens` is held (payload covers at least their whole blocks)."""
        keys = self._keys(tokens)
        if not keys or self.capacity_tokens <= 0:
            return
        with self._lock:
            entry = self._next_id
            self._next_id += 1
            self._entries[entry] = (payload, keys)
            for key in keys:
                self._holders.setdefault(key, {})[entry] = None
            while self.tokens > self.capacity_tokens and self._entries:
                old, (_, old_keys) = self._entries.popitem(last=False)
                for key in old_keys:
                    holders = self._holders[key]
                    holders.pop(old, None)
                    if not holders:
                        del self._holders[key]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._holders.clear()

    def stats(self) -> dict:
        return {"prefix_cache_tokens": self.tokens, "prefix_cache_entries": len(self._entries),
                "prefix_cache_lookups": self.lookups, "prefix_cache_hit_tokens": self.hit_tokens}
