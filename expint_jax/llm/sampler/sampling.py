"""Sampling strategies: how one token per row is drawn from fp32 logits.

Every strategy is a small frozen dataclass (hashable, so it is a static argument of the jitted
decode loop) with

  * ``log_weights(logits [B, V]) -> [B, V]``: the sampling distribution as unnormalized log-probs,
    temperature applied and excluded tokens at ``-inf``;
  * ``__call__(logits [B, V], keys [B]) -> tokens [B] int32``: one PRNG key per row, so what a row
    draws does not depend on the other rows of the batch; ``draw(log_weights, keys)`` is the same
    draw from precomputed ``log_weights``;
  * ``sample(logits [V, B], keys [B]) -> (tokens [B], sampling log-probs [B])``: what the decode
    loop calls, on vocabulary-major logits (see ``Qwen3.vocab_major_logits``); the same draw as
    ``__call__``. ``Greedy`` answers from axis 0 directly (no [B, V] copy, no [B, V] mask).

Filters apply in the order of Hugging Face and vLLM: temperature, then top-k, then top-p (on the
distribution that top-k left). Ties at a top-k or top-p threshold are all kept. Top-p counts
probability mass in fixed point (multiples of 2**-30, summed exactly as integers) and finds its
threshold without sorting the vocabulary (``top_p_filter``).
``from_params(SamplingParams)`` picks the strategy; temperature 0 is ``Greedy``.

``Penalties`` (presence and frequency, the OpenAI / vLLM definition) are not a strategy: they
need the counts of the tokens a row has generated so far, which the decode loop keeps, and they
apply to the raw logits before any strategy (so also before greedy's argmax).
``penalties_from_params(SamplingParams)`` gives ``None`` when both are 0, so unpenalized decoding
keeps no counts at all.

``top_k_distribution(logits [B, V], k)`` is what the decode loop records when asked for the teacher
signal (``SamplingParams.top_logprobs``): the unmodified distribution's k most likely ids, their
log-probabilities (descending) and the log mass of the rest, as ``distill.losses`` buckets them.
"""

from __future__ import annotations

import abc
import dataclasses

import jax
import jax.numpy as jnp

from expint_jax.records import SamplingParams


def scale(logits: jax.Array, temperature: float) -> jax.Array:
    return logits / jnp.float32(temperature)


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """Keeps the ``k`` largest logits per row (and ties with the k-th), the rest become -inf."""
    if k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits >= kth, logits, -jnp.inf)


# Top-p accounts probability mass in fixed point: each token's probability rounded to a multiple of
# 2**-30 (the total stays below 2**31 for any vocabulary under ~4M tokens), summed as integers.
# Integer sums do not depend on the order of the terms, so the kept set is one exact function of
# the logits, whichever way it is searched for (below: the k largest logits, else a bisection), and
# never needs a full sort of the vocabulary (XLA:CPU's sort of [8, 8192] logits took ~20 ms,
# several times a whole decode step of the organism-sized model).
MASS_SCALE = 2**30
TOP_P_CANDIDATES = 64  # the nucleus is searched among this many largest logits first


def order_keys(x: jax.Array) -> jax.Array:
    """uint32 keys with the order of the float32 values ``x`` (-inf lowest; -0.0 and 0.0 equal)."""
    x = x.astype(jnp.float32)
    bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, jnp.float32(0), x), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
    """Keeps the smallest set of most likely tokens whose probability reaches ``p`` (nucleus).

    A token stays when the probability of the tokens strictly more likely than it is below ``p``
    (so the top token always stays, and a tie at the threshold stays whole); probabilities are
    counted in multiples of ``1 / MASS_SCALE`` (the comment above ``MASS_SCALE``), which moves
    the threshold only where a cumulative mass lies within ~1e-9 per token of ``p`` (the sorted
    float32 cumulative sum this replaces erred by more).
    """
    if p >= 1.0:
        return logits
    keys = order_keys(logits)
    mass = jnp.round(jax.nn.softmax(logits, axis=-1) * MASS_SCALE).astype(jnp.int32)
    budget = max(round(p * MASS_SCALE), 1)
    candidates = min(TOP_P_CANDIDATES, logits.shape[-1])
    top, index = jax.lax.top_k(logits, candidates)
    top_keys, top_mass = order_keys(top), jnp.take_along_axis(mass, index, axis=-1)
    # Mass strictly above each candidate: every token above a candidate is a candidate too.
    above = jnp.sum(jnp.where(top_keys[..., None, :] > top_keys[..., :, None], top_mass[..., None, :], 0), axis=-1)
    found = above[..., -1] >= budget  # the smallest candidate is out: the threshold is among the candidates

    def among_candidates():
        return jnp.min(jnp.where(above < budget, top_keys, jnp.uint32(2**32 - 1)), axis=-1)

    def bisection():
        return _nucleus_threshold(keys, mass, budget)

    threshold = jax.lax.cond(jnp.all(found), among_candidates, bisection)
    return jnp.where(keys >= threshold[..., None], logits, -jnp.inf)


