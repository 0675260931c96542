"""The optimizer of context distillation: AdamW, linear warm-up then cosine decay, global-norm
clipping, and weight decay only on matrices (never on norms or biases)."""

from __future__ import annotations

import dataclasses

import jax
import optax
from flax import nnx


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 1e-5
    total_steps: int = 1000
    warmup_steps: int = 0
    end_lr_ratio: float = 0.0  # cosine decays to learning_rate * end_lr_ratio
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.learning_rate <= 0:
            raise ValueError(f"optimizer.learning_rate must be > 0, got {self.learning_rate}")
        if self.total_steps < 1:
            raise ValueError(f"optimizer.total_steps must be >= 1, got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"optimizer.warmup_steps={self.warmup_steps} must lie in [0, total_steps={self.total_steps}]")
        if self.max_grad_norm <= 0:
            raise ValueError(f"optimizer.max_grad_norm must be > 0, got {self.max_grad_norm}")


def learning_rate_schedule(config: OptimizerConfig) -> optax.Schedule:
    """Linear warm-up to ``learning_rate``, then cosine decay to ``learning_rate * end_lr_ratio`` at
    ``total_steps``. A run no longer than its warm-up (a short run) only warms up."""
    if config.warmup_steps >= config.total_steps:
        return optax.linear_schedule(0.0, config.learning_rate, config.total_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if config.warmup_steps else config.learning_rate,
        peak_value=config.learning_rate,
        warmup_steps=config.warmup_steps,
        decay_steps=config.total_steps,
        end_value=config.learning_rate * config.end_lr_ratio,
    )


def decay_mask(params: nnx.State) -> nnx.State:
    """True for parameters that get weight decay: everything but norms and biases."""

    def decays(path, _) -> bool:
        name = "/".join(str(getattr(p, "key", p)) for p in path)
        return "norm" not in name and "bias" not in name

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config: OptimizerConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = learning_rate_schedule(config)
    tx = optax.chain(
        optax.clip_by_global_norm(config.max_grad_norm),
        optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=config.weight_decay,
                    mask=decay_mask),
    )
    return tx, schedule
