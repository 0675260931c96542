"""The recipe with SFT: NLL on the accepted teacher trajectories instead of a KL to the teacher."""

from pathlib import Path

from expint_jax.config import load_config_file


def get_config():
    c = load_config_file(Path(__file__).with_name("recipe.py"))
    c.name = "sft"
    c.distill.regime = "sft"
    return c
