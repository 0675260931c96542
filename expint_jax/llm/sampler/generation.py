"""Batched generation with a static-shape KV cache: a jitted prefill, then a jitted decode loop.

Contract:
  * Shapes (``Layout``): prompts are left-padded to a bucketed width (``bucket``), so prompts of
    different lengths reuse compiled code; position ids restart at 0 on each row's first real
    token. The cache has that width plus the output buffer (``max_new``, bucketed) of slots.
    ``prefill`` is one ``model.extend`` from an empty cache; ``decode`` is one jitted call whose
    ``lax.while_loop`` samples a token per row, then extends the cache by it, until every row is
    done or the output buffer is full. Parameters are arguments (``graphdef`` static, ``state``
    traced), so new weights of the same shapes never recompile.
  * Prefix reuse (optional, ``prefix_cache``): a row whose prompt starts with tokens the
    ``PrefixCache`` holds gets their keys and values copied into its slots, and the prefill
    extends the cache by the rest only (the chunk, left-padded to its own bucketed width, which
    ends where the prompt ends). After decoding, every row's prompt and the generated tokens that
    entered the cache are stored for later calls. Results equal a generation from scratch up to
    floating-point reassociation.
  * Rows finish independently, by eos (any of ``eos_ids``), by a stop string (exact, see
    ``stops``) or by their own token limit; a finished row's outputs stop changing and its
    later tokens are fed to the cache as invalid slots.
  * Per row and generated token: ``logprobs`` is the log-probability under the model's
    unmodified distribution (softmax of the fp32 logits, no temperature or filtering), the one a
    teacher-forced forward gives; ``sampling_logprobs`` is under the distribution actually
    sampled (penalties, temperature, top-k, top-p applied; 0 for greedy).
  * Teacher signal (``top_logprobs = k > 0``, optional): per row, for every generated token, the
    unmodified distribution that predicted it as top-k ids, log-probs and tail log mass
    (``sampling.top_k_distribution``), and one row more, the distribution *after* the row's last
    token: the loop then runs until every row's last token has entered the cache (one step more
    than without it, so the cache needs ``max_new`` free slots instead of ``max_new - 1``).
    ``Generation.top_logprobs`` carries them with *all* generated ids (see ``expint_jax.token_signal``).
  * Penalties (``sampling.Penalties``, optional): the loop keeps per row the counts of the tokens
    it generated ([V, B], vocabulary-major like the logits; prompt tokens are not counted) and
    subtracts the presence and frequency penalties from the logits before the strategy draws.
  * Randomness: row r draws with ``fold_in(fold_in(key(seeds[r]), row_ids[r]), step)``, so a
    row's output does not depend on which rows share its batch (up to floating-point
    reassociation).
  * Sharding: under ``jax.set_mesh``, the batch follows the ``batch`` logical axis and the cache
    ``CACHE_AXES``; parameters keep the placement they were given (``parallel.placement.shard_model``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from expint_jax.models.qwen3 import CACHE_AXES, KVCache
from expint_jax.parallel.rules import constrain
from expint_jax.token_signal import TopLogprobs
from expint_jax.llm.sampler.prefix_cache import NO_MATCH, PrefixCache
from expint_jax.llm.sampler.sampling import Penalties, Strategy, token_log_probs, top_k_distribution
from expint_jax.llm.sampler.stops import MATCHED, StopTable, TokenBytes, cut_at_stop

RUNNING, EOS, STOP, LENGTH = 0, 1, 2, 3
FINISH_REASONS = {EOS: "eos", STOP: "stop", LENGTH: "length"}


def bucket(n: int, minimum: int = 16) -> int:
    """The smallest size >= n among minimum * {1, 1.5, 2, 3, 4, 6, 8, ...} (padding waste <= 50%)."""
    size = max(int(minimum), 1)
    while size < n:
        if size % 2 == 0 and size * 3 // 2 >= n:
            return size * 3 // 2
        size *= 2
    return size


@dataclasses.dataclass(frozen=True)
class Layout:
    """The static shapes of one generation batch.

    Row r's prompt ends at slot ``width`` (left padding before it); the prefill writes slots
    ``[width - chunk_width, width)`` (the whole prompt width unless prefixes are reused) and the
    decode loop the ``max_new`` slots after ``width``.
    """

    width: int
    chunk_width: int
    max_new: int

    @classmethod
    def of(cls, lengths: np.ndarray, reused: np.ndarray, max_new_tokens: int) -> Layout:
        """The layout for prompts of ``lengths`` tokens, ``reused`` of them from a prefix cache."""
        width = bucket(int(lengths.max()))
        return cls(width, min(bucket(int((lengths - reused).max())), width), bucket(max_new_tokens))

    @property
    def num_slots(self) -> int:
        return self.width + self.max_new


@dataclasses.dataclass
class GenerationCounters:
    """Work done by ``generate`` calls, summed (for benchmarks and tests): tokens are real ones,
    slots include padding rows and columns."""

    calls: int = 0
    prompt_tokens: int = 0
    reused_tokens: int = 0  # prompt tokens taken from the prefix cache
    prefill_slots: int = 0  # batch rows x chunk width of every prefill
    generated_tokens: int = 0
    decode_slots: int = 0  # batch rows x decode steps

    def add(self, other: GenerationCounters) -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))


@dataclasses.dataclass(frozen=True)
class PromptBatch:
    """Left-padded prompts: ``ids``/``valid``/``positions`` [B, W]; ``lengths`` [B] (0 = empty row)."""

    ids: np.ndarray
    valid: np.ndarray
    positions: np.ndarray
    lengths: np.ndarray

    @classmethod
    def left_pad(
        cls, prompts: Sequence[Sequence[int]], width: int, batch_size: int, pad_id: int = 0,
        offsets: Sequence[int] | None = None,
    ) -> PromptBatch:
        """Row r holds ``prompts[r]`` at positions ``offsets[r]`` onwards (default 0)."""
        if len(prompts) > batch_size:
            raise ValueError(f"{len(prompts)} prompts do not fit a batch of {batch_size}")
        ids = np.full((batch_size, width), pad_id, np.int32)
        lengths = np.zeros(batch_size, np.int32)
        for row, prompt in enumerate(prompts):
            prompt = np.asarray(prompt, np.int32).reshape(-1)
            if prompt.size > width:
                raise ValueError(f"prompt {row} has {prompt.size} tokens; the batch width is {width}")
            if prompt.size:
                ids[row, width - prompt.size :] = prompt
            lengths[row] = prompt.size
        valid = np.arange(width)[None, :] >= (width - lengths)[:, None]
        positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0)
        if offsets is not None:
            positions[: len(offsets)] += np.asarray(offsets, np.int64)[:, None]
        positions = positions.astype(np.int32)
        return cls(ids=ids, valid=valid, positions=positions, lengths=lengths)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeOutput:
    """What the decode loop returns, all [B, N] or [B] arrays.

    ``lengths`` counts the generated tokens including the one that finished the row (an eos or the
    token completing a stop string); ``next_positions`` is each row's position after the tokens
    that entered the cache (the last sampled token of the longest row never does, unless the
    teacher signal is recorded). ``top_ids`` / ``top_logprobs`` [B, N + 1, k] and
    ``tail_logmass`` [B, N + 1]: the teacher signal, rows ``0..lengths`` filled (None when off).
    """

    tokens: jax.Array
    logprobs: jax.Array
    sampling_logprobs: jax.Array
    lengths: jax.Array
    finish: jax.Array
    next_positions: jax.Array
    top_ids: jax.Array | None = None
    top_logprobs: jax.Array | None = None
    tail_logmass: jax.Array | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _Loop:
    step: jax.Array  # tokens sampled per row so far (one per iteration)
    cache: KVCache
    last_token: jax.Array  # [B] sampled at the previous step, next to enter the cache
    last_active: jax.Array  # [B] whether that token was a real output of an unfinished row
    position: jax.Array  # [B] position id of last_token
    stop_state: jax.Array  # [B] stop-string automaton state
    done: jax.Array
    out: DecodeOutput
    counts: jax.Array | None = None  # [V, B] generated-token counts, only when penalties are on


def _constrain_cache(cache: KVCache, rules) -> KVCache:
    return dataclasses.replace(
        cache,
        k=constrain(cache.k, CACHE_AXES, rules),
        v=constrain(cache.v, CACHE_AXES, rules),
        valid=constrain(cache.valid, ("batch", "seq"), rules),
    )


def _extend_last_logits(model, cache, ids, positions, valid):
    rules = model.rules
    ids = constrain(ids, ("batch", "seq"), rules)
    hidden, cache = model.extend(ids, positions, cache, valid)
    # Left padding puts every row's newest real token in the last column.
    logits = constrain(model.logits(hidden[:, -1]), ("batch", "act_vocab"), rules)
    return _constrain_cache(cache, rules), logits


@functools.partial(jax.jit, static_argnames=("graphdef", "num_slots"))
def prefill(graphdef, state, ids, positions, valid, *, num_slots: int) -> tuple[KVCache, jax.Array]:
    """A fresh cache of ``num_slots`` slots holding the prompts, and each row's next-token logits."""
    model = nnx.merge(graphdef, state)
    cache = KVCache.empty(model.config, ids.shape[0], num_slots, model.policy.compute)
    return _extend_last_logits(model, _constrain_cache(cache, model.rules), ids, positions, valid)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def extend(graphdef, state, cache: KVCache, ids, positions, valid) -> tuple[KVCache, jax.Array]:
    """Appends left-padded tokens to an existing cache; returns it and the next-token logits."""
    return _extend_last_logits(nnx.merge(graphdef, state), cache, ids, positions, valid)


