"""The jitted distillation step: exact loss, exact accumulation, sharded == single device, learning,
clipping, weight-decay mask, reductions, bfloat16 compute and bfloat16 parameters (fp32 master weights)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from expint_jax.distill.batch import bucket_shape, collate
from expint_jax.distill.losses import Divergence
from expint_jax.distill.optim import MasterWeightsState, OptimizerConfig, decay_mask, make_optimizer
from expint_jax.distill.step import (
    StepConfig, _split_micro_batches, init_train_state, make_eval_step, make_train_step)
from expint_jax.parallel.placement import shard_batch
from expint_jax.distill.views import build_example, tree_attention_mask
from expint_jax.models.config import DTypePolicy, tiny
from expint_jax.models.qwen3 import Qwen3
from expint_jax.parallel.mesh import MeshConfig, make_mesh
from expint_jax.parallel.placement import shard_model
from tests.distill.conftest import make_trajectory

CONFIG = tiny(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
SMALL = dataclasses.replace(CONFIG, vocab_size=512)  # with token ids folded into it: real layouts, cheap steps


@pytest.fixture(scope="module")
def batch(chat):
    examples = [build_example(make_trajectory(turns, kind, task_id=f"t{i}"), chat)
                for i, (turns, kind) in enumerate([(2, "stepwise"), (3, "global"), (1, "stepwise"), (4, "stepwise")])]
    return collate(examples, bucket_shape(examples, rows=4, bucket=128, loss_bucket=64))


@pytest.fixture(scope="module")
def small_batch(batch):
    fold = {"student_ids", "teacher_ids", "targets"}
    return dataclasses.replace(batch, **{name: getattr(batch, name) % SMALL.vocab_size for name in fold})


def _peaked(model):
    """Weights x5 (norms untouched): a random model at init scale is nearly uniform and ignores its
    context, which would leave a KL of ~1e-4, too small to test anything."""
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree_util.tree_map_with_path(lambda path, x: x if "norm" in str(path) else 5 * x, params))
    return model


def _models(seed=0, policy=DTypePolicy(), config=CONFIG):
    return (_peaked(Qwen3(config, policy=policy, rngs=nnx.Rngs(seed))),
            _peaked(Qwen3(config, policy=policy, rngs=nnx.Rngs(seed))))


def _reference_token_kl(student, teacher, batch) -> np.ndarray:
    """Forward KL at every loss slot [B, N] from full logits of both sides (small batch only)."""
    b = jax.tree.map(jnp.asarray, batch)
    rows, steps = b.student_ids.shape
    s_logits = student(b.student_ids, jnp.broadcast_to(jnp.arange(steps), (rows, steps)),
                       segment_ids=b.student_valid.astype(jnp.int32))
    mask = tree_attention_mask(b.teacher_branch, b.teacher_attach, b.teacher_valid)
    t_logits = teacher(b.teacher_ids, b.teacher_positions, attention_mask=mask)
    s = jax.nn.log_softmax(jnp.take_along_axis(s_logits, b.student_loss_index[..., None], 1), -1)
    t = jax.nn.log_softmax(jnp.take_along_axis(t_logits, b.teacher_loss_index[..., None], 1), -1)
    return np.asarray(jnp.sum(jnp.exp(t) * (t - s), -1), np.float64)


def _reference_forward_kl(student, teacher, batch):
    """Forward KL per loss token (token mean)."""
    return float(np.sum(_reference_token_kl(student, teacher, batch) * batch.weights) / np.sum(batch.weights))


def _setup(divergence="forward_kl", micro_batches=1, lr=1e-3, seed=0, reduction="token_mean", model_config=CONFIG):
    student, teacher = _models(seed, config=model_config)
    tx, schedule = make_optimizer(OptimizerConfig(learning_rate=lr, total_steps=100, warmup_steps=2))
    graphdef, state = init_train_state(student, tx)
    config = StepConfig(Divergence(divergence), reduction=reduction, chunk_size=96, micro_batches=micro_batches)
    step = make_train_step(graphdef, tx, schedule, config)
    teacher_params = nnx.state(teacher, nnx.Param)
    return graphdef, state, teacher_params, step, config


def _copy(tree):
    """Host copies (a donated state's buffers are gone after the step)."""
    return jax.tree.map(np.array, tree)


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


@pytest.mark.parametrize("master_weights", [False, True])
def test_optimizer_state_is_placed_like_the_parameters(master_weights):
    """Left to the compiler, jit(optimizer.init) replicated Adam's moments on every device."""
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    policy = DTypePolicy("bfloat16" if master_weights else "float32")
    student = shard_model(Qwen3(CONFIG, policy=policy, rngs=nnx.Rngs(0)), mesh)
    tx, _ = make_optimizer(OptimizerConfig(), master_weights=master_weights)
    with jax.set_mesh(mesh):
        _, state = init_train_state(student, tx)
    placed = {path[-2:]: x.sharding for path, x in jax.tree_util.tree_leaves_with_path(state.params)}
    mirrored = 0
    for path, x in jax.tree_util.tree_leaves_with_path(state.opt_state):
        if x.ndim == 0:  # step counts
            assert x.sharding.is_fully_replicated
            continue
        assert x.sharding.is_equivalent_to(placed[path[-2:]], x.ndim), jax.tree_util.keystr(path)
        mirrored += 1
    assert mirrored == len(placed) * (3 if master_weights else 2)  # mu, nu (and the master copy)
    embed = state.opt_state[1][0].mu["embed"] if not master_weights else state.opt_state.inner[1][0].mu["embed"]
    assert embed.get_value().sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")


def test_micro_batches_take_strided_rows_so_each_stays_on_the_devices_holding_it():
    rows = np.arange(8)
    micro = _split_micro_batches(rows, 2)
    np.testing.assert_array_equal(micro, [[0, 2, 4, 6], [1, 3, 5, 7]])
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    sharded = shard_batch(np.arange(8 * 3).reshape(8, 3), mesh)
    with jax.set_mesh(mesh):
        split = jax.jit(lambda x: _split_micro_batches(x, 2))(sharded)
    assert split.sharding.spec[:2] == (None, "fsdp")  # each micro-batch spread over the devices, no gather


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


def test_nll_on_the_teacher_view_is_sft_with_experience_in_context(batch):
    """student_view='teacher': the student's NLL is scored on the teacher's tree-packed layout (each
    turn with its own step-wise block), i.e. -mean log p(target | experience in context)."""
    model = _models(0)[0]
    graphdef, params = nnx.split(model, nnx.Param)
    b = jax.tree.map(jnp.asarray, batch)
    mask = tree_attention_mask(b.teacher_branch, b.teacher_attach, b.teacher_valid)
    logits = model(b.teacher_ids, b.teacher_positions, attention_mask=mask)
    logp = jax.nn.log_softmax(jnp.take_along_axis(logits, b.teacher_loss_index[..., None], 1), -1)
    nll = -np.asarray(jnp.take_along_axis(logp, b.targets[..., None], -1)[..., 0], np.float64)
    expected = float(np.sum(nll * batch.weights) / np.sum(batch.weights))
    config = StepConfig(Divergence("nll"), chunk_size=50, student_view="teacher")
    metrics = make_eval_step(graphdef, config)(params, None, shard_batch(batch, None))
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)
    plain = make_eval_step(graphdef, StepConfig(Divergence("nll"), chunk_size=50))(params, None, shard_batch(batch, None))
    assert abs(float(plain["loss"]) - expected) > 1e-3  # the experience in context changes the scores
    with pytest.raises(ValueError, match="student_view='teacher'.*nll"):
        StepConfig(Divergence("forward_kl"), student_view="teacher")


