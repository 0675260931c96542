"""Qwen3 (dense) as a Flax NNX module, numerically the Hugging Face ``Qwen3ForCausalLM``.

Layout: the decoder layers' parameters are stacked along a leading ``layers`` axis and the
forward pass is one ``lax.scan`` of the pure function ``decoder_layer`` over them (compile time
independent of depth; optional rematerialization per layer). Every parameter carries
``logical_axes`` metadata and activations are constrained by logical names, so one rules table
(``expint_jax.parallel.rules``) decides the sharding.

Forward contract (all entry points take explicit position ids, which only drive RoPE):
  * ``model(ids, positions, segment_ids=...)`` or ``attention_mask=[B, T, T]`` -> fp32 logits.
  * ``model.hidden_states(...)`` -> final normalized hidden states [B, T, E] without the vocabulary
    projection (the distillation losses project chunk by chunk with ``model.unembedding()``).
  * ``model.extend(ids, positions, cache, token_valid)`` appends T tokens to a ``KVCache`` (from
    ``model.empty_cache``, in the compute dtype) and returns their hidden states and the new
    cache: prefill is an extend from an empty cache, decoding is an extend by one token, and a
    conversation can keep growing the same cache.
Exactly one of ``segment_ids`` (0 = padding; causal within equal ids) or ``attention_mask``
(boolean ``[B, T, T]``, e.g. a tree mask) may be given; with neither, plain causal attention.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from expint_jax.models import ops
from expint_jax.models.config import DTypePolicy, Qwen3Config
from expint_jax.parallel.rules import DEFAULT_RULES, LogicalRules, constrain

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

# Logical names of each stacked layer parameter (leading axis = layers).
LAYER_AXES: dict[str, tuple[str | None, ...]] = {
    "attn_norm": ("layers", "norm"),
    "q_proj": ("layers", "embed", "heads", "head_dim"),
    "k_proj": ("layers", "embed", "kv_heads", "head_dim"),
    "v_proj": ("layers", "embed", "kv_heads", "head_dim"),
    "o_proj": ("layers", "heads", "head_dim", "embed"),
    "q_norm": ("layers", "head_dim"),
    "k_norm": ("layers", "head_dim"),
    "mlp_norm": ("layers", "norm"),
    "gate_proj": ("layers", "embed", "mlp"),
    "up_proj": ("layers", "embed", "mlp"),
    "down_proj": ("layers", "mlp", "embed"),
    "q_bias": ("layers", "heads", "head_dim"),
    "k_bias": ("layers", "kv_heads", "head_dim"),
    "v_bias": ("layers", "kv_heads", "head_dim"),
    "o_bias": ("layers", "norm"),
}
CACHE_AXES = ("layers", "batch", "act_kv_heads", "seq", None)


def layer_shapes(config: Qwen3Config) -> dict[str, tuple[int, ...]]:
    """Shapes of the stacked layer parameters (without biases unless the config has them)."""
    c = config
    shapes = {
        "attn_norm": (c.num_layers, c.hidden_size),
        "q_proj": (c.num_layers, c.hidden_size, c.num_heads, c.head_dim),
        "k_proj": (c.num_layers, c.hidden_size, c.num_kv_heads, c.head_dim),
        "v_proj": (c.num_layers, c.hidden_size, c.num_kv_heads, c.head_dim),
        "o_proj": (c.num_layers, c.num_heads, c.head_dim, c.hidden_size),
        "q_norm": (c.num_layers, c.head_dim),
        "k_norm": (c.num_layers, c.head_dim),
        "mlp_norm": (c.num_layers, c.hidden_size),
        "gate_proj": (c.num_layers, c.hidden_size, c.intermediate_size),
        "up_proj": (c.num_layers, c.hidden_size, c.intermediate_size),
        "down_proj": (c.num_layers, c.intermediate_size, c.hidden_size),
    }
    if c.attention_bias:
        shapes |= {
            "q_bias": (c.num_layers, c.num_heads, c.head_dim),
            "k_bias": (c.num_layers, c.num_kv_heads, c.head_dim),
            "v_bias": (c.num_layers, c.num_kv_heads, c.head_dim),
            "o_bias": (c.num_layers, c.hidden_size),
        }
    return shapes


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys/values of every layer for a static number of slots, shared write pointer ``end``.

    ``k``/``v``: [layers, batch, kv_heads, slots, head_dim] (heads before slots: a decode step's
    attention reads each head's keys as one contiguous [slots, head_dim] matrix, no transpose);
    ``valid``: [batch, slots], True where a slot holds a real token (left padding stays False);
    ``end``: int32 scalar, the next free slot.
    """

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    end: jax.Array

    @classmethod
    def empty(cls, config: Qwen3Config, batch: int, slots: int, dtype: Any) -> KVCache:
        """An empty cache; ``Qwen3.empty_cache`` picks the model's compute dtype for ``dtype``."""
        shape = (config.num_layers, batch, config.num_kv_heads, slots, config.head_dim)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            valid=jnp.zeros((batch, slots), bool),
            end=jnp.zeros((), jnp.int32),
        )

    @property
    def num_slots(self) -> int:
        return self.k.shape[3]


