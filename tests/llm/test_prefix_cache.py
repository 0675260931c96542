"""PrefixCache on its own: what it stores comes back in the right slots, pages are shared and
reference counted, and memory stays within its bound under the documented eviction rules.

Batch caches here are hand-made (every slot's key is a number naming its row and slot), so each
check is exact and no model runs.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from expint_jax.models.config import tiny
from expint_jax.models.qwen3 import KVCache
from expint_jax.llm.sampler.prefix_cache import NO_MATCH, PAGE_TOKENS, PrefixCache

CONFIG = tiny(vocab_size=100, num_layers=1, num_kv_heads=1, head_dim=2)
SLOTS = 96


def batch_cache(rows: int) -> KVCache:
    """Slot s of row r holds key 1000 * (r + 1) + s and value minus that."""
    keys = (1000 * np.arange(1, rows + 1)[:, None] + np.arange(SLOTS)[None, :]).astype(np.float32)
    k = np.broadcast_to(keys[None, :, None, :, None], (1, rows, 1, SLOTS, 2))
    return KVCache(k=jnp.asarray(k), v=jnp.asarray(-k), valid=jnp.ones((rows, SLOTS), bool),
                   end=jnp.int32(SLOTS))


def sequence(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 100, n).astype(np.int32)


def test_stored_keys_come_back_in_the_slots_of_a_later_prompt():
    cache = PrefixCache(CONFIG, "float32", max_tokens=1024)
    a, b = sequence(0, 40), sequence(1, 20)
    cache.store([a, b], np.asarray([10, 30]), [NO_MATCH, NO_MATCH], batch_cache(2))
    assert len(cache) == 2 and cache.pages_in_use == 3 + 2

    prompt = np.concatenate([a[:35], sequence(2, 9)])
    found = cache.match(prompt)
    assert found.length == 35 and cache.match(b[:PAGE_TOKENS - 1]) == NO_MATCH  # less than a page
    assert cache.match(a).length == 39  # the last prompt token is always left to prefill
    rebuilt = cache.assemble([NO_MATCH, found], np.asarray([0, 7]), batch=2, num_slots=64, end=50)
    keys, valid = np.asarray(rebuilt.k[0, :, 0, :, 0]), np.asarray(rebuilt.valid)
    np.testing.assert_array_equal(keys[1, 7:42], 1000 + np.arange(10, 45))  # row 0 of the store, from slot 10
    np.testing.assert_array_equal(np.asarray(rebuilt.v[0, 1, 0, 7:42, 1]), -keys[1, 7:42])
    assert valid[1].sum() == 35 and valid[1, 7:42].all() and not valid[0].any() and int(rebuilt.end) == 50
    assert cache.counters.hits == 2 and cache.counters.reused_tokens == 35 + 39


def test_a_continuation_shares_whole_pages_and_replaces_its_source():
    cache = PrefixCache(CONFIG, "float32", max_tokens=1024)
    a = sequence(0, 40)
    cache.store([a], np.asarray([0]), [NO_MATCH], batch_cache(1))
    longer = np.concatenate([a, sequence(1, 30)])
    found = cache.match(longer)
    cache.store([longer], np.asarray([0]), [found], batch_cache(1))
    assert len(cache) == 1 and cache.pages_in_use == 5  # 2 whole pages shared, 3 new ones for tokens 32..69
    # Under step-wise injection the next request parts from the old one before its end (the block).
    blocked = np.concatenate([longer[:50], sequence(2, 10)])
    cache.store([blocked], np.asarray([0]), [cache.match(blocked)], batch_cache(1))
    assert len(cache) == 1 and cache.pages_in_use == 4  # 3 pages shared, 1 new one for tokens 48..59
    assert cache.match(longer).length == 50 and cache.counters.evictions == 2
    keys = np.asarray(cache.assemble([cache.match(blocked)], np.asarray([0]), batch=1, num_slots=64, end=0).k)
    np.testing.assert_array_equal(keys[0, 0, 0, :59, 0], 1000 + np.arange(59))  # every store's row 0, slot = token


def test_memory_stays_bounded_and_entries_in_use_are_not_evicted():
    cache = PrefixCache(CONFIG, "float32", max_tokens=4 * PAGE_TOKENS)
    assert cache.token_bytes(CONFIG, "float32") == 2 * 1 * 1 * 2 * 4
    seqs = [sequence(i, 30) for i in range(4)]  # 2 pages each
    cache.new_epoch()
    cache.store(seqs[:2], np.asarray([0, 0]), [NO_MATCH] * 2, batch_cache(2))
    cache.store(seqs[2:3], np.asarray([0]), [NO_MATCH], batch_cache(1))  # full, and both entries in use
    assert cache.counters.skipped == 1 and len(cache) == 2
    cache.new_epoch()
    cache.match(seqs[1])  # used in this epoch
    cache.new_epoch()  # seqs[0] was last used two epochs ago, seqs[1] one: only seqs[0] may go
    cache.store(seqs[2:3], np.asarray([0]), [NO_MATCH], batch_cache(1))
    assert cache.match(seqs[0], use=False) == NO_MATCH and cache.match(seqs[1], use=False).length == 29
    assert cache.counters.evictions == 1 and cache.pages_in_use == 4
    assert cache.arena_tokens == cache.max_tokens == 4 * PAGE_TOKENS
    too_long = sequence(9, 5 * PAGE_TOKENS)
    cache.store([too_long], np.asarray([0]), [NO_MATCH], batch_cache(1))
    assert cache.counters.skipped == 2 and cache.pages_in_use == 4
    cache.clear()
    assert len(cache) == 0 and cache.arena_tokens == 0


def test_the_arena_grows_by_doubling_up_to_its_bound():
    cache = PrefixCache(CONFIG, "float32", max_tokens=5000)
    assert cache.max_tokens == 5000 // PAGE_TOKENS * PAGE_TOKENS and cache.arena_tokens == 0
    cache.store([sequence(0, 10)], np.asarray([0]), [NO_MATCH], batch_cache(1))
    assert cache.arena_tokens == 256 * PAGE_TOKENS
    for i in range(30):  # 60 sequences of 6 pages: more than the 312 pages of the bound
        seqs = [sequence(100 + 2 * i + r, SLOTS) for r in range(2)]
        cache.store(seqs, np.asarray([0, 0]), [NO_MATCH] * 2, batch_cache(2))
    assert cache.arena_tokens == cache.max_tokens  # grew once, capped at the bound
    stored = (312 - 1) // 6  # after the first, one-page sequence; nothing is evictable in one epoch
    assert cache.pages_in_use == 1 + 6 * stored and cache.counters.skipped == 60 - stored
    with pytest.raises(ValueError, match="max_tokens must be >= 16"):
        PrefixCache(CONFIG, "float32", max_tokens=15)
