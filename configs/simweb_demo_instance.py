"""The SimWeb demo with instance-level experience (concrete, task-tied notes instead of principles)."""

from pathlib import Path

from expint_jax.config import load_config_file


def get_config():
    c = load_config_file(Path(__file__).with_name("simweb_demo.py"))
    c.name = "simweb_demo_instance"
    c.extract.granularity = "instance"
    return c