def _check_room(cache: KVCache, steps: int) -> None:
    """Raises when appending ``steps`` tokens cannot fit, as far as trace time can tell."""
    if steps > cache.num_slots:
        raise ValueError(f"KVCache overflow: extending by {steps} tokens, but the cache has {cache.num_slots} slots")
    if isinstance(cache.end, jax.core.Tracer):  # under jit: unknown until run (see Qwen3.extend)
        return
    end = int(cache.end)
    if end + steps > cache.num_slots:
        raise ValueError(
            f"KVCache overflow: extending by {steps} tokens at slot {end} needs {end + steps} slots, "
            f"but the cache has {cache.num_slots}"
        )


def decoder_layer(
    params: dict[str, jax.Array],
    x: jax.Array,
    positions: jax.Array,
    mask: jax.Array | ops.BlockMask,
    cache: tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array] | None,
    *,
    config: Qwen3Config,
    compute_dtype: Any,
    rules: LogicalRules,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """One pre-norm decoder layer.

    ``cache`` is ``(k_all, v_all, layer, write_at, token_valid)``: every layer's keys/values
    [L, B, K, S, D]; the new tokens' keys/values are written in place at ``(layer, :, write_at)``,
    except where ``token_valid`` [B, T] is False (those slots keep what they held), and attention
    reads this layer's slots. Writing only the new tokens (instead of re-emitting the layer's whole
    cache as a scan output) keeps a decode step's memory traffic at one read of the cache.
    """
    c = config
    p = {name: w.astype(compute_dtype) for name, w in params.items()}

    h = ops.rms_norm(x, p["attn_norm"], c.rms_norm_eps)
    q = jnp.einsum("bte,ehd->bthd", h, p["q_proj"])
    k = jnp.einsum("bte,ehd->bthd", h, p["k_proj"])
    v = jnp.einsum("bte,ehd->bthd", h, p["v_proj"])
    if c.attention_bias:
        q, k, v = q + p["q_bias"], k + p["k_bias"], v + p["v_bias"]
    q = constrain(q, ("batch", "seq", "act_heads", None), rules)
    k = constrain(k, ("batch", "seq", "act_kv_heads", None), rules)
    q = ops.apply_rope(ops.rms_norm(q, p["q_norm"], c.rms_norm_eps), positions, c.rope_theta)
    k = ops.apply_rope(ops.rms_norm(k, p["k_norm"], c.rms_norm_eps), positions, c.rope_theta)

    new_cache = None
    if cache is not None:
        k_all, v_all, layer, write_at, token_valid = cache
        zero = jnp.zeros((), jnp.int32)
        start = (layer, zero, zero, write_at, zero)
        write = token_valid[None, :, None, :, None]

        def put(everything, new):  # [L, B, K, S, D] <- [B, T, K, D] at the new tokens' slots
            new = new.swapaxes(1, 2)[None].astype(everything.dtype)
            held = jax.lax.dynamic_slice(everything, start, new.shape)
            return jax.lax.dynamic_update_slice(everything, jnp.where(write, new, held), start)

        k_all, v_all = put(k_all, k), put(v_all, v)
        new_cache = (k_all, v_all)
        k = jax.lax.dynamic_index_in_dim(k_all, layer, axis=0, keepdims=False).astype(compute_dtype)
        v = jax.lax.dynamic_index_in_dim(v_all, layer, axis=0, keepdims=False).astype(compute_dtype)
        attn = ops.attention(q, k, v, mask, kv_heads_first=True)
    else:
        attn = ops.attention(q, k, v, mask)
    out = jnp.einsum("bthd,hde->bte", attn, p["o_proj"])
    if c.attention_bias:
        out = out + p["o_bias"]
    x = constrain(x + out, ("batch", "seq", "act_embed"), rules)

    h = ops.rms_norm(x, p["mlp_norm"], c.rms_norm_eps)
    mlp_axes = functools.partial(constrain, logical_axes=("batch", "seq", "act_mlp"), rules=rules)
    x = x + ops.swiglu_mlp(h, p["gate_proj"], p["up_proj"], p["down_proj"], mlp_axes)
    return constrain(x, ("batch", "seq", "act_embed"), rules), new_cache


