"""The recipe with global injection: the whole pool in the system prompt of every call."""

from pathlib import Path

from expint_jax.config import load_config_file


def get_config():
    c = load_config_file(Path(__file__).with_name("recipe.py"))
    c.name = "global_injection"
    c.injection.mode = "global"
    return c
