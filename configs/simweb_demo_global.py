"""The SimWeb demo with global injection: the whole pool in the system prompt of every call."""

from pathlib import Path

from expint_jax.config import load_config_file


def get_config():
    c = load_config_file(Path(__file__).with_name("simweb_demo.py"))
    c.name = "simweb_demo_global"
    c.injection.mode = "global"
    return c
