"""LLM backends behind one interface: ``ChatBackend.chat(conversations, params) -> completions``."""

from expint_jax.rollout.llm.base import BackendError, ChatBackend

__all__ = ["BackendError", "ChatBackend"]
