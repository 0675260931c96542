"""Is our Qwen3 the Hugging Face Qwen3? Logit parity against ``transformers`` and a parameter table.

Contract: ``build_tiny_checkpoint`` writes a random tiny Qwen3 in Hugging Face layout without
PyTorch; ``parameter_table`` lists every parameter with its shape, dtype, sharding and per-device
shape; ``check_parity`` runs ``transformers.Qwen3ForCausalLM`` (PyTorch, the ``parity`` extra) and
our model on the same random tokens in fp32 and returns the largest logit difference with its
tolerance. The ``expint check-model`` command (``cli/check_model.py``) prints them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from expint_jax.models.config import tiny
from expint_jax.models.hf import save_checkpoint
from expint_jax.models.init import init_model
from expint_jax.models.qwen3 import Qwen3

TINY_CONFIG = tiny(hidden_size=128, intermediate_size=256, num_heads=4, num_kv_heads=2, head_dim=32,
                   max_position_embeddings=4096)
PARITY_EXTRA_HINT = "pip install 'expint-jax[parity]' (or pass --no-parity)"


@dataclasses.dataclass(frozen=True)
class ParityResult:
    max_abs_diff: float
    tolerance: float
    tokens: int

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance


def build_tiny_checkpoint(directory: Path, seed: int = 0) -> Path:
    """A random tiny Qwen3 checkpoint (Hugging Face layout), made offline without PyTorch."""
    return save_checkpoint(init_model(TINY_CONFIG, seed=seed), directory, dtype="float32")


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def parameter_table(model: Qwen3) -> list[tuple[str, tuple[int, ...], str, str, tuple[int, ...]]]:
    """(path, global shape, dtype, partition spec, per-device shard shape) for every parameter."""
    rows = []
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = variable.get_value()
        spec = getattr(value.sharding, "spec", None)
        shard = value.addressable_shards[0].data.shape
        rows.append(("/".join(map(str, path)), tuple(value.shape), str(value.dtype), str(spec), tuple(shard)))
    return rows


def check_parity(model: Qwen3, checkpoint: Path, *, batch: int = 2, steps: int = 16, seed: int = 0,
                 tolerance: float = 1e-4) -> ParityResult:
    import torch
    import transformers

    reference = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, model.config.vocab_size, size=(batch, steps))
    positions = np.broadcast_to(np.arange(steps), (batch, steps))
    ours = np.asarray(jax.jit(lambda m, i, p: m(i, p))(model, jnp.asarray(ids), jnp.asarray(positions)))
    with torch.no_grad():
        theirs = reference(input_ids=torch.tensor(ids), position_ids=torch.tensor(np.array(positions))).logits.numpy()
    return ParityResult(float(np.max(np.abs(ours - theirs))), tolerance, batch * steps)
