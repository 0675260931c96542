"""``PrefixCache``: the keys and values of recent sequences, kept between generation calls so that a
prompt that starts like one of them prefills only the rest.

An agent sends a conversation again at every turn, grown by the model's reply and a tool result;
under step-wise injection the previous request's last user message also carried an experience
block that the next request no longer has. Whatever the caller, the reusable part is the longest
common token prefix with something computed before, and that is what this cache finds.

Contract:
  * Storage: keys and values live in an arena of pages of ``PAGE_TOKENS`` tokens,
    ``[layers, kv_heads, pages * PAGE_TOKENS, head_dim]`` each, in the cache dtype. The arena
    starts small and doubles on demand up to ``max_tokens`` tokens (rounded down to whole pages):
    that is the memory bound, ``max_tokens * 2 * layers * kv_heads * head_dim * itemsize`` bytes
    (``token_bytes``), plus the token ids of the entries on the host.
  * An entry is one stored sequence (a prompt and the generated tokens that entered the cache):
    its token ids and its pages. Entries that share a prefix share its whole pages (reference
    counted). An entry that a newer one was built from is dropped when the newer one is stored:
    the newer one holds its pages up to where the two part, and what came after (a turn's reply
    and, under step-wise injection, the experience block before it) no later prompt of that
    conversation holds. When pages run out, the least recently used entry (a match or a store is
    a use) among those not used in the current or the previous epoch is evicted (``new_epoch``:
    the engine starts one per chat call); when only those are left, the new sequence is not
    stored: a stage with more live conversations than fit keeps a stable part of them cached
    instead of evicting, call after call, exactly the entries the next batch needs.
  * ``match(prompt)`` gives the entry with the longest common prefix with ``prompt`` and its
    length, at most ``len(prompt) - 1`` (the last prompt token is always fed, for its logits).
    Candidates are found through a hash chain of whole pages, so a common prefix shorter than one
    page is not found; the length is then counted on the token ids themselves, so a hash collision
    can only shorten a match, never corrupt one.
  * ``assemble`` builds a generation batch's ``KVCache`` with each row's matched prefix in its
    slots (row r's sequence starts at slot ``starts[r]``); ``store`` keeps each row's sequence
    from a finished batch cache. Neither changes a computed value: a reused prefix holds the keys
    and values its tokens had when they were computed, so a generation equals one from scratch up
    to floating-point reassociation (a different batch shape sums in a different order).
  * ``clear()`` forgets everything (new weights make every stored key stale); ``bind(weights)``
    clears the cache unless it was last bound to that very object, so that callers sharing one
    cache with different weights never reuse each other's keys.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from expint_jax.models.config import Qwen3Config
from expint_jax.models.qwen3 import KVCache

PAGE_TOKENS = 16
FIRST_ARENA_PAGES = 256  # the arena's size before its first doubling (4,096 tokens)


@dataclasses.dataclass(frozen=True)
class Match:
    """``length`` tokens of ``entry`` (an entry id; None for no match) start the prompt."""

    entry: int | None = None
    length: int = 0


NO_MATCH = Match()


@dataclasses.dataclass
class _Entry:
    ids: np.ndarray  # int32 [n]
    pages: list[int]  # ceil(n / PAGE_TOKENS) arena pages, in sequence order
    hashes: list[int]  # chain hash of each whole page
    last_use: int
    epoch: int  # the last epoch it was used in


@dataclasses.dataclass
class CacheCounters:
    """Monotonic counters of a ``PrefixCache`` (for benchmarks and tests)."""

    lookups: int = 0
    hits: int = 0  # lookups that reused at least one token
    reused_tokens: int = 0
    stored_tokens: int = 0
    evictions: int = 0
    skipped: int = 0  # sequences not stored: no room without evicting entries in use


def _page_hashes(ids: np.ndarray) -> list[int]:
    """Chain hash of every whole page: page j's hash covers tokens [0, (j + 1) * PAGE_TOKENS)."""
    hashes, chain = [], 0
    for j in range(ids.size // PAGE_TOKENS):
        chain = hash((chain, ids[j * PAGE_TOKENS:(j + 1) * PAGE_TOKENS].tobytes()))
        hashes.append(chain)
    return hashes


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(a.size, b.size)
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


@functools.partial(jax.jit, static_argnames=("batch", "num_slots"))
def _gather(arena_k, arena_v, index, valid, end, *, batch: int, num_slots: int) -> KVCache:
    """A batch cache whose slot (b, s) holds arena position ``index[b, s]``."""

    def take(arena):  # [L, K, N, D] -> [L, B, K, S, D]
        rows = jnp.take(arena, index.reshape(-1), axis=2, mode="clip")
        layers, heads, _, dim = arena.shape
        return rows.reshape(layers, heads, batch, num_slots, dim).transpose(0, 2, 1, 3, 4)

    return KVCache(k=take(arena_k), v=take(arena_v), valid=valid, end=end)


@functools.partial(jax.jit, donate_argnames=("arena_k", "arena_v"))
def _scatter(arena_k, arena_v, cache_k, cache_v, index):
    """Writes batch slot (b, s) to arena position ``index[b, s]`` (out of range: not written)."""

    def put(arena, cache):  # [L, K, N, D] <- [L, B, K, S, D]
        layers, batch, heads, slots, dim = cache.shape
        rows = cache.transpose(0, 2, 1, 3, 4).reshape(layers, heads, batch * slots, dim)
        return arena.at[:, :, index.reshape(-1)].set(rows.astype(arena.dtype), mode="drop")

    return put(arena_k, cache_k), put(arena_v, cache_v)


class PrefixCache:
    """Stored sequences and their keys/values; see the module docstring for the contract."""

    def __init__(self, config: Qwen3Config, dtype, max_tokens: int):
        self.max_pages = int(max_tokens) // PAGE_TOKENS
        if self.max_pages < 1:
            raise ValueError(f"PrefixCache: max_tokens must be >= {PAGE_TOKENS}, got {max_tokens}")
        self.config, self.dtype = config, jnp.dtype(dtype)
        self.counters = CacheCounters()
        self.clear()

    @staticmethod
    def token_bytes(config: Qwen3Config, dtype) -> int:
        """Bytes of keys and values one token takes."""
        return 2 * config.num_layers * config.num_kv_heads * config.head_dim * jnp.dtype(dtype).itemsize

    @property
    def max_tokens(self) -> int:
        return self.max_pages * PAGE_TOKENS

    @property
    def arena_tokens(self) -> int:
        """Tokens the arena holds room for now (it grows up to ``max_tokens``)."""
        return 0 if self._arena is None else self._arena[0].shape[2]

    @property
    def pages_in_use(self) -> int:
        return int(np.count_nonzero(self._refs))

    def __len__(self) -> int:
        return len(self._entries)

    def bind(self, weights: object) -> None:
        """Empties the cache unless its keys were computed with ``weights`` (the same object)."""
        if weights is not self._weights:
            self.clear()
            self._weights = weights

    def clear(self) -> None:
        self._weights: object | None = None
        self._arena: tuple[jax.Array, jax.Array] | None = None
        self._refs = np.zeros(0, np.int32)  # entries holding each page
        self._free: list[int] = []
        self._entries: dict[int, _Entry] = {}
        self._by_hash: dict[int, set[int]] = {}
        self._next_id = 0
        self._clock = 0
        self._epoch = 0

    def new_epoch(self) -> None:
        """Entries used from now on are protected from eviction during this epoch and the next."""
        self._epoch += 1

    # -- lookup -------------------------------------------------------------------------------

    def match(self, prompt: np.ndarray, *, use: bool = True) -> Match:
        """The entry sharing the longest prefix with ``prompt`` (module docstring). ``use=False``
        only looks: the entry's recency and the counters stay as they are."""
        self.counters.lookups += use
        prompt = np.asarray(prompt, np.int32)
        hashes = _page_hashes(prompt)
        depth = next((j + 1 for j in reversed(range(len(hashes))) if hashes[j] in self._by_hash), 0)
        if depth == 0:
            return NO_MATCH
        window = prompt[depth * PAGE_TOKENS:(depth + 1) * PAGE_TOKENS]
        best, best_length = None, -1
        for eid in self._by_hash[hashes[depth - 1]]:
            entry = self._entries[eid]
            length = depth * PAGE_TOKENS + _common_prefix(entry.ids[depth * PAGE_TOKENS:], window)
            if length > best_length or (length == best_length and entry.last_use > self._entries[best].last_use):
                best, best_length = eid, length
        entry = self._entries[best]
        if not np.array_equal(entry.ids[:depth * PAGE_TOKENS], prompt[:depth * PAGE_TOKENS]):  # a collision
            best_length = _common_prefix(entry.ids, prompt)
        length = min(best_length, prompt.size - 1)
        if length <= 0:
            return NO_MATCH
        if not use:
            return Match(best, length)
        entry.last_use, entry.epoch = self._tick(), self._epoch
        self.counters.hits += 1
        self.counters.reused_tokens += length
        return Match(best, length)

    def assemble(self, matches: list[Match], starts: np.ndarray, *, batch: int, num_slots: int,
                 end: int) -> KVCache:
        """A ``KVCache`` of ``batch`` rows and ``num_slots`` slots, write pointer ``end``: row r holds
        its match's tokens at slots ``starts[r]`` onwards (valid), every other slot is invalid."""
        index = np.zeros((batch, num_slots), np.int32)
        valid = np.zeros((batch, num_slots), bool)
        for row, (found, start) in enumerate(zip(matches, starts)):
            if found.entry is None:
                continue
            index[row, start:start + found.length] = self._positions(self._entries[found.entry].pages, 0,
                                                                     found.length)
            valid[row, start:start + found.length] = True
        if self._arena is None:
            self._grow(1)
        return _gather(*self._arena, index, valid, jnp.int32(end), batch=batch, num_slots=num_slots)

    # -- storing ------------------------------------------------------------------------------

    def store(self, sequences: list[np.ndarray], starts: np.ndarray, matches: list[Match], cache: KVCache) -> None:
        """Keeps row r's ``sequences[r]`` (its keys/values at slots ``starts[r]`` onwards of ``cache``),
        sharing the whole pages of ``matches[r]``'s entry that its prefix covers."""
        index = np.full((cache.k.shape[1], cache.num_slots), np.iinfo(np.int32).max, np.int32)
        created = set()
        for row, (ids, start, found) in enumerate(zip(sequences, starts, matches)):
            ids = np.asarray(ids, np.int32)
            needed = math.ceil(ids.size / PAGE_TOKENS)
            donor = self._entries.get(found.entry)  # None: no match (entry None), or superseded already
            shared = [] if donor is None else donor.pages[:found.length // PAGE_TOKENS]
            self._refs[shared] += 1  # held before any eviction below can free them
            fresh = self._allocate(needed - len(shared), keep=created)
            if fresh is None:
                self._release(shared)
                self.counters.skipped += 1
                continue
            pages = shared + fresh
            first = len(shared) * PAGE_TOKENS
            index[row, start + first:start + ids.size] = self._positions(pages, first, ids.size)
            created.add(self._insert(ids, pages))
            self.counters.stored_tokens += ids.size
            if donor is not None and found.entry in self._entries:
                self._evict(found.entry)  # superseded by the new entry (module docstring)
        if created:
            self._arena = _scatter(*self._arena, cache.k, cache.v, index)

    # -- internals ----------------------------------------------------------------------------

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    @staticmethod
    def _positions(pages: list[int], first: int, stop: int) -> np.ndarray:
        """Arena positions of sequence tokens ``[first, stop)`` stored in ``pages``."""
        tokens = np.arange(first, stop)
        return np.asarray(pages, np.int32)[tokens // PAGE_TOKENS] * PAGE_TOKENS + tokens % PAGE_TOKENS

    def _insert(self, ids: np.ndarray, pages: list[int]) -> int:
        eid, self._next_id = self._next_id, self._next_id + 1
        hashes = _page_hashes(ids)
        self._entries[eid] = _Entry(ids=ids, pages=pages, hashes=hashes, last_use=self._tick(), epoch=self._epoch)
        for h in hashes:
            self._by_hash.setdefault(h, set()).add(eid)
        return eid

    def _evict(self, eid: int) -> None:
        entry = self._entries.pop(eid)
        for h in entry.hashes:
            holders = self._by_hash[h]
            holders.discard(eid)
            if not holders:
                del self._by_hash[h]
        self._release(entry.pages)
        self.counters.evictions += 1

    def _release(self, pages: list[int]) -> None:
        for page in pages:
            self._refs[page] -= 1
            if self._refs[page] == 0:
                self._free.append(page)

    def _allocate(self, count: int, keep: set[int]) -> list[int] | None:
        """``count`` free pages (referenced once), growing the arena and then evicting entries other
        than ``keep`` as the module docstring orders; None when that cannot make room."""
        if count > self.max_pages:
            return None
        while len(self._free) < count:
            if self.arena_tokens < self.max_tokens:
                self._grow(count - len(self._free))
                continue
            victims = [eid for eid, e in self._entries.items() if eid not in keep and e.epoch < self._epoch - 1]
            if not victims:
                return None
            self._evict(min(victims, key=lambda eid: self._entries[eid].last_use))
        pages, self._free = self._free[:count], self._free[count:]
        self._refs[pages] = 1
        return pages

    def _grow(self, at_least: int) -> None:
        """Doubles the arena (from ``FIRST_ARENA_PAGES``) until ``at_least`` more pages are free or
        it holds ``max_pages``."""
        old = 0 if self._arena is None else self.arena_tokens // PAGE_TOKENS
        pages = max(old, min(FIRST_ARENA_PAGES, self.max_pages))
        while pages < self.max_pages and pages - old < at_least:
            pages = min(2 * pages, self.max_pages)
        if pages == old:
            return
        c = self.config
        shape = (c.num_layers, c.num_kv_heads, pages * PAGE_TOKENS, c.head_dim)
        if self._arena is None:
            self._arena = (jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype))
        else:
            extra = ((0, 0), (0, 0), (0, (pages - old) * PAGE_TOKENS), (0, 0))
            self._arena = tuple(jnp.pad(a, extra) for a in self._arena)
        self._refs = np.concatenate([self._refs, np.zeros(pages - old, np.int32)])
        self._free.extend(range(old, pages))
