"""Tiny random Hugging Face Qwen3 checkpoints, made locally with transformers (no downloads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers


def hf_config(**overrides) -> transformers.Qwen3Config:
    base = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=24, max_position_embeddings=512, rope_theta=1e6,
                tie_word_embeddings=False, attention_bias=False, rms_norm_eps=1e-6)
    base.update(overrides)
    theta = base.pop("rope_theta")
    cfg = transformers.Qwen3Config(**base)
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": theta}
    return cfg


def make_checkpoint(directory: Path, seed: int = 0, dtype: torch.dtype = torch.float32,
                    **overrides) -> transformers.Qwen3ForCausalLM:
    """Saves a random Qwen3 (norm weights randomized too, so they are really tested) to ``directory``.

    ``dtype`` is the stored dtype (real Qwen3 checkpoints are bf16); the returned model has it too.
    """
    torch.manual_seed(seed)
    model = transformers.Qwen3ForCausalLM(hf_config(**overrides)).eval().to(torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif "bias" in name:
                p.copy_(0.05 * torch.randn_like(p))
    model = model.to(dtype)
    model.save_pretrained(directory, safe_serialization=True)
    return model


def hf_logits(model, ids: np.ndarray, positions: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    with torch.no_grad():
        out = model(
            input_ids=torch.as_tensor(ids, dtype=torch.long),
            position_ids=torch.tensor(np.array(positions), dtype=torch.long),
            attention_mask=None if mask is None else torch.as_tensor(mask, dtype=torch.long),
        )
    return out.logits.float().numpy()
