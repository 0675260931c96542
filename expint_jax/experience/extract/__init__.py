"""LLM extraction of experience from scored rollouts (DESIGN.md section 2); entry: ``extract_experience``."""

from expint_jax.experience.extract.config import ExtractionConfig
from expint_jax.experience.extract.groups import RolloutGroup, group_rollouts
from expint_jax.experience.extract.pipeline import STAGES, extract_experience

__all__ = ["STAGES", "ExtractionConfig", "RolloutGroup", "extract_experience", "group_rollouts"]
