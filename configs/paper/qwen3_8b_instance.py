"""Ablation cell: qwen3_8b.py with instance-level experience (concrete, task-tied notes instead of principles) (one axis changed)."""

from pathlib import Path

from expint_jax.config import load_config_file


def get_config(target="v5p-8"):
    c = load_config_file(Path(__file__).with_name("qwen3_8b.py"), target)
    c.name = "qwen3_8b_instance"
    c.extract.granularity = "instance"
    return c
