"""``Session``: KV caches kept across the turns of a batch of conversations.

An agent generates, appends a tool response, and generates again; re-running the whole
conversation through the model every turn is wasted work. A session keeps one cache for a fixed
batch of rows and, for every row, the token ids its valid cache slots hold (in order) and where.

Contract of ``Session.generate(sequences, ...)``: ``sequences[r]`` is row r's complete token
sequence so far (e.g. the re-encoded conversation plus the generation prompt), or None to leave
the row out of this call. For each row the longest common prefix with what its cache holds is
kept; the cached slots after it are marked invalid (holes nobody attends to, so a stop-string cut
or a re-tokenized turn costs nothing but slots) and only the rest of the sequence is fed. Position
ids are indices in the sequence, so holes do not shift them. The result equals ``generate`` on the
full sequences from scratch, up to floating-point reassociation. The cache grows (to a bucketed
size) when a turn needs more slots.

Limitations: the cache is never compacted, so invalidated slots (holes) stay allocated and a long
conversation with many cuts or re-tokenized turns keeps growing the cache (and the attention cost
with it) until the session is dropped. And nothing uses a ``Session`` yet: ``LocalEngine`` (and so
the agent) re-encodes and prefills the whole conversation on every call.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from expint_jax.models.qwen3 import KVCache
from expint_jax.llm.sampler import generation as gen
from expint_jax.llm.sampler.sampling import Penalties, Strategy
from expint_jax.llm.sampler.stops import TokenBytes


@functools.partial(jax.jit, donate_argnames=("cache",))
def _forget(cache: KVCache, keep: jax.Array) -> KVCache:
    """Invalidates the slots where ``keep`` [B, S] is False."""
    return KVCache(k=cache.k, v=cache.v, valid=cache.valid & keep, end=cache.end)


@functools.partial(jax.jit, static_argnames=("num_slots",))
def _grow(cache: KVCache, *, num_slots: int) -> KVCache:
    """The cache padded with empty slots up to ``num_slots`` (a new buffer: no donation possible)."""
    extra = num_slots - cache.num_slots
    pad = ((0, 0), (0, 0), (0, 0), (0, extra), (0, 0))
    return KVCache(k=jnp.pad(cache.k, pad), v=jnp.pad(cache.v, pad), valid=jnp.pad(cache.valid, ((0, 0), (0, extra))),
                   end=cache.end)


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(a.size, b.size)
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


class Session:
    """A batch of ``batch_size`` conversations whose caches persist between ``generate`` calls."""

    def __init__(
        self,
        graphdef: nnx.GraphDef,
        state: nnx.State,
        batch_size: int,
        *,
        token_bytes: TokenBytes | None = None,
        pad_id: int = 0,
    ):
        if batch_size < 1:
            raise ValueError(f"Session: batch_size must be >= 1, got {batch_size}")
        self.graphdef, self.state = graphdef, state
        self.batch_size = batch_size
        self.token_bytes = token_bytes
        self.pad_id = pad_id
        self._cache: KVCache | None = None
        self._ids = [np.zeros(0, np.int64) for _ in range(batch_size)]
        self._slots = [np.zeros(0, np.int64) for _ in range(batch_size)]

    @property
    def num_slots(self) -> int:
        return 0 if self._cache is None else self._cache.num_slots

    def cached_ids(self, row: int) -> np.ndarray:
        """The token ids row ``row``'s valid cache slots hold, in sequence order."""
        return self._ids[row].copy()

    def generate(
        self,
        sequences: Sequence[Sequence[int] | None],
        *,
        strategy: Strategy,
        max_new_tokens: int | Sequence[int],
        eos_ids: Sequence[int] = (),
        stops: Sequence[str] = (),
        seed: int | Sequence[int] = 0,
        row_ids: Sequence[int] | None = None,
        penalties: Penalties | None = None,
        top_logprobs: int = 0,
    ) -> list[gen.Generation | None]:
        """Continues every given row; returns a ``Generation`` per row (None for rows left out).

        ``seed`` (one, or one per row of the batch) and ``row_ids`` (default 0..batch_size-1) select
        each row's random stream, and ``top_logprobs`` records the teacher signal, as in
        ``generation.generate``.
        """
        if len(sequences) != self.batch_size:
            raise ValueError(f"Session.generate: {len(sequences)} sequences for a batch of {self.batch_size}")
        vocab_size = gen.vocab_size_of(self.state)
        active = [r for r, s in enumerate(sequences) if s is not None]
        checked = dict(zip(active, gen.check_prompts([sequences[r] for r in active], vocab_size)))
        limits = np.zeros(self.batch_size, np.int32)
        limits[active] = gen.check_limits(max_new_tokens, len(active))
        gen.check_top_logprobs(top_logprobs, vocab_size)
        table = gen.stop_table(stops, self.token_bytes, vocab_size)
        if not active:
            return [None] * self.batch_size

        keep = np.ones((self.batch_size, self.num_slots), bool)
        chunks, offsets = [np.zeros(0, np.int64)] * self.batch_size, [0] * self.batch_size
        for r in active:
            # At least the last token is fed again: its logits start the decode.
            prefix = min(_common_prefix(self._ids[r], checked[r]), checked[r].size - 1)
            keep[r, self._slots[r][prefix:]] = False
            chunks[r], offsets[r] = checked[r][prefix:], prefix
            self._ids[r], self._slots[r] = self._ids[r][:prefix], self._slots[r][:prefix]

        width = gen.bucket(max(c.size for c in chunks))
        max_new = gen.bucket(int(limits.max()))
        batch = gen.PromptBatch.left_pad(chunks, width, self.batch_size, self.pad_id, offsets)
        start = 0 if self._cache is None else int(self._cache.end)
        needed = start + width + max_new
        if self._cache is None:
            cache, logits = gen.prefill(self.graphdef, self.state, batch.ids, batch.positions, batch.valid,
                                        num_slots=gen.bucket(needed))
        else:
            cache = _forget(self._cache, keep)
            self._cache = None  # donated
            if needed > cache.num_slots:
                cache = _grow(cache, num_slots=gen.bucket(needed))
            cache, logits = gen.extend(self.graphdef, self.state, cache, batch.ids, batch.positions, batch.valid)
        next_positions = np.asarray([offsets[r] + chunks[r].size for r in range(self.batch_size)], np.int32)
        all_row_ids = list(range(self.batch_size)) if row_ids is None else list(row_ids)
        if len(all_row_ids) != self.batch_size:
            raise ValueError(f"Session.generate: {len(all_row_ids)} row_ids for a batch of {self.batch_size}")
        out, self._cache = gen.decode(
            self.graphdef, self.state, cache, logits, next_positions, gen.row_keys(seed, all_row_ids), limits,
            gen.padded_eos(eos_ids), table.transitions, strategy=strategy, max_new=max_new, penalties=penalties,
            top_logprobs=top_logprobs,
        )

        out = jax.device_get(out)
        for r in active:
            chunk_slots = start + width - chunks[r].size + np.arange(chunks[r].size)
            fed = int(out.next_positions[r]) - int(next_positions[r])  # generated tokens now in the cache
            decode_slots = start + width + np.arange(fed)
            self._ids[r] = np.concatenate([self._ids[r], chunks[r], out.tokens[r, :fed]])
            self._slots[r] = np.concatenate([self._slots[r], chunk_slots, decode_slots])
        generations = gen.finish_rows(out, active, stops=stops, token_bytes=self.token_bytes)
        results: list[gen.Generation | None] = [None] * self.batch_size
        for r, generation in zip(active, generations):
            results[r] = generation
        return results
