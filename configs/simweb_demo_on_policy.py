"""The SimWeb demo with on-policy distillation: the current student samples without experience, the
teacher's step-wise contexts are attached to its own prefixes, the loss is reverse KL, and the
samples are refreshed from the student's weights every epoch."""

from pathlib import Path

from expint_jax.config import load_config_file


def get_config():
    c = load_config_file(Path(__file__).with_name("simweb_demo.py"))
    c.name = "simweb_demo_on_policy"
    c.distill.regime = "on_policy"
    c.distill.on_policy.loss = "reverse_kl"
    c.distill.on_policy.refresh_every = 0  # every epoch
    return c
