"""The prefix cache index: longest whole-block prefix and the LRU bound (its use by the model and
the simulator is tested with their servers)."""

from tidal.engine.reference.prefix_cache import PrefixCache


def test_longest_whole_block_prefix_and_lru_bound():
    cache = PrefixCache(capacity_tokens=64, block=4)
    a = list(range(10))                      # blocks [0..3], [4..7]; the tail 8, 9 is not a block
    cache.insert(a, payload="A")
    assert cache.match(a + [99]) == (8, "A")
    assert cache.match([0, 1, 2, 3, 9, 9, 9, 9]) == (4, "A")
    assert cache.match([1, 2, 3, 4]) == (0, None), "a block's key includes everything before it"
    cache.insert(list(range(100, 140)), payload="B")                   # 40 tokens
    cache.insert(list(range(200, 220)), payload="C")                   # 20: 8 + 40 + 20 > 64
    assert cache.match(a) == (0, None), "the least recently used entry went first"
    assert cache.match(list(range(100, 140)))[1] == "B" and cache.tokens == 60
    cache.clear()
    assert cache.match(list(range(100, 140))) == (0, None) and cache.tokens == 0


def test_shared_blocks_are_held_once_and_outlive_an_evicted_sharer():
    cache = PrefixCache(capacity_tokens=32, block=4)
    prompt = list(range(8))                                            # two blocks every member shares
    a, b = prompt + list(range(100, 108)), prompt + list(range(200, 208))
    cache.insert(a, payload="A")
    cache.insert(b, payload="B")
    assert cache.tokens == 24, "the shared prompt's blocks count once"
    assert cache.match(a) == (16, "A")                                 # b is now the least recently used
    cache.insert(list(range(300, 312)), payload="C")                   # 24 + 12 > 32: b goes
    assert cache.match(b) == (8, "A"), "b's own blocks went, the prompt it shared with a stayed"
    assert cache.match(a) == (16, "A"), "evicting b hid none of a's prefix"
    assert cache.tokens == 28