def test_learning_rate_schedule_warms_up_then_decays():
    from expint_jax.distill.optim import learning_rate_schedule

    schedule = learning_rate_schedule(OptimizerConfig(learning_rate=1.0, total_steps=10, warmup_steps=2, end_lr_ratio=0.1))
    assert [float(schedule(s)) for s in (0, 1, 2)] == pytest.approx([0.0, 0.5, 1.0])
    assert float(schedule(10)) == pytest.approx(0.1) and float(schedule(6)) < 1.0
    short = learning_rate_schedule(OptimizerConfig(learning_rate=1.0, total_steps=2, warmup_steps=2))
    assert [float(short(s)) for s in (0, 1, 2)] == pytest.approx([0.0, 0.5, 1.0])
    with pytest.raises(ValueError, match="warmup_steps=5 must lie in"):
        OptimizerConfig(total_steps=3, warmup_steps=5)


def test_sequence_sum_reduction_inside_the_step(small_batch):
    batch = small_batch
    student, teacher = _models(0, config=SMALL)
    per_token = _reference_token_kl(student, teacher, batch) * batch.weights
    # Two micro-batches: each row's sum lies whole in one of them, the count is the whole batch's.
    _, state, teacher_params, step, _ = _setup(micro_batches=2, reduction="sequence_sum", model_config=SMALL)
    state, metrics = step(state, teacher_params, shard_batch(batch, None))
    assert float(metrics["loss_count"]) == 4  # every row has loss tokens
    np.testing.assert_allclose(float(metrics["loss"]), per_token.sum(axis=1).mean(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["kl"]), per_token.sum() / batch.weights.sum(), rtol=1e-5)  # per token
    assert float(metrics["loss"]) > 10 * float(metrics["kl"])  # a sum over many tokens per row, not a mean
    assert np.isfinite(float(metrics["grad_norm"])) and float(metrics["grad_norm"]) > 0


