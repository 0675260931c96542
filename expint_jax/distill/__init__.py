"""Internalization: context distillation of an experience-conditioned teacher into a student.

The entry points below are the public API; deeper modules are internals.
"""

from expint_jax.exports import public_api

__getattr__, __dir__, __all__ = public_api(__name__, {
    "train": "trainer", "TrainerConfig": "trainer", "TrainResult": "trainer", "eval_batches": "trainer",
    "build_examples": "pipeline", "load_examples": "pipeline", "ExampleSet": "pipeline", "BatchingConfig": "pipeline",
    "build_example": "views", "ViewBudget": "views", "DistillExample": "views",
    "Divergence": "losses", "token_divergence": "losses",
    "StepConfig": "step", "make_train_step": "step", "make_eval_step": "step",
    "OptimizerConfig": "optim",
})
