"""One logit-distillation training step, ours vs google-tunix's ``DistillationTrainer``, fp32, same inputs.

The inputs, shapes and weights are those of ``bench_train_step.py`` (hidden 512, 8 layers,
vocab 151,936, batch 2 x 1,024, 25 % loss tokens, teacher ids differ in a 128-token prefix; the
checkpoint written by transformers is loaded by each side's own loader).

  * ``ours``: ``make_train_step`` exactly as in ``bench_train_step.py``.
  * ``tunix``: ``tunix.distillation.DistillationTrainer`` with ``LogitStrategy(temperature=1,
    alpha=1)`` (pure KL(teacher ‖ student), the KL term scaled by T² = 1), ``tunix.models.qwen3``
    loaded with ``create_model_from_safe_tensors``, optax clip(1.0) + AdamW like ours. One step
    is what ``trainer.train`` does per batch: ``_prepare_inputs`` (the teacher forward, its own
    jitted call) then the jitted train step (student forward/backward + update).
    ``LogitStrategy`` has no loss mask (it averages over every position it is given), so the
    forward functions we hand it gather the logits at the loss positions; the Qwen3 model still
    projects every position to the vocabulary first, and the strategy also computes its
    cross-entropy terms (weight 0 at alpha=1) from one-hot labels, as its API requires. The
    teacher reads its own token ids: the trainer passes the same input dict to both forward
    functions, so the batch carries student and teacher ids stacked on axis 1.

tunix pins clash with this project's (e.g. ``safetensors<0.8``), so its worker runs in its own
virtualenv: ``$TUNIX_PYTHON`` (default ``../tunix-venv/bin/python`` next to the repository); see
``benchmarks/README.md`` for the set-up. Run the ``ours`` side first (the default order): it
writes the shared checkpoint, which needs torch, absent from the tunix virtualenv.

    python benchmarks/bench_tunix.py --rounds 2 --repeats 3
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.bench_train_step import add_arguments, checkpoint_dir, inputs, ours  # noqa: E402
from benchmarks.common import main_side_by_side, prepare_environment  # noqa: E402

TUNIX_PYTHON = os.environ.get("TUNIX_PYTHON", str(REPO.parent / "tunix-venv" / "bin" / "python"))
LEARNING_RATE = 1e-5
MAX_GRAD_NORM = 1.0


def existing_checkpoint(args) -> Path:
    directory = checkpoint_dir(args)
    if not (directory / "config.json").exists():
        raise FileNotFoundError(f"{directory}: no checkpoint; run the 'ours' side first (it writes one with "
                                "transformers and torch, which the tunix virtualenv lacks)")
    return directory


def tunix_model_config(checkpoint: Path):
    """tunix's Qwen3 ``ModelConfig`` for the transformers ``config.json`` in ``checkpoint``."""
    from tunix.models.qwen3 import model as qwen3

    hf = json.loads((checkpoint / "config.json").read_text())
    return qwen3.ModelConfig(
        num_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"], embed_dim=hf["hidden_size"],
        hidden_dim=hf["intermediate_size"], num_heads=hf["num_attention_heads"], head_dim=hf["head_dim"],
        num_kv_heads=hf["num_key_value_heads"], rope_theta=int(hf["rope_parameters"]["rope_theta"]),
        norm_eps=hf["rms_norm_eps"], use_tied_embedding=hf["tie_word_embeddings"],
    )


def tunix_side(args):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from tunix.distillation import distillation_trainer, strategies
    from tunix.models.qwen3 import params as qwen3_params
    from tunix.sft import utils as sft_utils

    checkpoint = existing_checkpoint(args)
    config = tunix_model_config(checkpoint)
    student = qwen3_params.create_model_from_safe_tensors(str(checkpoint), config)
    teacher = qwen3_params.create_model_from_safe_tensors(str(checkpoint), config)
    student_ids, teacher_ids, index, _ = inputs(args)
    loss_tokens = index.shape[1]
    # input_mask marks the tokens that carry loss (tunix's convention for completion tokens).
    loss_mask = np.zeros(student_ids.shape, bool)
    np.put_along_axis(loss_mask, index + 1, True, axis=1)

    def model_inputs(x):
        tokens = x.input_tokens  # [B, 2, T]: student ids, teacher ids
        rows, _, steps = tokens.shape
        valid = jnp.ones((rows, steps), bool)
        return {"student_tokens": tokens[:, 0], "teacher_tokens": tokens[:, 1], "loss_mask": x.input_mask,
                "positions": jnp.broadcast_to(jnp.arange(steps), (rows, steps)),
                "attention_mask": sft_utils.make_causal_attn_mask(valid)}

    def predicting_index(loss_mask):
        """[B, N] positions whose logits predict the loss tokens."""
        return jax.vmap(lambda row: jnp.nonzero(row, size=loss_tokens)[0])(loss_mask) - 1

    def at_loss(logits, loss_mask):
        return jnp.take_along_axis(logits, predicting_index(loss_mask)[..., None], axis=1)

    def student_forward(model, student_tokens, positions, attention_mask, loss_mask, **_):
        logits, _ = model(student_tokens, positions, None, attention_mask)
        return at_loss(logits, loss_mask)

    def teacher_forward(model, teacher_tokens, positions, attention_mask, loss_mask, **_):
        logits, _ = model(teacher_tokens, positions, None, attention_mask)
        return at_loss(logits, loss_mask)

    def labels(student_tokens, loss_mask, **_):
        targets = jnp.take_along_axis(student_tokens, predicting_index(loss_mask) + 1, axis=1)
        return jax.nn.one_hot(targets, config.vocab_size)

    strategy = strategies.LogitStrategy(student_forward_fn=student_forward, teacher_forward_fn=teacher_forward,
                                        labels_fn=labels, temperature=1.0, alpha=1.0)
    optimizer = optax.chain(optax.clip_by_global_norm(MAX_GRAD_NORM),
                            optax.adamw(LEARNING_RATE, weight_decay=0.0))
    trainer = distillation_trainer.DistillationTrainer(
        student_model=student, teacher_model=teacher, strategy=strategy, optimizer=optimizer,
        training_config=distillation_trainer.TrainingConfig(eval_every_n_steps=1_000_000, max_steps=None),
    ).with_gen_model_input_fn(model_inputs)
    train_step, _ = trainer.jit_train_and_eval_step(cache_nnx_graph=True)
    batch = distillation_trainer.TrainingInput(
        input_tokens=jnp.asarray(np.stack([student_ids, teacher_ids], axis=1), jnp.int32),
        input_mask=jnp.asarray(loss_mask),
    )

    def run():
        example = trainer._prepare_inputs(batch)  # the teacher forward, as trainer.train does per batch
        loss, _, _ = train_step(example)
        return jax.block_until_ready(loss)

    return run


if __name__ == "__main__":
    prepare_environment()
    main_side_by_side(
        "Logit distillation train step, ours vs google-tunix DistillationTrainer + LogitStrategy, fp32",
        {"ours": ours, "tunix": tunix_side},
        add_arguments,
        lambda a: (a.batch * a.seq, "tokens"),
        reference="tunix",
        interpreters={"tunix": TUNIX_PYTHON},
    )
