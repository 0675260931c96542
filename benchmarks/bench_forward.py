"""Forward pass of a small Qwen3 (full logits), ours (JAX, jitted) vs transformers (PyTorch), fp32.

Shape from the foundation issue: hidden 512, 8 layers, 8 heads, 4 KV heads, head_dim 64,
intermediate 1536, vocab 151,936, batch 4 x 512 tokens. Both sides load the SAME random weights
(a checkpoint written once by transformers into a temp dir) and compute the same logits.

    python benchmarks/bench_forward.py --rounds 3 --repeats 3
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import add_model_arguments, main_side_by_side, prepare_environment  # noqa: E402

CHECKPOINT = Path(tempfile.gettempdir()) / "expint_bench_forward_qwen3"


def add_arguments(parser):
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    add_model_arguments(parser)


def ensure_checkpoint(args) -> Path:
    directory = CHECKPOINT / f"h{args.hidden}_l{args.layers}_v{args.vocab}"
    if (directory / "config.json").exists():
        return directory
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.Qwen3Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                                      num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                                      head_dim=args.hidden // 8, tie_word_embeddings=False)
    transformers.Qwen3ForCausalLM(config).save_pretrained(directory)
    return directory


def inputs(args):
    import numpy as np

    ids = np.random.default_rng(0).integers(0, args.vocab, size=(args.batch, args.seq))
    return ids, np.broadcast_to(np.arange(args.seq), ids.shape).copy()


def ours(args):
    import jax
    import jax.numpy as jnp

    from expint_jax.models.hf import load_checkpoint

    model = load_checkpoint(ensure_checkpoint(args))
    ids, positions = (jnp.asarray(x) for x in inputs(args))
    forward = jax.jit(lambda m, i, p: m(i, p))
    return lambda: forward(model, ids, positions).block_until_ready()


def torch_side(args):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(ensure_checkpoint(args), dtype=torch.float32).eval()
    ids, positions = (torch.as_tensor(x) for x in inputs(args))

    def run():
        with torch.inference_mode():
            return model(input_ids=ids, position_ids=positions).logits

    return run


if __name__ == "__main__":
    prepare_environment()
    main_side_by_side(
        "Qwen3 forward with full logits, fp32 (ours=JAX jit, transformers=PyTorch eager)",
        {"ours": ours, "transformers": torch_side},
        add_arguments,
        lambda a: (a.batch * a.seq, "tokens"),
        reference="transformers",
    )
