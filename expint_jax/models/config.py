"""Qwen3 architecture hyper-parameters, read from and written to Hugging Face ``config.json``.

Contract:
  * ``Qwen3Config.from_hf(dict)`` accepts transformers 4 and 5 layouts (the RoPE base under
    ``rope_parameters.rope_theta`` or the older top-level ``rope_theta``) and refuses what this
    implementation does not compute (another ``model_type``, sliding windows, RoPE scaling other
    than the default) with an error that names the key.
  * ``to_hf()`` writes a ``config.json`` that ``transformers.Qwen3Config`` loads to the same model.
  * Presets (``preset("Qwen3-4B-Instruct-2507")``) are the published configs, shapes only.
  * ``DTypePolicy`` separates parameter storage dtype from compute dtype. Parameters are cast to
    the compute dtype where they are used and matmuls run in it; RMSNorm statistics, rotary angles
    and the attention softmax are computed in fp32 whatever the compute dtype. Logits are fp32:
    the vocabulary projection takes compute-dtype operands (bf16 under a bf16 policy) and
    accumulates and returns in fp32.
"""

from __future__ import annotations

import dataclasses
import json
from importlib import resources
from pathlib import Path
from typing import Any

import jax.numpy as jnp

SUPPORTED_MODEL_TYPES = ("qwen3",)
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class ConfigError(ValueError):
    """A model configuration this implementation cannot honour; the message names the key."""


@dataclasses.dataclass(frozen=True)
class DTypePolicy:
    param_dtype: str = "float32"
    compute_dtype: str = "float32"

    def __post_init__(self) -> None:
        for field in ("param_dtype", "compute_dtype"):
            if getattr(self, field) not in _DTYPES:
                raise ConfigError(f"DTypePolicy.{field}={getattr(self, field)!r}; choose one of {sorted(_DTYPES)}")

    @property
    def param(self) -> Any:
        return _DTYPES[self.param_dtype]

    @property
    def compute(self) -> Any:
        return _DTYPES[self.compute_dtype]


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    max_position_embeddings: int = 40960
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = 151645

    def __post_init__(self) -> None:
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim")
        for name in positive:
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"Qwen3Config.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads} (grouped-query attention)"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")

    @property
    def num_params(self) -> int:
        d, f, h, kv, hd = self.hidden_size, self.intermediate_size, self.num_heads, self.num_kv_heads, self.head_dim
        attention = d * hd * (2 * h + 2 * kv) + 2 * hd
        if self.attention_bias:
            attention += hd * (h + 2 * kv) + d
        per_layer = attention + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.num_layers * per_layer + d + head

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> Qwen3Config:
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type {model_type!r} is not supported (this model implements {SUPPORTED_MODEL_TYPES})"
            )
        if hf.get("use_sliding_window"):
            raise ConfigError(f"{source}: use_sliding_window=true is not supported (Qwen3 dense uses full attention)")
        rope = hf.get("rope_parameters") or {}
        scaling = hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
        if rope_type != "default":
            raise ConfigError(f"{source}: rope_type {rope_type!r} is not supported (only 'default' RoPE)")
        theta = rope.get("rope_theta", hf.get("rope_theta"))
        if theta is None:
            raise ConfigError(f"{source}: no RoPE base: expected rope_parameters.rope_theta or rope_theta")

        def need(key: str) -> Any:
            if key not in hf:
                raise ConfigError(f"{source}: missing key {key!r}")
            return hf[key]

        heads = need("num_attention_heads")
        return cls(
            vocab_size=need("vocab_size"),
            hidden_size=need("hidden_size"),
            intermediate_size=need("intermediate_size"),
            num_layers=need("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or need("hidden_size") // heads,
            rope_theta=float(theta),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", False)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 40960)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
        )

    def to_hf(self, torch_dtype: str = "float32") -> dict[str, Any]:
        return {
            "architectures": ["Qwen3ForCausalLM"],
            "model_type": "qwen3",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "attention_dropout": 0.0,
            "max_position_embeddings": self.max_position_embeddings,
            "use_sliding_window": False,
            "sliding_window": None,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": torch_dtype,
            "use_cache": True,
        }

    @classmethod
    def from_json_file(cls, path: str | Path) -> Qwen3Config:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        return cls.from_hf(data, source=str(path))


def preset_names() -> list[str]:
    files = resources.files("expint_jax.models").joinpath("presets").iterdir()
    return sorted(f.name.removesuffix(".json") for f in files if f.name.endswith(".json"))


def preset(name: str) -> Qwen3Config:
    """The published shape of a Qwen3 model, e.g. ``preset("Qwen3-1.7B")`` (case-insensitive)."""
    by_lower = {n.lower(): n for n in preset_names()}
    key = name.removeprefix("Qwen/").lower()
    if key not in by_lower:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(preset_names())}")
    text = resources.files("expint_jax.models").joinpath("presets", f"{by_lower[key]}.json").read_text()
    return Qwen3Config.from_hf(json.loads(text), source=f"preset {by_lower[key]}")


def tiny(**overrides: Any) -> Qwen3Config:
    """A tiny Qwen3 shape for tests and the CPU demo (vocabulary 151,936 keeps real token ids valid)."""
    base = dict(vocab_size=151936, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=32, rope_theta=1_000_000.0, tie_word_embeddings=True)
    base.update(overrides)
    return Qwen3Config(**base)
