"""Ablation cell: qwen3_4b.py with SFT: NLL on the accepted teacher trajectories instead of a KL to the teacher (one axis changed)."""

from pathlib import Path

from expint_jax.config import load_config_file


def get_config(target="v5p-8"):
    c = load_config_file(Path(__file__).with_name("qwen3_4b.py"), target)
    c.name = "qwen3_4b_sft"
    c.distill.regime = "sft"
    return c
