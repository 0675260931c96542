"""Where a run's model comes from: the ``model`` section of every run config, and building from it.

``ModelSpec`` names a Hugging Face Qwen3 directory (``checkpoint``) or, when that is empty, the
seeded tiny random Qwen3 of shape ``tiny`` (real Qwen3 vocabulary, so the real tokenizer works).
It also fixes the dtypes and the remat mode every model of the run is built with.

  * ``build_model(spec)`` -- the run's initial model: the checkpoint or the tiny random model.
  * ``load_model(directory, spec)`` -- a model a run exported (``save_checkpoint``), in the spec's
    dtypes: an iteration's trained policy, a distillation's student.
Both are pure in their inputs: the same spec and seed give the same parameters.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import jax

from expint_jax.models.config import DTypePolicy, tiny
from expint_jax.models.hf import load_checkpoint
from expint_jax.models.init import init_model
from expint_jax.models.qwen3 import Qwen3

Remat = Literal["none", "dots", "full"]


@dataclasses.dataclass(frozen=True)
class TinyModel:
    """Shape of the random Qwen3 used when no checkpoint is given."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    init_std: float = 0.02  # a larger std gives a random model that reacts to its context


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    checkpoint: str = ""  # Hugging Face Qwen3 directory; "" = tiny random model
    tiny: TinyModel = TinyModel()
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    remat: Remat = "none"  # used for the trained student; models that only run forward skip remat
    seed: int = 0
    # False: Qwen3's thinking-off mode for hybrid-thinking models (Qwen3-8B): every assistant turn
    # opens with an empty think block (models.chat); True for models without the switch.
    enable_thinking: bool = True

    @property
    def policy(self) -> DTypePolicy:
        return DTypePolicy(self.param_dtype, self.compute_dtype)

    def check_exists(self, where: str = "config.model.checkpoint") -> None:
        """Raises ``FileNotFoundError`` naming ``where`` when the checkpoint directory is missing."""
        if self.checkpoint and not (Path(self.checkpoint) / "config.json").exists():
            raise FileNotFoundError(f"{where}={self.checkpoint!r}: no Hugging Face checkpoint there "
                                    "(no config.json); give a Qwen3 directory, or '' for the tiny random model")


def build_model(spec: ModelSpec, mesh: jax.sharding.Mesh | None = None, *, remat: Remat = "none") -> Qwen3:
    """The run's initial model: ``spec.checkpoint`` or the seeded tiny random Qwen3, in the spec's dtypes."""
    if spec.checkpoint:
        return load_checkpoint(spec.checkpoint, mesh=mesh, policy=spec.policy, remat=remat)
    shape = dataclasses.asdict(spec.tiny)
    init_std = shape.pop("init_std")
    return init_model(tiny(**shape), mesh=mesh, policy=spec.policy, remat=remat, init_std=init_std, seed=spec.seed)


def load_model(directory: str | Path, spec: ModelSpec, mesh: jax.sharding.Mesh | None = None, *,
               remat: Remat = "none") -> Qwen3:
    """A model exported under ``directory`` (``save_checkpoint``), loaded in ``spec``'s dtypes."""
    directory = Path(directory)
    if not (directory / "config.json").exists():
        raise FileNotFoundError(f"{directory}: no exported model there (no config.json)")
    return load_checkpoint(directory, mesh=mesh, policy=spec.policy, remat=remat)
