"""expint-jax: continual experience internalization for self-evolving LLM agents, in JAX.

Data flow: ``rollout`` (agent + environments + LLM backends) -> ``experience`` (pools written
from scored trajectories) -> ``distill`` (context distillation of the pool into the weights) ->
``loop`` (iterations). ``models`` holds Qwen3 in Flax NNX, ``parallel`` the mesh and sharding rules.
"""

__version__ = "0.1.0"
