"""CI-sized loop: one iteration of every stage on a tiny random Qwen3, a few SimWeb tasks, about a
minute on 2 cores. `--config.policy.backend=reference` makes SimWeb's scripted agent act instead
of the random network, so that extraction, acceptance and distillation see real data.

    expint run --config configs/loop_tiny.py
"""

from expint_jax.config import config_dict
from expint_jax.loop.config import LoopConfig


def get_config():
    c = config_dict(LoopConfig, name="loop_tiny")
    c.iterations = 1
    c.model.tiny.init_std = 0.1
    c.mesh.devices = 1  # one device: a tiny model gains nothing from sharding, and compiles faster
    c.mesh.fsdp = 1
    c.policy.max_batch_size = 8
    c.policy.max_context = 2048
    c.simweb.levels = ("easy",)
    c.simweb.train_tasks_per_level = 4
    c.simweb.eval_tasks_per_level = 2
    c.agent.max_llm_calls = 3
    c.agent.max_tokens = 24
    c.agent.max_context_tokens = 1900
    c.extract.samples = 2
    c.extract.batch_tasks = 4
    c.distill.samples = 2
    c.distill.heldout_tasks = 2
    c.distill.accept_reward = 1.0
    c.eval.samples = 2
    c.budget.max_student_tokens = 2048
    c.budget.max_teacher_tokens = 4096
    c.trainer.epochs = 1
    c.trainer.batching.rows = 4
    c.trainer.batching.min_bucket = 256
    c.trainer.checkpoint_every = 2
    c.trainer.optimizer.learning_rate = 1e-3
    c.trainer.progress_bar = False
    c.trainer.step.chunk_size = 512
    c.progress_bar = False
    return c