@functools.partial(jax.jit, static_argnames=("graphdef", "strategy", "max_new", "penalties", "top_logprobs"),
                   donate_argnames=("cache",))
def decode(
    graphdef,
    state,
    cache: KVCache,
    logits: jax.Array,
    positions: jax.Array,
    row_keys: jax.Array,
    limits: jax.Array,
    eos_ids: jax.Array,
    stop_transitions: jax.Array,
    *,
    strategy: Strategy,
    max_new: int,
    penalties: Penalties | None = None,
    top_logprobs: int = 0,
) -> tuple[DecodeOutput, KVCache]:
    """Samples up to ``max_new`` tokens per row from ``logits`` [B, V] onwards, in one while loop.

    ``positions`` [B]: position id of each row's first new token; ``row_keys`` [B]: PRNG keys;
    ``limits`` [B]: each row's token budget (<= ``max_new``; 0 = inactive row); ``eos_ids`` [E]
    (-1 entries are ignored); ``stop_transitions`` [S, V] from ``StopTable``. The cache needs
    ``max_new - 1`` free slots (``max_new`` with ``top_logprobs``). ``penalties``: presence/frequency
    penalties (None = off). ``top_logprobs``: k of the teacher signal (0 = off; module docstring).
    """
    model = nnx.merge(graphdef, state)
    rules = model.rules
    batch = logits.shape[0]
    row_axes = ("batch", None)

    def record(loop: _Loop, logits: jax.Array) -> _Loop:  # logits [V, B]
        keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, loop.step)
        drawn_from = logits if loop.counts is None else penalties.apply(logits, loop.counts)
        token, sampling_logprob = strategy.sample(drawn_from, keys)
        active = ~loop.done
        out = loop.out
        counts = loop.counts
        if counts is not None:
            counts = counts.at[token, jnp.arange(batch)].add(active.astype(counts.dtype))
            counts = constrain(counts, ("act_vocab", "batch"), rules)

        def put(buffer, values):
            column = jnp.where(active, values, 0).astype(buffer.dtype)
            # With the signal on, one last step runs after every row is done (step == max_new):
            # no row is active then, and the clamped index rewrites the last column unchanged.
            index = jnp.minimum(loop.step, buffer.shape[1] - 1)
            column = jnp.where(active, column, buffer[:, index])
            return constrain(buffer.at[:, index].set(column), row_axes, rules)

        next_state = stop_transitions[loop.stop_state, token]
        length = out.lengths + active
        hit_eos = jnp.any(token[:, None] == eos_ids[None, :], axis=-1)
        finish = jnp.select(  # the first true condition wins: eos, then a stop string, then the limit
            [~active, hit_eos, next_state == MATCHED, length >= limits],
            [out.finish, *(jnp.full_like(out.finish, reason) for reason in (EOS, STOP, LENGTH))],
            out.finish,
        )
        signal = {}
        if top_logprobs:
            # The distribution at this step is the one that predicts token ``step`` of an active row,
            # and, for a row whose last token was just fed (``last_active`` but done), the one after it.
            scored = active | loop.last_active
            ids, top, tail = top_k_distribution(logits.T, top_logprobs)

            def put_signal(buffer, values, axes):
                keep = scored.reshape((-1,) + (1,) * (values.ndim - 1))
                column = jnp.where(keep, values, buffer[:, loop.step]).astype(buffer.dtype)
                return constrain(buffer.at[:, loop.step].set(column), axes, rules)

            signal = dict(top_ids=put_signal(out.top_ids, ids, ("batch", None, None)),
                          top_logprobs=put_signal(out.top_logprobs, top, ("batch", None, None)),
                          tail_logmass=put_signal(out.tail_logmass, tail, row_axes))
        out = DecodeOutput(
            tokens=put(out.tokens, token),
            logprobs=put(out.logprobs, token_log_probs(logits, token, vocab_axis=0)),
            sampling_logprobs=put(out.sampling_logprobs, sampling_logprob),
            lengths=length,
            finish=finish,
            next_positions=out.next_positions,
            **signal,
        )
        return dataclasses.replace(
            loop,
            step=loop.step + 1,
            last_token=token,
            last_active=active,
            stop_state=jnp.maximum(next_state, 0),
            done=loop.done | (finish != RUNNING),
            out=out,
            counts=counts,
        )

    def keep_going(loop: _Loop) -> jax.Array:
        if top_logprobs:  # until every row's last sampled token has been fed and scored
            return (loop.step <= max_new) & jnp.any(loop.last_active)
        return (loop.step < max_new) & ~jnp.all(loop.done)

    def step(loop: _Loop) -> _Loop:
        token_valid = loop.last_active[:, None]
        hidden, cache = model.extend(loop.last_token[:, None], loop.position[:, None], loop.cache, token_valid)
        next_logits = constrain(model.vocab_major_logits(hidden[:, 0]), ("act_vocab", "batch"), rules)
        position = loop.position + loop.last_active
        out = dataclasses.replace(loop.out, next_positions=position)
        loop = dataclasses.replace(loop, cache=_constrain_cache(cache, rules), position=position, out=out)
        return record(loop, next_logits)

    zeros = jnp.zeros((batch, max_new))
    first = _Loop(
        step=jnp.zeros((), jnp.int32),
        cache=cache,
        last_token=jnp.zeros(batch, jnp.int32),
        last_active=jnp.zeros(batch, bool),
        position=positions.astype(jnp.int32),
        stop_state=jnp.zeros(batch, jnp.int32),
        done=limits <= 0,
        out=DecodeOutput(
            tokens=zeros.astype(jnp.int32),
            logprobs=zeros,
            sampling_logprobs=zeros,
            lengths=jnp.zeros(batch, jnp.int32),
            finish=jnp.zeros(batch, jnp.int32),
            next_positions=positions.astype(jnp.int32),
            **({} if not top_logprobs else dict(
                top_ids=jnp.zeros((batch, max_new + 1, top_logprobs), jnp.int32),
                top_logprobs=jnp.zeros((batch, max_new + 1, top_logprobs), jnp.float32),
                tail_logmass=jnp.zeros((batch, max_new + 1), jnp.float32))),
        ),
        counts=None if penalties is None else constrain(
            jnp.zeros((logits.shape[1], batch), jnp.int32), ("act_vocab", "batch"), rules),
    )
    last = jax.lax.while_loop(keep_going, step, record(first, logits.T))
    return last.out, last.cache


