"""Qwen3 in Flax NNX, Hugging Face checkpoint I/O, and the Qwen3 chat format."""
