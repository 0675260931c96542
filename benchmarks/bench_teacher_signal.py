"""The distillation train step with the teacher signal from the rollout vs recomputing it, fp32.

Both sides run ``make_train_step`` with the ``topk`` divergence (top 64 + tail) on the same token
ids, loss positions and initial student weights, the shape of ``bench_train_step.py`` (hidden 512,
8 layers, vocab 151,936, batch 2 x 1,024 tokens, 25 % loss tokens, the teacher's first 128 tokens
differ from the student's):

  * ``recompute``: ``StepConfig(teacher="recompute", track_kl=False)``: the teacher (a frozen copy
    of the checkpoint, in memory) runs its forward pass inside the step, then the top-k buckets of
    its logits are taken chunk by chunk. ``track_kl=False`` is the cheapest recompute step (the
    default also reports forward KL, one more pass over the teacher's logits).
  * ``from_rollout``: ``StepConfig(teacher="from_rollout")``: the batch carries the teacher's top
    64 log-probabilities and tail mass at every loss token (``SignalBatch``, as recorded by the
    engine during the rollout; random values of that shape here: speed and memory do not depend
    on them), and no teacher parameters are loaded.

Throughput counts all student tokens, like ``bench_train_step.py`` (and the trainer's
``student_tokens_per_second``); peak RSS is the worker process's, so the recompute side includes
the teacher's parameters it must hold.

    python benchmarks/bench_teacher_signal.py --rounds 2 --repeats 2
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_train_step import (  # noqa: E402
    LEARNING_RATE,
    MAX_GRAD_NORM,
    add_arguments as add_train_step_arguments,
    distill_batch,
    ensure_checkpoint,
)
from benchmarks.common import main_side_by_side, prepare_environment  # noqa: E402


def add_arguments(parser):
    add_train_step_arguments(parser)
    parser.add_argument("--top-k", type=int, default=64, help="the divergence's k (and the recorded k)")


def signal_batch(args):
    """The benchmark's batch with a recorded teacher signal of k = ``--top-k`` at every loss slot."""
    import dataclasses

    import numpy as np

    from expint_jax.distill.batch import SignalBatch

    batch = distill_batch(args)
    rows, slots = batch.targets.shape
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((rows, slots, args.top_k + 1)) * 3
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    top = -np.sort(-logp[..., :-1], axis=-1)
    ids = np.stack([rng.choice(args.vocab, args.top_k, replace=False) for _ in range(rows * slots)])
    return SignalBatch(**{f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)},
                       teacher_top_ids=ids.reshape(rows, slots, args.top_k).astype(np.int32),
                       teacher_top_logprobs=top.astype(np.float32),
                       teacher_tail_logmass=logp[..., -1].astype(np.float32))


def step_side(teacher_mode: str):
    def build(args):
        import jax
        from flax import nnx

        from expint_jax.distill.losses import Divergence
        from expint_jax.distill.optim import OptimizerConfig, make_optimizer
        from expint_jax.distill.step import StepConfig, init_train_state, make_train_step
        from expint_jax.models.hf import load_checkpoint
        from expint_jax.parallel.placement import shard_batch

        checkpoint = ensure_checkpoint(args)
        student = load_checkpoint(checkpoint, remat=args.remat)
        recompute = teacher_mode == "recompute"
        teacher_params = nnx.state(load_checkpoint(checkpoint), nnx.Param) if recompute else None
        tx, schedule = make_optimizer(OptimizerConfig(learning_rate=LEARNING_RATE, max_grad_norm=MAX_GRAD_NORM))
        graphdef, state = init_train_state(student, tx)
        del student  # the state owns the parameters now (and is donated to every step)
        config = StepConfig(Divergence("topk", top_k=args.top_k), chunk_size=args.chunk, track_kl=False,
                            teacher=teacher_mode)
        step = make_train_step(graphdef, tx, schedule, config)
        batch = shard_batch(distill_batch(args) if recompute else signal_batch(args), None)
        holder = {"state": state}

        def run():
            holder["state"], metrics = step(holder["state"], teacher_params, batch)
            return jax.block_until_ready(metrics["loss"])

        return run

    return build


if __name__ == "__main__":
    prepare_environment(passive_openmp=True)  # as bench_train_step: torch may write the checkpoint
    main_side_by_side(
        "Distillation train step, topk divergence: teacher signal from the rollout vs recomputed, fp32",
        {"recompute": step_side("recompute"), "from_rollout": step_side("from_rollout")},
        add_arguments,
        lambda a: (a.batch * a.seq, "tokens"),
        reference="recompute",
    )
