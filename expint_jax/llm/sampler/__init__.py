"""The JAX sampler: sampling strategies, stop strings, KV-cache prefill + decode, and prefix reuse."""

from expint_jax.llm.sampler.generation import (
    Generation, GenerationCounters, Layout, PromptBatch, bucket, decode, generate, prefill,
)
from expint_jax.llm.sampler.prefix_cache import PrefixCache
from expint_jax.llm.sampler.sampling import (
    Greedy, Penalties, Strategy, Temperature, TopK, TopKTopP, TopP, from_params, penalties_from_params,
)
from expint_jax.llm.sampler.stops import StopTable, TokenBytes, cut_at_stop

__all__ = [
    "Generation", "GenerationCounters", "Greedy", "Layout", "Penalties", "PrefixCache", "PromptBatch", "StopTable",
    "Strategy", "Temperature", "TokenBytes", "TopK", "TopKTopP", "TopP", "bucket", "cut_at_stop", "decode",
    "from_params", "generate", "penalties_from_params", "prefill",
]
