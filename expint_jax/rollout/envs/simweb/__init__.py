"""SimWeb: an offline, seeded web of generated sites with search/visit tools and multi-hop questions.

``SimWebEnv`` is the environment; ``run_reference_agent`` (a scripted, tool-using agent) proves
the tasks solvable and produces ReAct-format trajectories, optionally with seeded mistakes.
``reference_agent.ReferencePolicy`` plays that agent as a chat backend inside ``ReActAgent``; with a
``sensitivity.Sensitivity`` it reacts to the experience in its context (the organism's designed
effects, written down in ``sensitivity.py``). ``writer`` is the offline experience writer; its
lesson texts and the agent's reading of them share one table (``lessons.py``).
"""

from expint_jax.rollout.envs.simweb.env import SimWebConfig, SimWebEnv

__all__ = ["SimWebConfig", "SimWebEnv"]
