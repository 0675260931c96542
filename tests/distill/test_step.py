"""The jitted distillation step: exact loss, exact accumulation, sharded == single device, learning."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from expint_jax.distill.batch import bucket_shape, collate
from expint_jax.distill.losses import Divergence
from expint_jax.distill.optim import OptimizerConfig, make_optimizer
from expint_jax.distill.step import StepConfig, init_train_state, make_eval_step, make_train_step, shard_batch
from expint_jax.distill.views import build_example, tree_attention_mask
from expint_jax.models.config import tiny
from expint_jax.models.qwen3 import Qwen3
from expint_jax.parallel.mesh import MeshConfig, make_mesh
from expint_jax.parallel.placement import shard_model
from tests.distill.conftest import make_trajectory

CONFIG = tiny(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)


@pytest.fixture(scope="module")
def batch(chat):
    examples = [build_example(make_trajectory(turns, kind, task_id=f"t{i}"), chat)
                for i, (turns, kind) in enumerate([(2, "stepwise"), (3, "global"), (1, "stepwise"), (4, "stepwise")])]
    return collate(examples, bucket_shape(examples, rows=4, bucket=128, loss_bucket=64))


def _peaked(model):
    """Weights x5 (norms untouched): a random model at init scale is nearly uniform and ignores its
    context, which would leave a KL of ~1e-4, too small to test anything."""
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree_util.tree_map_with_path(lambda path, x: x if "norm" in str(path) else 5 * x, params))
    return model


def _models(seed=0):
    return _peaked(Qwen3(CONFIG, rngs=nnx.Rngs(seed))), _peaked(Qwen3(CONFIG, rngs=nnx.Rngs(seed)))


def _reference_forward_kl(student, teacher, batch):
    """Forward KL per loss token from full logits of both sides (small batch only)."""
    b = jax.tree.map(jnp.asarray, batch)
    rows, steps = b.student_ids.shape
    s_logits = student(b.student_ids, jnp.broadcast_to(jnp.arange(steps), (rows, steps)),
                       segment_ids=b.student_valid.astype(jnp.int32))
    mask = tree_attention_mask(b.teacher_branch, b.teacher_attach, b.teacher_valid)
    t_logits = teacher(b.teacher_ids, b.teacher_positions, attention_mask=mask)
    s = jax.nn.log_softmax(jnp.take_along_axis(s_logits, b.student_loss_index[..., None], 1), -1)
    t = jax.nn.log_softmax(jnp.take_along_axis(t_logits, b.teacher_loss_index[..., None], 1), -1)
    kl = jnp.sum(jnp.exp(t) * (t - s), -1)
    return float(jnp.sum(kl * b.weights) / jnp.sum(b.weights))


def _setup(divergence="forward_kl", micro_batches=1, lr=1e-3, seed=0):
    student, teacher = _models(seed)
    tx, schedule = make_optimizer(OptimizerConfig(learning_rate=lr, total_steps=100, warmup_steps=2))
    graphdef, state = init_train_state(student, tx)
    config = StepConfig(Divergence(divergence), chunk_size=96, micro_batches=micro_batches)
    step = make_train_step(graphdef, tx, schedule, config)
    teacher_params = nnx.state(teacher, nnx.Param)
    return graphdef, state, teacher_params, step, config


def test_loss_equals_full_logits_reference(batch):
    student, teacher = _models(0)
    teacher_params = nnx.state(teacher, nnx.Param)
    graphdef, params = nnx.split(student, nnx.Param)
    config = StepConfig(Divergence("forward_kl"), chunk_size=50)
    metrics = make_eval_step(graphdef, config)(params, teacher_params, shard_batch(batch, None))
    assert float(metrics["tokens"]) == float(batch.weights.sum()) and float(metrics["sequences"]) == 4
    np.testing.assert_allclose(float(metrics["loss"]), _reference_forward_kl(student, teacher, batch), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["kl"]), float(metrics["loss"]))


def test_micro_batch_accumulation_is_exact(batch):
    results = []
    for micro in (1, 2):
        _, state, teacher_params, step, _ = _setup(micro_batches=micro)
        state, metrics = step(state, teacher_params, shard_batch(batch, None))
        results.append((state, metrics))
    (s1, m1), *others = results
    for s, m in others:
        np.testing.assert_allclose(float(m["loss"]), float(m1["loss"]), rtol=1e-5)
        np.testing.assert_allclose(float(m["grad_norm"]), float(m1["grad_norm"]), rtol=1e-5)
        for a, b in zip(jax.tree.leaves(s.params), jax.tree.leaves(s1.params)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_sharded_step_equals_single_device_step(batch):
    _, state, teacher_params, step, _ = _setup()
    single_state, single_metrics = step(state, teacher_params, shard_batch(batch, None))

    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    student, teacher = _models(0)
    shard_model(student, mesh)
    shard_model(teacher, mesh)
    tx, schedule = make_optimizer(OptimizerConfig(learning_rate=1e-3, total_steps=100, warmup_steps=2))
    with jax.set_mesh(mesh):
        graphdef, state = init_train_state(student, tx)
        before = jax.tree.map(lambda x: x.sharding, state.params)
        sharded_step = make_train_step(graphdef, tx, schedule, StepConfig(Divergence("forward_kl"), chunk_size=96))
        state, metrics = sharded_step(state, nnx.state(teacher, nnx.Param), shard_batch(batch, mesh))
    kept = jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim), state.params, before)
    assert all(jax.tree.leaves(kept))
    assert state.params["layers"]["gate_proj"].get_value().sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    np.testing.assert_allclose(float(metrics["loss"]), float(single_metrics["loss"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(single_state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6)


def test_distilling_toward_experience_conditioned_teacher_lowers_kl(batch):
    _, state, teacher_params, step, _ = _setup(lr=3e-3)
    device_batch = shard_batch(batch, None)
    kls = []
    for _ in range(12):
        state, metrics = step(state, teacher_params, device_batch)
        kls.append(float(metrics["kl"]))
    assert kls[0] > 0
    assert kls[-1] < 0.5 * kls[0], kls
    assert sum(b < a for a, b in zip(kls, kls[1:])) >= 10, kls  # steadily, not just overall


@pytest.mark.parametrize("divergence", ["nll", "reverse_kl", "jsd", "sampled", "topk"])
def test_every_divergence_runs_and_reports_finite_metrics(batch, divergence):
    _, state, teacher_params, step, config = _setup(divergence=divergence)
    teacher = None if divergence == "nll" else teacher_params  # SFT never touches the teacher
    state, metrics = step(state, teacher, shard_batch(batch, None))
    assert all(np.isfinite(float(v)) for v in metrics.values())
    assert ("kl" in metrics) == (divergence != "nll")
    assert int(state.step) == 1 and float(metrics["learning_rate"]) == 0.0  # first warm-up step


def test_learning_rate_schedule_warms_up_then_decays():
    from expint_jax.distill.optim import learning_rate_schedule

    schedule = learning_rate_schedule(OptimizerConfig(learning_rate=1.0, total_steps=10, warmup_steps=2, end_lr_ratio=0.1))
    assert [float(schedule(s)) for s in (0, 1, 2)] == pytest.approx([0.0, 0.5, 1.0])
    assert float(schedule(10)) == pytest.approx(0.1) and float(schedule(6)) < 1.0
    short = learning_rate_schedule(OptimizerConfig(learning_rate=1.0, total_steps=2, warmup_steps=2))
    assert [float(short(s)) for s in (0, 1, 2)] == pytest.approx([0.0, 0.5, 1.0])
    with pytest.raises(ValueError, match="warmup_steps=5 must lie in"):
        OptimizerConfig(total_steps=3, warmup_steps=5)
