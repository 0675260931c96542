"""Side-by-side speed and memory of the chunked divergence losses, value and gradient.

Compares, on the same inputs in one process, three ways to get the token-mean loss and its
gradient w.r.t. the student's hidden states and unembedding:
  * ``weighted``: :func:`expint_jax.distill.losses.chunked_weighted_loss`, what the train step uses
    (each chunk's logits formed once; the gradient is computed in the forward pass);
  * ``custom_vjp``: :func:`expint_jax.distill.losses.chunked_token_losses` (keeps only its inputs;
    the backward pass recomputes each chunk's logits and differentiates that chunk alone);
  * ``checkpoint``: the straightforward alternative, autodiff of ``token_divergence`` under
    ``jax.checkpoint`` inside ``lax.scan`` (defined here as the baseline).
Prints one table: median seconds per ``value_and_grad`` call, compiled peak temp memory, and the
time ratio checkpoint / variant (> 1 means the variant is faster than the baseline).

    python benchmarks/bench_losses.py --tokens 2048 --hidden 512 --vocab 151936 --chunk 512
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from jax import lax

from expint_jax.distill.losses import Divergence, chunked_token_losses, chunked_weighted_loss, token_divergence


def checkpoint_token_losses(
    student_hidden, student_unembed, teacher_hidden, teacher_unembed, targets, spec, chunk
):
    """Baseline: rematerialized autodiff per chunk (requires chunk to divide the token count)."""
    num_chunks = student_hidden.shape[0] // chunk

    @jax.checkpoint
    def chunk_losses(s_unembed, t_unembed, s_hidden, t_hidden, chunk_targets):
        s_logits = jnp.einsum("nd,vd->nv", s_hidden, s_unembed, preferred_element_type=jnp.float32)
        t_logits = jnp.einsum("nd,vd->nv", t_hidden, t_unembed, preferred_element_type=jnp.float32)
        return token_divergence(s_logits, lax.stop_gradient(t_logits), chunk_targets, spec)

    def step(carry, xs):
        return carry, chunk_losses(student_unembed, teacher_unembed, *xs)

    def split(x):
        return x.reshape((num_chunks, chunk) + x.shape[1:])

    _, losses = lax.scan(step, None, (split(student_hidden), split(teacher_hidden), split(targets)))
    return losses.reshape(-1)


def compile_step(objective, inputs):
    step = jax.jit(jax.value_and_grad(objective, argnums=(0, 1)))
    compiled = step.lower(*inputs).compile()
    jax.block_until_ready(compiled(*inputs))  # warm-up
    return compiled


def interleaved_medians(compiled: dict, inputs, repeats: int) -> dict[str, float]:
    """Alternates the variants call by call so load drift on a shared machine hits both alike."""
    times = {name: [] for name in compiled}
    for _ in range(repeats):
        for name, step in compiled.items():
            start = time.perf_counter()
            jax.block_until_ready(step(*inputs))
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kinds", default="forward_kl,reverse_kl,topk")
    args = parser.parse_args()
    if args.tokens % args.chunk:
        parser.error("--chunk must divide --tokens (the baseline does not pad)")

    keys = jax.random.split(jax.random.key(0), 5)
    n, d, v = args.tokens, args.hidden, args.vocab
    inputs = (
        jax.random.normal(keys[0], (n, d), jnp.float32),
        jax.random.normal(keys[1], (v, d), jnp.float32) / d**0.5,
        jax.random.normal(keys[2], (n, d), jnp.float32),
        jax.random.normal(keys[3], (v, d), jnp.float32) / d**0.5,
        jax.random.randint(keys[4], (n,), 0, v, jnp.int32),
    )
    print(f"{jax.devices()[0].device_kind}: N={n} D={d} V={v} chunk={args.chunk}, median of {args.repeats}")
    print(f"{'kind':<11} {'variant':<11} {'median s':>9} {'temp GB':>8} {'ckpt/variant':>13}")
    weights = jnp.full((n,), 1.0 / n, jnp.float32)
    for kind in args.kinds.split(","):
        spec = Divergence(kind)
        variants = {
            "weighted": lambda *a, spec=spec: chunked_weighted_loss(*a[:4], a[4], weights, spec,
                                                                   chunk_size=args.chunk)[0],
            "custom_vjp": lambda *a, spec=spec: jnp.mean(chunked_token_losses(*a, spec, chunk_size=args.chunk)),
            "checkpoint": lambda *a, spec=spec: jnp.mean(checkpoint_token_losses(*a, spec, args.chunk)),
        }
        compiled = {name: compile_step(fn, inputs) for name, fn in variants.items()}
        medians = interleaved_medians(compiled, inputs, args.repeats)
        for name, step in compiled.items():
            temp_gb = step.memory_analysis().temp_size_in_bytes / 1e9
            ratio = medians["checkpoint"] / medians[name]
            print(f"{kind:<11} {name:<11} {medians[name]:9.3f} {temp_gb:8.2f} {ratio:13.2f}")


if __name__ == "__main__":
    main()
