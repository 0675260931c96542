"""LLM extraction of experience from scored rollouts (DESIGN.md section 2); entry: ``extract_experience``
(one step), ``run_extraction_steps`` (the release's multi-step outer loop)."""

from expint_jax.experience.extract.config import ExtractionConfig
from expint_jax.experience.extract.groups import RolloutGroup, group_rollouts
from expint_jax.experience.extract.pipeline import STAGES, extract_experience
from expint_jax.experience.extract.steps import StepPlan, problem_with_experience, run_extraction_steps

__all__ = ["STAGES", "ExtractionConfig", "RolloutGroup", "StepPlan", "extract_experience", "group_rollouts",
           "problem_with_experience", "run_extraction_steps"]
