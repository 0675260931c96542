"""One context-distillation training step, ours (JAX, ``make_train_step``) vs a PyTorch reference, fp32.

Both sides run the same step on the same inputs and the same initial weights (a checkpoint
written once by transformers, loaded by ``load_checkpoint`` on our side):
teacher forward (frozen copy, its own token ids: a different "system prompt" prefix) + student
forward/backward + forward KL(teacher ‖ student) token-averaged over the loss positions +
global-norm clipping (1.0) + AdamW (no weight decay).

  * ``ours``: the real jitted step; hidden states are gathered at the loss positions and
    projected to the vocabulary chunk by chunk (no ``[batch, seq, vocab]`` tensor).
  * ``torch``: ``transformers.Qwen3ForCausalLM`` the way a typical implementation is written:
    teacher logits under ``torch.no_grad()`` for all positions, student logits for all
    positions, ``log_softmax`` over the full ``[B, T, V]`` tensors, KL masked to the loss
    positions, ``backward``, ``clip_grad_norm_``, ``torch.optim.AdamW``.

Shape (the distillation issue): hidden 512, 8 layers, 8 heads, 4 KV heads, vocab 151,936,
batch 2 x 1,024 tokens, 25 % of the tokens carry loss (four assistant-like spans per row).
Throughput counts all student tokens, like the trainer's ``student_tokens_per_second`` (its
``loss_tokens_per_second`` counts only the 25 % that carry loss). OpenMP threads wait passively
by default (``OMP_WAIT_POLICY=PASSIVE``, inherited by both workers): spinning waits slow PyTorch
down several-fold on cores other processes share, which would flatter us.

    python benchmarks/bench_train_step.py --rounds 3 --repeats 2
    python benchmarks/bench_train_step.py --sides=ours --chunk 256 --remat full   # a variant of ours
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import add_model_arguments, main_side_by_side, prepare_environment  # noqa: E402

CHECKPOINT = Path(tempfile.gettempdir()) / "expint_bench_distill_qwen3"
LEARNING_RATE = 1e-5
MAX_GRAD_NORM = 1.0
ROPE_THETA = 1_000_000.0  # Qwen3's; tunix's Qwen3 applies this base whatever its config says


def checkpoint_dir(args) -> Path:
    return CHECKPOINT / f"h{args.hidden}_l{args.layers}_v{args.vocab}"


def ensure_checkpoint(args) -> Path:
    """The random Qwen3 every side loads, written once by transformers (needs torch).

    Written to a staging directory and renamed into place, so a killed run never leaves a
    half-written checkpoint behind: a directory without ``config.json`` (left by an older run) is
    replaced, and a failed save removes its staging directory.
    """
    directory = checkpoint_dir(args)
    if (directory / "config.json").exists():
        return directory
    import torch
    import transformers

    torch.manual_seed(0)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        config = transformers.Qwen3Config(vocab_size=args.vocab, hidden_size=args.hidden,
                                          intermediate_size=3 * args.hidden, num_hidden_layers=args.layers,
                                          num_attention_heads=8, num_key_value_heads=4, head_dim=args.hidden // 8,
                                          tie_word_embeddings=False,
                                          rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA})
        transformers.Qwen3ForCausalLM(config).save_pretrained(staging)
        if directory.exists() and not (directory / "config.json").exists():
            shutil.rmtree(directory)  # incomplete: an interrupted save of an older version
        try:
            os.replace(staging, directory)
        except OSError:
            if not (directory / "config.json").exists():
                raise
            # another process completed the same checkpoint meanwhile (same seed: same weights)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone after a successful rename
    return directory


def add_arguments(parser):
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--prefix", type=int, default=128, help="leading tokens that differ between teacher and student")
    parser.add_argument("--spans", type=int, default=4, help="assistant-like loss spans per row")
    parser.add_argument("--loss-fraction", type=float, default=0.25)
    add_model_arguments(parser)
    parser.add_argument("--chunk", type=int, default=1024, help="ours: loss tokens per logits chunk")
    parser.add_argument("--remat", default="none", choices=("none", "dots", "full"),
                        help="ours: per-layer rematerialization")


def loss_positions(args):
    """Token positions that carry loss: ``spans`` equal spans spread over the part after the prefix."""
    import numpy as np

    span = round(args.seq * args.loss_fraction / args.spans)
    body = args.seq - args.prefix
    stride = body // args.spans
    if span < 1 or span > stride:
        raise ValueError(f"{args.spans} spans of {span} tokens do not fit in the {body} tokens after the prefix")
    starts = args.prefix + stride * np.arange(1, args.spans + 1) - span  # each span ends its stride
    return np.concatenate([np.arange(s, s + span) for s in starts])


def inputs(args):
    """``(student_ids, teacher_ids, loss_index, targets)``; ``loss_index`` = position - 1 (it predicts the target)."""
    import numpy as np

    rng = np.random.default_rng(0)
    student = rng.integers(0, args.vocab, size=(args.batch, args.seq), dtype=np.int64)
    teacher = student.copy()
    teacher[:, : args.prefix] = rng.integers(0, args.vocab, size=(args.batch, args.prefix))
    where = loss_positions(args)
    positions = np.broadcast_to(where, (args.batch, len(where)))
    targets = np.take_along_axis(student, positions, axis=1)
    return student, teacher, positions - 1, targets


def distill_batch(args):
    """The inputs as our ``DistillBatch`` (no step-wise branches: the teacher layout is one trunk)."""
    import numpy as np

    from expint_jax.distill.batch import DistillBatch

    student, teacher, index, targets = inputs(args)
    arange = np.broadcast_to(np.arange(args.seq, dtype=np.int32), student.shape)
    return DistillBatch(
        student_ids=student.astype(np.int32), student_valid=np.ones(student.shape, bool),
        teacher_ids=teacher.astype(np.int32), teacher_positions=arange.copy(),
        teacher_branch=np.zeros(student.shape, np.int32), teacher_attach=arange.copy(),
        teacher_valid=np.ones(student.shape, bool), student_loss_index=index.astype(np.int32),
        teacher_loss_index=index.astype(np.int32), targets=targets.astype(np.int32),
        weights=np.ones(targets.shape, np.float32),
    )


def ours(args):
    import jax
    from flax import nnx

    from expint_jax.distill.losses import Divergence
    from expint_jax.distill.optim import OptimizerConfig, make_optimizer
    from expint_jax.distill.step import StepConfig, init_train_state, make_train_step
    from expint_jax.models.hf import load_checkpoint
    from expint_jax.parallel.placement import shard_batch

    checkpoint = ensure_checkpoint(args)
    student = load_checkpoint(checkpoint, remat=args.remat)
    teacher_params = nnx.state(load_checkpoint(checkpoint), nnx.Param)
    tx, schedule = make_optimizer(OptimizerConfig(learning_rate=LEARNING_RATE, max_grad_norm=MAX_GRAD_NORM))
    graphdef, state = init_train_state(student, tx)
    del student  # the state owns the parameters now (and is donated to every step)
    step = make_train_step(graphdef, tx, schedule, StepConfig(Divergence("forward_kl"), chunk_size=args.chunk))
    batch = shard_batch(distill_batch(args), None)
    holder = {"state": state}

    def run():
        holder["state"], metrics = step(holder["state"], teacher_params, batch)
        return jax.block_until_ready(metrics["loss"])

    return run


def torch_side(args):
    import torch
    import torch.nn.functional as F
    import transformers

    checkpoint = ensure_checkpoint(args)
    student = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).train()
    teacher = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    teacher.requires_grad_(False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
    student_ids, teacher_ids, index, _ = (torch.as_tensor(x) for x in inputs(args))
    mask = torch.zeros(student_ids.shape, dtype=torch.float32).scatter_(1, index, 1.0)

    def run():
        with torch.no_grad():
            teacher_logp = F.log_softmax(teacher(input_ids=teacher_ids).logits, dim=-1)
        student_logp = F.log_softmax(student(input_ids=student_ids).logits, dim=-1)
        kl = F.kl_div(student_logp, teacher_logp, log_target=True, reduction="none").sum(-1)  # KL(teacher ‖ student)
        loss = (kl * mask).sum() / mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return run


if __name__ == "__main__":
    prepare_environment(passive_openmp=True)
    main_side_by_side(
        "Distillation train step (teacher fwd + student fwd/bwd + forward KL + AdamW), fp32",
        {"ours": ours, "torch": torch_side},
        add_arguments,
        lambda a: (a.batch * a.seq, "tokens"),
        reference="torch",
    )