@dataclasses.dataclass(frozen=True)
class Generation:
    """One row's output after eos and stop strings are applied.

    ``token_ids``/``logprobs``/``sampling_logprobs`` cover the tokens of ``text``: the eos token and
    the tokens of a stop string are left out (see ``stops`` for a stop string beginning inside a
    token). ``finish_reason``: ``"eos"``, ``"stop"`` (a stop string; ``stop_string`` says which) or
    ``"length"``. ``text`` is None when generation ran without ``TokenBytes``. ``num_generated``
    counts every token the loop produced for the row, the eos or stop-completing one included.
    ``top_logprobs`` (when recorded) covers all ``num_generated`` tokens and the position after.
    """

    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    sampling_logprobs: tuple[float, ...]
    finish_reason: str
    stop_string: str | None = None
    text: str | None = None
    num_generated: int = 0
    top_logprobs: TopLogprobs | None = None


def row_keys(seeds: int | Sequence[int], row_ids: Sequence[int]) -> jax.Array:
    """Row r's key ``fold_in(key(seeds[r]), row_ids[r])``; one seed may serve every row."""
    seeds = per_row(seeds, len(row_ids), "seeds")
    if seeds.size and (seeds.min() < 0 or seeds.max() >= 2**32):
        raise ValueError(f"seeds must be in [0, 2**32), got min {seeds.min()}, max {seeds.max()}")

    def key(seed, row):
        return jax.random.fold_in(jax.random.key(seed), row)

    return jax.vmap(key)(jnp.asarray(seeds, jnp.uint32), jnp.asarray(row_ids, jnp.uint32))


