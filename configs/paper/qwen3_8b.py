"""The paper's recipe on Qwen3-8B (the paper turns thinking off; see below): principle +
stepwise + off_policy on WebWalkerQA. Hardware by the argument (base.py lists them); a v4-8
(4 x 32 GB) cannot hold the 8B model's fp32 weights, gradients and Adam moments beside the
frozen teacher, so it is refused.

    expint run --config=configs/paper/qwen3_8b.py:v5p-32 --config.model.checkpoint=/models/Qwen3-8B

Thinking off: Qwen3-8B is a hybrid model; its non-thinking mode opens every assistant turn with an
empty ``<think>\\n\\n</think>\\n\\n`` block (the chat template's ``enable_thinking=False``). The
loop's chat format (``models/chat.py``) has no switch for it yet; until it has, this config runs
the template's default generation prompt, under which the model may think.
"""

from pathlib import Path

from expint_jax.config import ConfigError, load_config_file


def get_config(target="v5p-8"):
    if target == "v4-8":
        raise ConfigError("configs/paper/qwen3_8b.py: Qwen3-8B does not fit a v4-8 (4 x 32 GB) for training; "
                          "use v5p-8, v5p-32 or 8xh100")
    c = load_config_file(Path(__file__).with_name("base.py"), target)
    c.name = "qwen3_8b"
    c.model.checkpoint = "/models/Qwen3-8B"
    return c