class Qwen3(nnx.Module):
    def __init__(
        self,
        config: Qwen3Config,
        *,
        policy: DTypePolicy = DTypePolicy(),
        rules: LogicalRules = DEFAULT_RULES,
        remat: str = "none",
        init_std: float = 0.02,
        rngs: nnx.Rngs,
    ):
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat={remat!r}; choose one of {sorted(REMAT_POLICIES)}")
        self.config = config
        self.policy = policy
        self.rules = rules
        self.remat = remat
        dtype = policy.param
        normal = jax.nn.initializers.normal(init_std)

        def param(shape: tuple[int, ...], axes: tuple[str | None, ...], init: Any) -> nnx.Param:
            return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=axes)

        ones = jax.nn.initializers.ones
        zeros = jax.nn.initializers.zeros
        self.embed = param((config.vocab_size, config.hidden_size), ("vocab", "embed"), normal)
        self.layers = nnx.Dict({
            name: param(shape, LAYER_AXES[name], ones if "norm" in name else zeros if "bias" in name else normal)
            for name, shape in layer_shapes(config).items()
        })
        self.final_norm = param((config.hidden_size,), ("norm",), ones)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else param((config.vocab_size, config.hidden_size), ("vocab", "embed"), normal)
        )

    # -- projections ------------------------------------------------------------------------

    def unembedding(self) -> jax.Array:
        """The output projection as [vocab, embed] (the embedding itself when tied)."""
        return (self.embed if self.lm_head is None else self.lm_head)[...]

    def logits(self, hidden: jax.Array) -> jax.Array:
        """fp32 logits for hidden states [..., E]. Materializes [..., V]: use on few positions only."""
        w = self.unembedding().astype(self.policy.compute)
        out = jnp.einsum("...e,ve->...v", hidden.astype(w.dtype), w, preferred_element_type=jnp.float32)
        return out

    def vocab_major_logits(self, hidden: jax.Array) -> jax.Array:
        """fp32 logits [V, B] for hidden states [B, E]: the decode step's layout. The [V, E] weight
        is read row by row into a [V, B] result, which on CPU is about 1.5x faster than producing
        [B, V] when B is small; per-row reductions then run over axis 0."""
        w = self.unembedding().astype(self.policy.compute)
        return jnp.einsum("ve,be->vb", w, hidden.astype(w.dtype), preferred_element_type=jnp.float32)

    # -- forward passes ---------------------------------------------------------------------

    def __call__(self, input_ids, positions, *, segment_ids=None, attention_mask=None) -> jax.Array:
        hidden = self.hidden_states(input_ids, positions, segment_ids=segment_ids, attention_mask=attention_mask)
        return constrain(self.logits(hidden), ("batch", "seq", "act_vocab"), self.rules)

    def hidden_states(self, input_ids, positions, *, segment_ids=None, attention_mask=None) -> jax.Array:
        mask = self._mask(input_ids, segment_ids, attention_mask)
        hidden, _ = self._run(input_ids, positions, mask, cache=None)
        return hidden

    def empty_cache(self, batch: int, slots: int) -> KVCache:
        """An empty ``KVCache`` for this model, in its compute dtype (what ``extend`` writes)."""
        return KVCache.empty(self.config, batch, slots, self.policy.compute)

    def extend(self, input_ids, positions, cache: KVCache, token_valid=None) -> tuple[jax.Array, KVCache]:
        """Appends ``T`` tokens at slots ``[end, end + T)``; returns their hidden states and the cache.

        ``token_valid`` [B, T] marks real tokens (False for left padding); invalid tokens are never
        attended to and leave their slot as it was (its keys, values and validity), so a caller may
        fill slots of ``[end, end + T)`` beforehand, e.g. with a reused prefix, where its new tokens
        are padding. Each new token sees every valid cached slot before it and the valid new tokens
        up to itself.

        Overflow (``end + T`` > slots): a ``ValueError`` when it is known at trace time (``T`` >
        slots, or a concrete ``end``, as in eager calls). Under ``jit`` ``end`` is traced and cannot
        be checked without a host round trip, so the caller must leave room (the sampler sizes its
        cache for prompt + budget); an overflowing write would be clamped to the last slots and
        overwrite them, so such a call returns NaN hidden states rather than plausible wrong ones.
        """
        batch, steps = input_ids.shape
        _check_room(cache, steps)
        if token_valid is None:
            token_valid = jnp.ones((batch, steps), bool)
        slots = jnp.arange(cache.num_slots)
        held = jax.lax.dynamic_slice_in_dim(cache.valid, cache.end, steps, axis=1)
        valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, held | token_valid, cache.end, axis=1)
        query_slot = cache.end + jnp.arange(steps)
        mask = valid[:, None, :] & (slots[None, None, :] <= query_slot[None, :, None]) & token_valid[:, :, None]
        block = ops.extend_block(batch, self.config.num_heads)
        hidden, (k, v) = self._run(input_ids, positions, mask, cache=cache, token_valid=token_valid, block=block)
        end = cache.end + steps
        hidden = jnp.where(end > cache.num_slots, jnp.nan, hidden)  # see "Overflow" above
        return hidden, KVCache(k=k, v=v, valid=valid, end=end)

    # -- internals --------------------------------------------------------------------------

    def _mask(self, input_ids, segment_ids, attention_mask) -> jax.Array:
        if segment_ids is not None and attention_mask is not None:
            raise ValueError("pass segment_ids or attention_mask, not both")
        batch, steps = input_ids.shape
        if attention_mask is not None:
            if attention_mask.shape != (batch, steps, steps):
                raise ValueError(f"attention_mask has shape {attention_mask.shape}; expected {(batch, steps, steps)}")
            return attention_mask.astype(bool)
        if segment_ids is None:
            segment_ids = jnp.ones((batch, steps), jnp.int32)
        return ops.segment_mask(segment_ids, segment_ids, causal=True)

    def _run(self, input_ids, positions, mask, cache: KVCache | None, token_valid=None, block: int | None = None):
        compute = self.policy.compute
        # FSDP gathers a weight before use; for the lookup table that also keeps the compiler from
        # fighting over "fsdp", which shards both the table's embed dim and the batch of ids.
        table = constrain(self.embed[...], ("vocab", None), self.rules)
        x = jnp.take(table, input_ids, axis=0).astype(compute)
        x = constrain(x, ("batch", "seq", "act_embed"), self.rules)
        layer_params = {name: p[...] for name, p in self.layers.items()}
        mask = ops.prepare_mask(mask, input_ids.shape[1], block)  # tiled once, shared by every layer
        layer_fn = functools.partial(decoder_layer, config=self.config, compute_dtype=compute, rules=self.rules)
        policy = REMAT_POLICIES[self.remat]
        if self.remat != "none":
            layer_fn = jax.checkpoint(layer_fn, policy=policy, prevent_cse=False)

        if cache is None:
            def body(carry, params):
                out, _ = layer_fn(params, carry, positions, mask, None)
                return out, None

            x, _ = jax.lax.scan(body, x, layer_params)
            kv_out = None
        else:
            # The caches ride in the carry so each layer updates them in place.
            def body(carry, layer_inputs):
                x, k_all, v_all = carry
                params, layer = layer_inputs
                layer_cache = (k_all, v_all, layer, cache.end, token_valid)
                out, (k_all, v_all) = layer_fn(params, x, positions, mask, layer_cache)
                return (out, k_all, v_all), None

            layers = jnp.arange(self.config.num_layers, dtype=jnp.int32)
            (x, k_all, v_all), _ = jax.lax.scan(body, (x, cache.k, cache.v), (layer_params, layers))
            kv_out = (k_all, v_all)
        hidden = ops.rms_norm(x, self.final_norm[...].astype(compute), self.config.rms_norm_eps)
        return hidden, kv_out
