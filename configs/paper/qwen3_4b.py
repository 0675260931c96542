"""The paper's recipe on Qwen3-4B-Instruct-2507 (a non-thinking model): principle + stepwise +
off_policy on WebWalkerQA. Hardware by the argument (base.py lists them):

    expint run --config=configs/paper/qwen3_4b.py:v5p-8 \
        --config.model.checkpoint=/models/Qwen3-4B-Instruct-2507
"""

from pathlib import Path

from expint_jax.config import load_config_file


def get_config(target="v5p-8"):
    c = load_config_file(Path(__file__).with_name("base.py"), target)
    c.name = "qwen3_4b"
    c.model.checkpoint = "/models/Qwen3-4B-Instruct-2507"
    return c
