"""Runs the distillation trainer in a process of its own, so that a test can SIGKILL it mid-run.

Usage: ``python -m tests.distill.trainer_subprocess SPEC OUTPUT_DIR [STEP_DELAY_SECONDS]``

``SPEC`` is a pickle of ``{"config": TrainerConfig, "model": Qwen3Config, "train": ExampleSet,
"eval": ExampleSet | None}`` written by the test; ``OUTPUT_DIR`` is the run directory.
The student starts from seed 0 and the teacher from seed 1. ``STEP_DELAY_SECONDS`` slows every
step down (an ``on_step`` sleep) so that the test can kill the run between two checkpoints. On
success the final parameters are written to ``OUTPUT_DIR/final_params.npz`` (keyed by tree path).
"""

import dataclasses
import pickle
import sys
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from expint_jax.distill.trainer import train
from expint_jax.models.qwen3 import Qwen3


def main(spec_path: str, output_dir: str, step_delay: float = 0.0) -> None:
    spec = pickle.loads(Path(spec_path).read_bytes())
    config = dataclasses.replace(spec["config"], progress_bar=False)
    student, teacher = Qwen3(spec["model"], rngs=nnx.Rngs(0)), Qwen3(spec["model"], rngs=nnx.Rngs(1))
    on_step = (lambda step: time.sleep(step_delay)) if step_delay > 0 else None
    result = train(config, student, teacher, spec["train"], spec["eval"], output_dir=output_dir, on_step=on_step)
    leaves = jax.tree_util.tree_leaves_with_path(result.state.params)
    np.savez(Path(output_dir) / "final_params.npz", **{jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves})
    print(f"done: steps={result.steps} resumed_from={result.resumed_from}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]) if len(sys.argv) > 3 else 0.0)
