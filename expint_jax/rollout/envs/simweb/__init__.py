"""SimWeb: an offline, seeded web of generated sites with search/visit tools and multi-hop questions.

``SimWebEnv`` is the environment; ``run_reference_agent`` (a scripted, tool-using agent) proves
the tasks solvable and produces ReAct-format trajectories, optionally with seeded mistakes.
"""

from expint_jax.rollout.envs.simweb.env import SimWebConfig, SimWebEnv

__all__ = ["SimWebConfig", "SimWebEnv"]
