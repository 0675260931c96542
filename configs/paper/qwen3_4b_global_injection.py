"""Ablation cell: qwen3_4b.py with global injection: the whole pool in the system prompt of every call (one axis changed)."""

from pathlib import Path

from expint_jax.config import load_config_file


def get_config(target="v5p-8"):
    c = load_config_file(Path(__file__).with_name("qwen3_4b.py"), target)
    c.name = "qwen3_4b_global_injection"
    c.injection.mode = "global"
    return c