def padded_eos(eos_ids: Sequence[int]) -> np.ndarray:
    """eos ids padded with -1 to a power-of-two length (>= 4) so eos sets share compiled code."""
    eos = [int(i) for i in eos_ids]
    size = max(1 << max(len(eos) - 1, 0).bit_length(), 4)
    return np.asarray(eos + [-1] * (size - len(eos)), np.int32)


def check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> list[np.ndarray]:
    """The prompts as int arrays; empty ones and ids outside the vocabulary are errors naming the row."""
    checked = []
    for i, prompt in enumerate(prompts):
        prompt = np.asarray(prompt, np.int64).reshape(-1)
        if prompt.size == 0:
            raise ValueError(f"prompt {i} is empty; generation needs at least one prompt token")
        if prompt.min() < 0 or prompt.max() >= vocab_size:
            raise ValueError(
                f"prompt {i} holds token ids outside [0, {vocab_size}): min {prompt.min()}, max {prompt.max()}"
            )
        checked.append(prompt)
    return checked


def per_row(value: int | Sequence[int], rows: int, name: str) -> np.ndarray:
    """``value`` (one integer for every row, or one per row) as an int64 array of ``rows`` entries."""
    array = np.asarray(value, np.int64)
    if array.ndim == 0:
        return np.full(rows, array)
    if array.shape != (rows,):
        raise ValueError(f"{name}: {array.size} values for {rows} rows")
    return array


