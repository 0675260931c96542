"""Qwen3 in Flax NNX, Hugging Face checkpoint I/O, and the Qwen3 chat format.

The entry points below are the public API; deeper modules (``ops``, ``parity``) are internals.
"""

from expint_jax.exports import public_api

__getattr__, __dir__, __all__ = public_api(__name__, {
    "Qwen3": "qwen3", "KVCache": "qwen3",
    "Qwen3Config": "config", "DTypePolicy": "config", "preset": "config", "tiny": "config",
    "init_model": "init", "abstract_model": "init",
    "load_checkpoint": "hf", "save_checkpoint": "hf", "CheckpointError": "hf",
    "ChatFormat": "chat", "parse_answer": "chat", "strip_think": "chat",
    "load_tokenizer": "tokenizer",
})
