"""Ablation cell: qwen3_4b.py with on-policy distillation (one axis changed): the student samples
without experience, the teacher scores its prefixes, the loss is reverse KL, and the samples are
refreshed from the student's weights every epoch."""

from pathlib import Path

from expint_jax.config import load_config_file


def get_config(target="v5p-8"):
    c = load_config_file(Path(__file__).with_name("qwen3_4b.py"), target)
    c.name = "qwen3_4b_on_policy"
    c.distill.regime = "on_policy"
    c.distill.on_policy.loss = "reverse_kl"
    c.distill.on_policy.refresh_every = 0  # every epoch
    return c