def test_clipping_bounds_the_update_and_grad_norm_is_reported_before_clipping(small_batch):
    """With Adam's eps far above every gradient entry, AdamW's first update is linear in the
    (clipped) gradient: -lr * g / eps. Clipping a gradient 100x over the threshold must then
    shrink the update norm to lr * max_grad_norm / eps (lr is large so that the update stands far
    above float32 rounding of the parameters)."""
    lr, eps = 3.0, 10.0

    def one_step(max_grad_norm):
        student, teacher = _models(0, config=SMALL)
        tx, schedule = make_optimizer(OptimizerConfig(learning_rate=lr, eps=eps, max_grad_norm=max_grad_norm))
        graphdef, state = init_train_state(student, tx)
        before = _copy(state.params)
        step = make_train_step(graphdef, tx, schedule, StepConfig(Divergence("forward_kl"), chunk_size=96))
        state, metrics = step(state, nnx.state(teacher, nnx.Param), shard_batch(small_batch, None))
        delta = [np.asarray(a, np.float64) - b for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(before))]
        return float(metrics["grad_norm"]), float(np.sqrt(sum(np.sum(d * d) for d in delta)))

    grad_norm, free_update = one_step(max_grad_norm=1e9)  # never clips
    assert grad_norm < eps / 10  # so |g| << eps: the linear regime
    np.testing.assert_allclose(free_update, lr * grad_norm / eps, rtol=5e-2)
    threshold = grad_norm / 100
    clipped_grad_norm, clipped_update = one_step(max_grad_norm=threshold)
    np.testing.assert_allclose(clipped_grad_norm, grad_norm, rtol=1e-6)  # reported before clipping
    assert clipped_update <= lr * threshold / eps * (1 + 1e-4)
    np.testing.assert_allclose(clipped_update, lr * threshold / eps, rtol=1e-2)


def test_weight_decay_skips_norms_and_biases(small_batch):
    config = dataclasses.replace(SMALL, attention_bias=True)
    model = Qwen3(config, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree_util.tree_map_with_path(  # biases start at 0; make any decay visible
        lambda path, x: x + 1.0 if "bias" in jax.tree_util.keystr(path) else x, params))
    mask = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_leaves_with_path(decay_mask(params))}
    assert {k for k, m in mask.items() if not m} == {k for k in mask if "norm" in k or "bias" in k}
    assert mask["['embed'].value"] and mask["['layers']['q_proj'].value"]

    lr, weight_decay = 0.5, 0.1
    tx, schedule = make_optimizer(OptimizerConfig(learning_rate=lr, weight_decay=weight_decay))
    graphdef, state = init_train_state(model, tx)
    before = {jax.tree_util.keystr(p): np.array(x) for p, x in jax.tree_util.tree_leaves_with_path(state.params)}
    no_loss = dataclasses.replace(small_batch, weights=np.zeros_like(small_batch.weights))  # zero gradient: decay only
    step = make_train_step(graphdef, tx, schedule, StepConfig(Divergence("forward_kl"), chunk_size=96))
    state, _ = step(state, nnx.state(Qwen3(config, rngs=nnx.Rngs(1)), nnx.Param), shard_batch(no_loss, None))
    for path, after in jax.tree_util.tree_leaves_with_path(state.params):
        key = jax.tree_util.keystr(path)
        expected = before[key] * (1 - lr * weight_decay) if mask[key] else before[key]
        np.testing.assert_allclose(np.asarray(after), expected, rtol=1e-6, err_msg=key)


