"""The paper's recipe on Qwen3-8B with thinking off, as in the paper: principle + stepwise +
off_policy on WebWalkerQA. Hardware by the argument (base.py lists them; on v5p-8 and 8xh100 this
model uses the layouts of ``LAYOUTS`` below, with a tensor axis); a v4-8 (4 x 32 GB) cannot hold
the 8B model's fp32 weights, gradients and Adam moments beside the frozen teacher, so it is
refused.

    expint run --config=configs/paper/qwen3_8b.py:v5p-32 --config.model.checkpoint=/models/Qwen3-8B

Thinking off: Qwen3-8B is a hybrid model; ``model.enable_thinking=False`` opens every assistant
turn with the empty ``<think>\\n\\n</think>\\n\\n`` block of the chat template's
``enable_thinking=False`` (``models/chat.py``), in the rollouts' prompts and in the distillation
views alike. The ablation cells load this file, so they run with thinking off too.
"""

from pathlib import Path

from expint_jax.config import ConfigError, load_config_file


# target -> (mesh data, fsdp, tensor), micro-batches, where base.py's layout does not fit the 8B model:
# by the compile check (benchmarks/bench_compile_memory.py, BENCHMARKS.md) the train step on
# fsdp alone needs 98.9 GB per v5p chip; heads, MLP and vocabulary split over a tensor axis of 2
# (still one 32K row per fsdp group per micro-batch) bring it to 89.9 GB, and on 8 x H100 from
# 74.9 to 65.6 GB.
LAYOUTS = {"v5p-8": ((1, 2, 2), 64), "8xh100": ((1, 4, 2), 32)}


def get_config(target="v5p-8"):
    if target == "v4-8":
        raise ConfigError("configs/paper/qwen3_8b.py: Qwen3-8B does not fit a v4-8 (4 x 32 GB) for training; "
                          "use v5p-8, v5p-32 or 8xh100")
    c = load_config_file(Path(__file__).with_name("base.py"), target)
    c.name = "qwen3_8b"
    c.model.checkpoint = "/models/Qwen3-8B"
    c.model.enable_thinking = False
    if target in LAYOUTS:
        (c.mesh.data, c.mesh.fsdp, c.mesh.tensor), c.trainer.step.micro_batches = LAYOUTS[target]
    return c
