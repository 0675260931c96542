"""The SimWeb demo with SFT: NLL on the accepted teacher trajectories instead of a KL to the teacher.

The regime sets the loss (``loop/regimes.py``: sft trains with ``nll`` whatever
``trainer.step.divergence.kind`` says), so nothing else changes. With ``nll`` the trainer loads
no teacher model, so this cell's held-out KL is empty (the train summary's ``heldout_loss_*`` is
the held-out NLL)."""

from pathlib import Path

from expint_jax.config import load_config_file


def get_config():
    c = load_config_file(Path(__file__).with_name("simweb_demo.py"))
    c.name = "simweb_demo_sft"
    c.distill.regime = "sft"
    return c
