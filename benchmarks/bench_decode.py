"""Greedy generation of a small Qwen3, ours (JAX sampler) vs transformers ``generate``, fp32.

Shape from the rollout-engine issue: hidden 512, 8 layers, 8 heads, 4 KV heads (the checkpoint of
``bench_forward``: head_dim 64, intermediate 1536, vocab 151,936); batch 8 x 256-token prompts
and exactly 128 new tokens on both sides (no eos: ours gets no eos ids, transformers
``eos_token_id=None`` with ``min_new_tokens``). Both sides load the same random weights. A call
is one whole generation (prefill + decode); tokens/s counts new tokens; the warm-up call holds
JAX's compilation and is reported apart.

OpenMP threads wait passively by default (``OMP_WAIT_POLICY=PASSIVE``, inherited by both
workers): with spinning waits PyTorch runs several times slower on cores that other processes
share, which would flatter us. Override the variable to measure the other setting.

    python benchmarks/bench_decode.py --rounds 2 --repeats 2
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_forward import ensure_checkpoint  # noqa: E402
from benchmarks.common import add_model_arguments, main_side_by_side, prepare_environment  # noqa: E402


def add_arguments(parser):
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--new", type=int, default=128)
    add_model_arguments(parser)


def prompts(args):
    import numpy as np

    return np.random.default_rng(0).integers(0, min(args.vocab, 151643), size=(args.batch, args.prompt))


def ours(args):
    from flax import nnx

    from expint_jax.models.hf import load_checkpoint
    from expint_jax.llm.sampler import Greedy, generate

    graphdef, state = nnx.split(load_checkpoint(ensure_checkpoint(args)))
    batch = list(prompts(args))
    return lambda: generate(graphdef, state, batch, strategy=Greedy(), max_new_tokens=args.new)


def transformers_side(args):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(ensure_checkpoint(args), dtype=torch.float32).eval()
    ids = torch.as_tensor(prompts(args))

    def run():
        with torch.inference_mode():
            return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=args.new,
                                  min_new_tokens=args.new, eos_token_id=None, pad_token_id=0)

    return run


if __name__ == "__main__":
    prepare_environment(passive_openmp=True)
    main_side_by_side(
        "Qwen3 greedy generation, fp32, exactly --new tokens per row (ours=JAX sampler, transformers=generate)",
        {"ours": ours, "transformers": transformers_side},
        add_arguments,
        lambda a: (a.batch * a.new, "new tokens"),
        reference="transformers",
    )