def test_bfloat16_compute_with_float32_parameters_matches_the_float32_step(small_batch):
    _, state, teacher_params, step, config = _setup(model_config=SMALL)
    _, fp32_metrics = step(state, teacher_params, shard_batch(small_batch, None))
    student, teacher = _models(0, policy=DTypePolicy("float32", "bfloat16"), config=SMALL)
    tx, schedule = make_optimizer(OptimizerConfig(learning_rate=1e-3, total_steps=100, warmup_steps=2))
    graphdef, state = init_train_state(student, tx)
    teacher_graphdef, bf16_teacher = nnx.split(teacher, nnx.Param)
    bf16_step = make_train_step(graphdef, tx, schedule, config, teacher_graphdef=teacher_graphdef)
    state, metrics = bf16_step(state, bf16_teacher, shard_batch(small_batch, None))
    assert all(np.isfinite(float(v)) for v in metrics.values())
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))  # the weights stay float32
    np.testing.assert_allclose(float(metrics["loss"]), float(fp32_metrics["loss"]), rtol=0.1)
    np.testing.assert_allclose(float(metrics["grad_norm"]), float(fp32_metrics["grad_norm"]), rtol=0.1)


def test_bfloat16_parameters_train_through_float32_master_weights(small_batch):
    """At lr 1e-5 an AdamW step is below bfloat16's resolution: without master weights it would
    vanish. The float32 master follows the float32 run exactly; the parameters are it rounded."""
    student, teacher = _models(0, policy=DTypePolicy("bfloat16", "float32"), config=SMALL)
    optimizer = OptimizerConfig(learning_rate=1e-5, total_steps=10)
    tx, schedule = make_optimizer(optimizer)
    with pytest.raises(ValueError, match=r"model\.param_dtype.*compute_dtype='bfloat16'"):
        init_train_state(student, tx)

    # A float32 run from the same (bfloat16-representable) values: with float32 compute, the same step.
    reference = Qwen3(SMALL, rngs=nnx.Rngs(0))
    nnx.update(reference, jax.tree.map(lambda x: x.astype(jnp.float32), nnx.state(student, nnx.Param)))
    teacher_params = nnx.state(teacher, nnx.Param)
    config = StepConfig(Divergence("forward_kl"), chunk_size=96)
    ref_graphdef, ref_state = init_train_state(reference, tx)
    ref_state, _ = make_train_step(ref_graphdef, tx, schedule, config)(ref_state, teacher_params,
                                                                      shard_batch(small_batch, None))

    master_tx, _ = make_optimizer(optimizer, master_weights=True)
    graphdef, state = init_train_state(student, master_tx)
    initial = _copy(state.params)
    step = make_train_step(graphdef, master_tx, schedule, config)
    state, metrics = step(state, teacher_params, shard_batch(small_batch, None))
    assert np.isfinite(float(metrics["loss"])) and isinstance(state.opt_state, MasterWeightsState)
    moved = kept = same = total = 0
    for master, param, expected, start in zip(jax.tree.leaves(state.opt_state.master), jax.tree.leaves(state.params),
                                              jax.tree.leaves(ref_state.params), jax.tree.leaves(initial)):
        assert master.dtype == jnp.float32 and param.dtype == jnp.bfloat16
        # Gradients w.r.t. bfloat16 parameters arrive rounded to bfloat16, so the few entries whose
        # gradient is near Adam's eps may take a different (still <= lr) step than in float32.
        difference = np.abs(np.asarray(master) - np.asarray(expected))
        assert difference.max() <= 2 * optimizer.learning_rate
        same += int(np.sum(difference <= 1e-7))
        np.testing.assert_array_equal(np.asarray(param), np.asarray(master.astype(jnp.bfloat16)))
        moved += int(np.sum(np.asarray(master) != np.asarray(start, np.float32)))
        kept += int(np.sum(np.asarray(param) == start))
        total += start.size
    assert same > 0.999 * total  # the master follows the float32 run
    assert moved > 0.9 * total  # the master took the step...
    assert kept > 0.9 * total  # ...which rounding to bfloat16 would have lost almost everywhere
    for _ in range(2):
        state, metrics = step(state, teacher_params, shard_batch(small_batch, None))
    assert np.isfinite(float(metrics["loss"])) and int(state.step) == 3
