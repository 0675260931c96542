"""The paper's recipe: principle-level experience, step-wise injection, off-policy distillation.

The shared base of every cell of the paper's comparison (instance.py, global_injection.py,
on_policy.py, sft.py change one axis each). As shipped it runs anywhere: the tiny random Qwen3
and SimWeb's offline writer. The paper's setting is a real checkpoint and an LLM writer:

    expint run --config configs/recipe.py --config.model.checkpoint=/models/Qwen3-8B \
        --config.extract.writer=llm --config.extract.endpoint.base_url=https://api.deepseek.com/v1 \
        --config.extract.endpoint.model=deepseek-chat --config.extract.endpoint.api_key_env=DEEPSEEK_API_KEY

Every value not set here is the schema's default (expint_jax/loop/config.py).
"""

from expint_jax.config import config_dict
from expint_jax.loop.config import LoopConfig


def get_config():
    c = config_dict(LoopConfig, name="recipe")
    c.iterations = 3
    c.extract.granularity = "principle"
    c.injection.mode = "stepwise"
    c.injection.selector = "bm25"
    c.distill.regime = "off_policy"
    c.trainer.step.divergence.kind = "forward_kl"
    c.trainer.epochs = 2
    c.trainer.optimizer.learning_rate = 1e-5
    c.trainer.batching.rows = 8
    return c