def _nucleus_threshold(keys: jax.Array, mass: jax.Array, budget: int) -> jax.Array:
    """Per row, the smallest key ``t`` with less than ``budget`` mass strictly above it; the tokens
    at or above ``t`` are exactly those with less than ``budget`` mass above them (32 halvings of
    the key range: no sort)."""

    def mass_above(t):
        return jnp.sum(jnp.where(keys > t[..., None], mass, 0), axis=-1)

    lo, hi = jnp.min(keys, axis=-1), jnp.max(keys, axis=-1)  # mass_above(hi) == 0 < budget

    def halve(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        below = mass_above(mid) < budget
        moving = hi - lo > 1
        return jnp.where(moving & ~below, mid, lo), jnp.where(moving & below, mid, hi)

    lo, hi = jax.lax.fori_loop(0, 32, halve, (lo, hi))
    return jnp.where(mass_above(lo) < budget, lo, hi)


def first_argmax(x: jax.Array, axis: int) -> jax.Array:
    """``jnp.argmax`` (the first maximum) as two plain reductions, a max then a min over the indices
    that reach it: on CPU these vectorize where XLA's (value, index) argmax reduction does not
    (about 2x faster on decode logits [V, 8]). A row with NaN gets the last index, still in range."""
    size = x.shape[axis]
    best = jnp.max(x, axis=axis, keepdims=True)
    index = jax.lax.broadcasted_iota(jnp.int32, x.shape, axis % x.ndim)
    return jnp.minimum(jnp.min(jnp.where(x == best, index, size), axis=axis), size - 1)


def token_log_probs(log_weights: jax.Array, tokens: jax.Array, *, vocab_axis: int = -1) -> jax.Array:
    """log-probability of ``tokens`` [B] under the (renormalized) distribution ``log_weights``,
    [B, V] (``vocab_axis=-1``) or vocabulary-major [V, B] (``vocab_axis=0``)."""
    picked = jnp.take_along_axis(log_weights, jnp.expand_dims(tokens, vocab_axis), axis=vocab_axis)
    return jnp.squeeze(picked, vocab_axis) - jax.nn.logsumexp(log_weights, axis=vocab_axis)


def top_k_distribution(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(ids [B, k] int32, log-probs [B, k], tail log mass [B])`` of ``softmax(logits [B, V])`` in fp32.

    The tail is the log-sum-exp of the logits outside the top k minus that of all logits, shifted
    by the tail's own maximum, so it is finite and accurate even when the tail mass is ~0 (the
    convention of ``distill.losses``' ``topk`` divergence). Needs ``k < V``.
    """
    logits = logits.astype(jnp.float32)
    top_logits, ids = jax.lax.top_k(logits, int(k))
    total = jax.nn.logsumexp(logits, axis=-1)
    rows = jnp.arange(logits.shape[0])[:, None]
    outside = logits.at[rows, ids].set(-jnp.inf)
    return ids.astype(jnp.int32), top_logits - total[:, None], jax.nn.logsumexp(outside, axis=-1) - total


class Strategy(abc.ABC):
    def __post_init__(self) -> None:
        """Validates whichever of ``temperature``, ``k`` and ``p`` the strategy has."""
        name, fields = type(self).__name__, vars(self)
        if "temperature" in fields and not self.temperature > 0:
            raise ValueError(f"{name}: temperature must be > 0 (use Greedy for temperature 0), got {self.temperature}")
        if "k" in fields and not (isinstance(self.k, int) and self.k >= 1):
            raise ValueError(f"{name}: k must be an int >= 1, got {self.k!r}")
        if "p" in fields and not 0 < self.p <= 1:
            raise ValueError(f"{name}: p must be in (0, 1], got {self.p}")

    @abc.abstractmethod
    def log_weights(self, logits: jax.Array) -> jax.Array: ...

    def draw(self, log_weights: jax.Array, keys: jax.Array) -> jax.Array:
        """One token per row from ``log_weights`` (the output of ``log_weights``)."""
        return jax.vmap(jax.random.categorical)(keys, log_weights).astype(jnp.int32)

    def __call__(self, logits: jax.Array, keys: jax.Array) -> jax.Array:
        return self.draw(self.log_weights(logits), keys)

    def sample(self, vocab_major_logits: jax.Array, keys: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Tokens [B] drawn from logits [V, B], and their log-probs under the sampling distribution."""
        weights = self.log_weights(vocab_major_logits.T)
        tokens = self.draw(weights, keys)
        return tokens, token_log_probs(weights, tokens)


@dataclasses.dataclass(frozen=True)
class Greedy(Strategy):
    """The most likely token (the first one on exact ties); ignores the keys."""

    def log_weights(self, logits: jax.Array) -> jax.Array:
        best = jnp.argmax(logits, axis=-1)
        return jnp.where(jnp.arange(logits.shape[-1]) == best[:, None], 0.0, -jnp.inf)

    def draw(self, log_weights: jax.Array, keys: jax.Array) -> jax.Array:
        return jnp.argmax(log_weights, axis=-1).astype(jnp.int32)

    def sample(self, vocab_major_logits: jax.Array, keys: jax.Array) -> tuple[jax.Array, jax.Array]:
        tokens = first_argmax(vocab_major_logits, axis=0)
        return tokens, jnp.zeros(tokens.shape, jnp.float32)  # the whole mass sits on the argmax


@dataclasses.dataclass(frozen=True)
class Temperature(Strategy):
    temperature: float = 1.0

    def log_weights(self, logits: jax.Array) -> jax.Array:
        return scale(logits, self.temperature)


@dataclasses.dataclass(frozen=True)
class TopK(Strategy):
    k: int
    temperature: float = 1.0

    def log_weights(self, logits: jax.Array) -> jax.Array:
        return top_k_filter(scale(logits, self.temperature), self.k)


@dataclasses.dataclass(frozen=True)
class TopP(Strategy):
    p: float
    temperature: float = 1.0

    def log_weights(self, logits: jax.Array) -> jax.Array:
        return top_p_filter(scale(logits, self.temperature), self.p)


@dataclasses.dataclass(frozen=True)
class TopKTopP(Strategy):
    """Top-k, then top-p on what top-k kept."""

    k: int
    p: float
    temperature: float = 1.0

    def log_weights(self, logits: jax.Array) -> jax.Array:
        return top_p_filter(top_k_filter(scale(logits, self.temperature), self.k), self.p)


def from_params(params: SamplingParams) -> Strategy:
    """The strategy for ``SamplingParams`` (``top_k=0`` and ``top_p=1`` mean off)."""
    if params.temperature == 0:
        return Greedy()
    t = float(params.temperature)
    if params.top_k and params.top_p < 1:
        return TopKTopP(params.top_k, float(params.top_p), t)
    if params.top_k:
        return TopK(params.top_k, t)
    if params.top_p < 1:
        return TopP(float(params.top_p), t)
    return Temperature(t)


@dataclasses.dataclass(frozen=True)
class Penalties:
    """``logits - frequency * counts - presence * (counts > 0)``, counts of the row's generated tokens.

    Static (hashable) like a strategy; ``apply`` works on any layout as long as ``counts`` has the
    layout of ``logits`` ([B, V] or vocabulary-major [V, B]).
    """

    presence: float = 0.0
    frequency: float = 0.0

    def apply(self, logits: jax.Array, counts: jax.Array) -> jax.Array:
        counts = counts.astype(jnp.float32)
        return logits - jnp.float32(self.frequency) * counts - jnp.float32(self.presence) * (counts > 0)


def penalties_from_params(params: SamplingParams) -> Penalties | None:
    """The penalties of ``params``; ``None`` when both are 0 (the decode loop then keeps no counts)."""
    if not (params.presence_penalty or params.frequency_penalty):
        return None
    return Penalties(float(params.presence_penalty), float(params.frequency_penalty))