def check_limits(max_new_tokens: int | Sequence[int], rows: int) -> np.ndarray:
    limits = per_row(max_new_tokens, rows, "max_new_tokens").astype(np.int32)
    if rows and limits.min() < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {limits.min()}")
    return limits


def check_top_logprobs(k: int, vocab_size: int) -> None:
    if not (isinstance(k, int) and 0 <= k < vocab_size):
        raise ValueError(f"top_logprobs must be an int in [0, {vocab_size}) (the vocabulary size), got {k!r}")


def stop_table(stops: Sequence[str], token_bytes: TokenBytes | None, vocab_size: int) -> StopTable:
    if token_bytes is None:
        if stops:
            raise ValueError("stop strings need token_bytes (the bytes of each token) to be matched")
        return StopTable.never(vocab_size)
    if len(token_bytes) != vocab_size:
        raise ValueError(f"token_bytes covers {len(token_bytes)} ids but the model vocabulary is {vocab_size}")
    return token_bytes.stop_table(stops)


def finish_rows(
    out: DecodeOutput,
    rows: Sequence[int],
    *,
    stops: Sequence[str] = (),
    token_bytes: TokenBytes | None = None,
) -> list[Generation]:
    """Host side: drops eos, cuts text at stop strings, and packs the given rows of ``out``."""
    host = jax.device_get(out)
    results = []
    for row in rows:
        n = int(host.lengths[row])
        finish = int(host.finish[row])
        kept = n - 1 if finish == EOS else n
        ids = [int(t) for t in host.tokens[row, :kept]]
        reason, stop, text = FINISH_REASONS.get(finish, "length"), None, None
        if token_bytes is not None:
            cut = cut_at_stop(ids, token_bytes, stops)
            kept, text, stop = cut.num_tokens, cut.text, cut.stop_string
            if stop is not None:
                reason = "stop"
        signal = None
        if host.top_ids is not None:
            signal = TopLogprobs(np.asarray(host.tokens[row, :n], np.int32), np.asarray(host.top_ids[row, :n + 1]),
                                 np.asarray(host.top_logprobs[row, :n + 1]), np.asarray(host.tail_logmass[row, :n + 1]))
        results.append(
            Generation(
                token_ids=tuple(ids[:kept]),
                logprobs=tuple(float(x) for x in host.logprobs[row, :kept]),
                sampling_logprobs=tuple(float(x) for x in host.sampling_logprobs[row, :kept]),
                finish_reason=reason,
                stop_string=stop,
                text=text,
                num_generated=n,
                top_logprobs=signal,
            )
        )
    return results


