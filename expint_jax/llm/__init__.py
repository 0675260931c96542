"""LLM backends behind one interface: ``ChatBackend.chat(conversations, params) -> completions``.

``LocalEngine`` runs our Qwen3 through the JAX sampler (``llm.sampler``); ``OpenAICompatible``
talks to vLLM, SGLang or a hosted API over HTTP (``llm.http``); ``PolicyServer`` starts such a
server on a checkpoint and stops it (``llm.server``; ``llm.serve`` is our engine behind that API).
The names below are the public API.
"""

from expint_jax.exports import public_api

__getattr__, __dir__, __all__ = public_api(__name__, {
    "ChatBackend": "base", "BackendError": "base", "LocalEngine": "local", "OpenAICompatible": "openai",
    "PolicyServer": "server", "ServerSpec": "server", "ServerError": "server",
})
