"""Rollout: the ReAct agent, environments (SimWeb, Math, web tools, WebWalkerQA), judges and the sandbox.

The entry points below are the public API; LLM backends and the sampler live in ``expint_jax.llm``.
"""

from expint_jax.exports import public_api

__getattr__, __dir__, __all__ = public_api(__name__, {
    "ReActAgent": "agent", "AgentConfig": "agent",
    "Task": "envs.base", "Environment": "envs.base",
    "SimWebEnv": "envs.simweb", "SimWebConfig": "envs.simweb",
    "MathEnv": "envs.math", "MathConfig": "envs.math",
    "WebQAEnv": "envs.webwalker", "load_webqa_tasks": "envs.webwalker",
    "Judge": "judge", "ExactMatchJudge": "judge", "LLMJudge": "judge", "Verdict": "judge",
})