def generate(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    prompts: Sequence[Sequence[int]],
    *,
    strategy: Strategy,
    max_new_tokens: int | Sequence[int],
    eos_ids: Sequence[int] = (),
    stops: Sequence[str] = (),
    token_bytes: TokenBytes | None = None,
    seed: int | Sequence[int] = 0,
    row_ids: Sequence[int] | None = None,
    batch_size: int | None = None,
    pad_id: int = 0,
    penalties: Penalties | None = None,
    top_logprobs: int = 0,
    prefix_cache: PrefixCache | None = None,
    counters: GenerationCounters | None = None,
) -> list[Generation]:
    """Generates for every prompt (token id sequences) in one batch; see the module docstring.

    ``max_new_tokens`` is one limit or one per prompt; ``seed`` (one or one per prompt) and
    ``row_ids`` (default 0..n-1) select each row's random stream; ``batch_size`` pads the batch
    with inactive rows (for fixed shapes or a batch that the mesh divides); ``penalties`` are the
    presence/frequency penalties (None = off); ``top_logprobs`` records the teacher signal with that k
    (0 = off; see the module docstring); ``prefix_cache`` reuses and stores keys and values of
    earlier sequences; ``counters`` (when given) is incremented by this call's work.
    """
    vocab_size = vocab_size_of(state)
    prompts = check_prompts(prompts, vocab_size)
    if not prompts:
        return []
    limits = check_limits(max_new_tokens, len(prompts))
    check_top_logprobs(top_logprobs, vocab_size)
    table = stop_table(stops, token_bytes, vocab_size)
    row_ids = list(range(len(prompts))) if row_ids is None else list(row_ids)
    if len(row_ids) != len(prompts):
        raise ValueError(f"{len(row_ids)} row_ids for {len(prompts)} prompts")
    batch_size = batch_size or len(prompts)

    matches = [NO_MATCH] * len(prompts) if prefix_cache is None else [prefix_cache.match(p) for p in prompts]
    lengths = np.asarray([p.size for p in prompts], np.int32)
    reused = np.asarray([m.length for m in matches], np.int32)
    layout = Layout.of(lengths, reused, int(limits.max()))
    chunks = [p[m.length:] for p, m in zip(prompts, matches)]
    batch = PromptBatch.left_pad(chunks, layout.chunk_width, batch_size, pad_id, offsets=reused)
    padding = batch_size - len(prompts)
    next_positions = np.concatenate([lengths, np.zeros(padding, np.int32)])
    all_limits = np.concatenate([limits, np.zeros(padding, np.int32)])
    all_row_ids = row_ids + [0] * padding
    all_seeds = [*per_row(seed, len(prompts), "seed"), *[0] * padding]
    starts = layout.width - lengths  # each prompt's first slot

    if reused.any():
        cache = prefix_cache.assemble(matches, starts, batch=batch_size, num_slots=layout.num_slots,
                                      end=layout.width - layout.chunk_width)
        cache, logits = extend(graphdef, state, cache, batch.ids, batch.positions, batch.valid)
    else:
        cache, logits = prefill(graphdef, state, batch.ids, batch.positions, batch.valid, num_slots=layout.num_slots)
    out, cache = decode(
        graphdef, state, cache, logits, next_positions, row_keys(all_seeds, all_row_ids), all_limits,
        padded_eos(eos_ids), table.transitions, strategy=strategy, max_new=layout.max_new, penalties=penalties,
        top_logprobs=top_logprobs,
    )
    out = jax.device_get(out)
    if prefix_cache is not None:
        fed = out.next_positions[: len(prompts)] - lengths  # generated tokens that entered the cache
        sequences = [np.concatenate([p, out.tokens[r, :fed[r]]]) for r, p in enumerate(prompts)]
        prefix_cache.store(sequences, starts, matches, cache)
    if counters is not None:
        counters.add(GenerationCounters(
            calls=1, prompt_tokens=int(lengths.sum()), reused_tokens=int(reused.sum()),
            prefill_slots=batch_size * layout.chunk_width, generated_tokens=int(out.lengths.sum()),
            decode_slots=batch_size * int(out.lengths.max())))
    return finish_rows(out, range(len(prompts)), stops=stops, token_bytes=token_bytes)


def vocab_size_of(state: nnx.State) -> int:
    return int(state["embed"].get_value().shape[0])
