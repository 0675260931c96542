"""Divergence losses against an independent float64 NumPy reference (values and gradients),
chunking invariance, teacher isolation, reductions, and the no-[N, V]-buffer memory bound."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from expint_jax.distill.losses import (
    Divergence,
    LossSums,
    chunked_token_losses,
    chunked_weighted_loss,
    reduce_losses,
    token_divergence,
)

VOCAB = 11

SPECS = [
    Divergence("forward_kl", temperature=0.5),
    Divergence("reverse_kl", temperature=2.0),
    Divergence("jsd", beta=0.0),
    Divergence("jsd", beta=0.3),
    Divergence("jsd", beta=0.5, temperature=1.7),
    Divergence("jsd", beta=0.9),
    Divergence("jsd", beta=1.0, temperature=0.5),
    Divergence("sampled", temperature=0.7),
    Divergence("topk", top_k=1),
    Divergence("topk", top_k=4, temperature=2.0),
    Divergence("topk", top_k=VOCAB - 1),
    Divergence("nll", temperature=1.5),
]
ONE_PER_KIND = [
    Divergence(kind, beta=0.3, top_k=3)
    for kind in ("forward_kl", "reverse_kl", "jsd", "sampled", "topk", "nll")
]


# ---------------------------------------------------------------- float64 NumPy reference


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def reference_losses(student_logits, teacher_logits, targets, spec: Divergence) -> np.ndarray:
    temperature = spec.temperature
    rows = np.arange(len(targets))
    log_q = np_log_softmax(np.asarray(student_logits, np.float64) / temperature)
    if spec.kind == "nll":
        return -log_q[rows, targets]
    log_p = np_log_softmax(np.asarray(teacher_logits, np.float64) / temperature)
    p, q = np.exp(log_p), np.exp(log_q)
    if spec.kind == "sampled":
        return log_q[rows, targets] - log_p[rows, targets]
    if spec.kind == "forward_kl" or (spec.kind == "jsd" and spec.beta == 0.0):
        loss = np.sum(p * (log_p - log_q), axis=-1)
    elif spec.kind == "reverse_kl" or (spec.kind == "jsd" and spec.beta == 1.0):
        loss = np.sum(q * (log_q - log_p), axis=-1)
    elif spec.kind == "jsd":
        mixture = spec.beta * p + (1 - spec.beta) * q
        loss = spec.beta * np.sum(p * np.log(p / mixture), -1) + (1 - spec.beta) * np.sum(
            q * np.log(q / mixture), -1
        )
    else:
        top = np.argsort(-log_p, axis=-1, kind="stable")[:, : spec.top_k]
        in_tail = np.ones(p.shape, bool)
        in_tail[rows[:, None], top] = False

        def buckets(probs):
            tail = np.where(in_tail, probs, 0.0).sum(axis=-1, keepdims=True)
            return np.concatenate([np.take_along_axis(probs, top, axis=-1), tail], axis=-1)

        p_buckets, q_buckets = buckets(p), buckets(q)
        loss = np.sum(p_buckets * np.log(p_buckets / q_buckets), axis=-1)
    return temperature**2 * loss


def reference_objective(base_student_logits, teacher_logits, targets, weights, spec: Divergence):
    """The function of the student logits whose gradient at ``base_student_logits`` is expected:
    Σ w·loss, except for `sampled`: Σ w·stop_grad(log ratio at the base)·log q(y)."""
    if spec.kind != "sampled":
        return lambda logits: float(np.sum(weights * reference_losses(logits, teacher_logits, targets, spec)))
    log_ratio = reference_losses(base_student_logits, teacher_logits, targets, spec)
    nll = dataclasses.replace(spec, kind="nll")
    return lambda logits: float(np.sum(weights * log_ratio * -reference_losses(logits, None, targets, nll)))


def numeric_grad(fn, x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    x = np.asarray(x, np.float64)
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        plus, minus = x.copy(), x.copy()
        plus[index] += eps
        minus[index] -= eps
        grad[index] = (fn(plus) - fn(minus)) / (2 * eps)
    return grad


def random_problem(
    seed: int, tokens: int = 6, vocab: int = VOCAB, student_width: int = 4, teacher_width: int = 5
):
    rng = np.random.default_rng(seed)
    weights = rng.uniform(0.5, 2.0, tokens).astype(np.float32)
    weights[::3] = 0.0  # padding positions
    return dict(
        student_hidden=rng.normal(size=(tokens, student_width)).astype(np.float32),
        student_unembed=rng.normal(size=(vocab, student_width)).astype(np.float32),
        teacher_hidden=rng.normal(size=(tokens, teacher_width)).astype(np.float32),
        teacher_unembed=rng.normal(size=(vocab, teacher_width)).astype(np.float32),
        targets=rng.integers(0, vocab, tokens).astype(np.int32),
        weights=weights,
    )


@functools.partial(jax.jit, static_argnums=3)
def weighted_divergence_grad(student_logits, teacher_logits, targets, spec, weights):
    """(per-token losses, d Σ w·loss / d student_logits)."""

    def objective(logits):
        losses = token_divergence(logits, teacher_logits, targets, spec)
        return jnp.sum(weights * losses), losses

    (_, losses), grad = jax.value_and_grad(objective, has_aux=True)(student_logits)
    return losses, grad


def chunked_objective(problem, spec: Divergence, chunk_size: int, implementation: str = "per_token"):
    """jitted (value, (d student_hidden, d student_unembed, d teacher_hidden, d teacher_unembed)).

    The objective Σ weights · loss comes from ``chunked_token_losses`` (``per_token``) or from
    ``chunked_weighted_loss`` (``weighted``: gradients formed in the forward pass).
    """

    def objective(s_hidden, s_unembed, t_hidden, t_unembed):
        if implementation == "weighted":
            return chunked_weighted_loss(s_hidden, s_unembed, t_hidden, t_unembed, problem["targets"],
                                         problem["weights"], spec, chunk_size=chunk_size)
        losses = chunked_token_losses(
            s_hidden, s_unembed, t_hidden, t_unembed, problem["targets"], spec, chunk_size=chunk_size
        )
        return jnp.sum(problem["weights"] * losses), losses

    fn = jax.jit(jax.value_and_grad(objective, argnums=(0, 1, 2, 3), has_aux=True))
    return fn(
        problem["student_hidden"],
        problem["student_unembed"],
        problem["teacher_hidden"],
        problem["teacher_unembed"],
    )


IMPLEMENTATIONS = ["per_token", "weighted"]


# ---------------------------------------------------------------- Divergence validation


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kind="kl"), "kind must be one of"),
        (dict(kind="jsd", beta=-0.1), "beta must lie in"),
        (dict(kind="jsd", beta=1.5), "beta must lie in"),
        (dict(kind="jsd", beta=float("nan")), "beta must lie in"),
        (dict(kind="topk", top_k=0), "top_k must be an integer >= 1"),
        (dict(kind="topk", top_k=True), "top_k must be an integer >= 1"),
        (dict(kind="topk", top_k=2.0), "top_k must be an integer >= 1"),
        (dict(kind="forward_kl", temperature=0.0), "temperature must be finite and > 0"),
        (dict(kind="forward_kl", temperature=-1.0), "temperature must be finite and > 0"),
        (dict(kind="forward_kl", temperature=float("inf")), "temperature must be finite and > 0"),
    ],
)
def test_divergence_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Divergence(**kwargs)


def test_divergence_is_a_static_jit_argument():
    assert hash(Divergence("jsd", beta=0.3)) == hash(Divergence("jsd", beta=0.3))
    fn = jax.jit(token_divergence, static_argnums=3)
    logits = jnp.zeros((2, 5))
    targets = jnp.array([0, 4])
    np.testing.assert_allclose(fn(logits, logits, targets, Divergence("reverse_kl")), 0.0, atol=1e-7)
    np.testing.assert_allclose(fn(logits, None, targets, Divergence("nll")), np.log(5.0), rtol=1e-6)


# ---------------------------------------------------------------- token_divergence on logits


@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_token_divergence_matches_numpy_values_and_gradients(spec):
    rng = np.random.default_rng(0)
    student = rng.normal(scale=2.0, size=(5, VOCAB)).astype(np.float32)
    teacher = rng.normal(scale=2.0, size=(5, VOCAB)).astype(np.float32)
    targets = rng.integers(0, VOCAB, 5).astype(np.int32)
    weights = np.array([1.0, 0.0, 0.5, 2.0, 0.0], np.float32)

    losses, grad = weighted_divergence_grad(student, teacher, targets, spec, weights)
    assert losses.dtype == jnp.float32 and losses.shape == (5,)
    np.testing.assert_allclose(
        losses, reference_losses(student, teacher, targets, spec), rtol=1e-5, atol=1e-6
    )
    expected = numeric_grad(reference_objective(student, teacher, targets, weights, spec), student)
    np.testing.assert_allclose(grad, expected, atol=2e-5)
    assert not np.any(np.asarray(grad)[weights == 0.0]), "zero-weight tokens must get zero gradient"


def test_jsd_endpoints_are_exactly_forward_and_reverse_kl():
    rng = np.random.default_rng(1)
    student, teacher = (jnp.asarray(rng.normal(size=(4, VOCAB)), jnp.float32) for _ in range(2))
    targets = jnp.zeros(4, jnp.int32)
    for beta, kind in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        jsd = token_divergence(student, teacher, targets, Divergence("jsd", beta=beta, temperature=1.3))
        kl = token_divergence(student, teacher, targets, Divergence(kind, temperature=1.3))
        np.testing.assert_array_equal(jsd, kl)


def test_temperature_scales_kl_by_t_squared_but_not_sampled_or_nll():
    rng = np.random.default_rng(2)
    student, teacher = (rng.normal(size=(3, VOCAB)).astype(np.float32) for _ in range(2))
    targets = np.array([1, 2, 3], np.int32)
    temperature = 2.5
    for kind in ("forward_kl", "reverse_kl", "jsd", "topk"):
        hot = token_divergence(student, teacher, targets, Divergence(kind, top_k=3, temperature=temperature))
        unscaled = token_divergence(
            student / temperature, teacher / temperature, targets, Divergence(kind, top_k=3)
        )
        np.testing.assert_allclose(hot, temperature**2 * unscaled, rtol=1e-5)
    for kind in ("sampled", "nll"):
        hot = token_divergence(student, teacher, targets, Divergence(kind, temperature=temperature))
        unscaled = token_divergence(student / temperature, teacher / temperature, targets, Divergence(kind))
        np.testing.assert_allclose(hot, unscaled, rtol=1e-5)


def test_sampled_value_is_log_ratio_and_gradient_is_score_function():
    rng = np.random.default_rng(3)
    student, teacher = (rng.normal(size=(4, VOCAB)).astype(np.float32) for _ in range(2))
    targets = np.array([0, 3, 7, 10], np.int32)
    spec = Divergence("sampled")
    losses, grad = weighted_divergence_grad(student, teacher, targets, spec, np.ones(4, np.float32))
    log_q, log_p = np_log_softmax(student.astype(np.float64)), np_log_softmax(teacher.astype(np.float64))
    rows = np.arange(4)
    log_ratio = log_q[rows, targets] - log_p[rows, targets]
    np.testing.assert_allclose(losses, log_ratio, rtol=1e-5, atol=1e-6)
    # ∇_z log q(y) = onehot(y) − q, scaled per token by the (constant) log ratio.
    expected = log_ratio[:, None] * (np.eye(VOCAB)[targets] - np.exp(log_q))
    np.testing.assert_allclose(grad, expected, atol=1e-5)


def test_topk_with_vanishing_tail_stays_finite_and_exact():
    # Top-3 teacher logits ~90 nats above the rest: 1 − Σ top-k rounds to 0 in fp32 and fp64.
    teacher = np.full((2, 9), -60.0, np.float32)
    teacher[:, :3] = [30.0, 29.0, 28.0]
    student = np.random.default_rng(4).normal(size=(2, 9)).astype(np.float32)
    student[1] = teacher[1]
    targets = np.zeros(2, np.int32)
    spec = Divergence("topk", top_k=3)
    losses, grad = weighted_divergence_grad(student, teacher, targets, spec, np.ones(2, np.float32))
    assert np.all(np.isfinite(losses)) and np.all(np.isfinite(grad))
    np.testing.assert_allclose(
        losses, reference_losses(student, teacher, targets, spec), rtol=1e-5, atol=1e-6
    )
    assert abs(float(losses[1])) < 1e-6, "identical student and teacher must give zero top-k loss"
    expected = numeric_grad(reference_objective(student, teacher, targets, np.ones(2), spec), student)
    np.testing.assert_allclose(grad, expected, atol=2e-5)


def test_teacher_logits_get_no_gradient():
    rng = np.random.default_rng(5)
    student, teacher = (jnp.asarray(rng.normal(size=(3, VOCAB)), jnp.float32) for _ in range(2))
    targets = jnp.array([1, 2, 3])
    for spec in ONE_PER_KIND[:-1]:
        grad = jax.grad(lambda t, spec=spec: jnp.sum(token_divergence(student, t, targets, spec)))(teacher)
        np.testing.assert_array_equal(grad, 0.0)


def test_out_of_range_target_gives_nan_not_a_clamped_loss():
    logits = jnp.zeros((2, 5))
    losses = token_divergence(logits, None, jnp.array([1, 5]), Divergence("nll"))
    assert np.isfinite(losses[0]) and np.isnan(losses[1])


@pytest.mark.parametrize(
    "student_shape, teacher_shape, targets_shape, spec, message",
    [
        ((3,), (3,), (3,), Divergence("nll"), r"student_logits must be \[tokens, vocab\]"),
        ((3, 5), (3, 5), (2,), Divergence("nll"), r"targets must be \[tokens\]"),
        ((3, 5), None, (3,), Divergence("forward_kl"), "needs teacher_logits"),
        ((3, 5), (3, 6), (3,), Divergence("jsd"), "teacher_logits shape"),
        ((3, 5), (3, 5), (3,), Divergence("topk", top_k=5), "must be < vocab size 5"),
    ],
)
def test_token_divergence_rejects_bad_shapes(student_shape, teacher_shape, targets_shape, spec, message):
    teacher = None if teacher_shape is None else jnp.zeros(teacher_shape)
    with pytest.raises(ValueError, match=message):
        token_divergence(jnp.zeros(student_shape), teacher, jnp.zeros(targets_shape, jnp.int32), spec)


# ---------------------------------------------------------------- chunked_token_losses


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_chunked_matches_numpy_values_and_gradients(spec, implementation):
    problem = random_problem(seed=6, tokens=7)
    (value, losses), grads = chunked_objective(problem, spec, chunk_size=3, implementation=implementation)
    targets, weights = problem["targets"], problem["weights"]
    t_logits = problem["teacher_hidden"].astype(np.float64) @ problem["teacher_unembed"].astype(np.float64).T

    s_hidden = problem["student_hidden"].astype(np.float64)
    s_unembed = problem["student_unembed"].astype(np.float64)
    of_logits = reference_objective(s_hidden @ s_unembed.T, t_logits, targets, weights, spec)

    def objective(hidden, unembed):
        return of_logits(hidden @ unembed.T)

    np.testing.assert_allclose(
        losses, reference_losses(s_hidden @ s_unembed.T, t_logits, targets, spec), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(grads[0], numeric_grad(lambda h: objective(h, s_unembed), s_hidden), atol=5e-5)
    np.testing.assert_allclose(grads[1], numeric_grad(lambda w: objective(s_hidden, w), s_unembed), atol=5e-5)
    np.testing.assert_array_equal(grads[2], 0.0)  # the teacher is frozen
    np.testing.assert_array_equal(grads[3], 0.0)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("spec", ONE_PER_KIND, ids=repr)
def test_chunking_does_not_change_values_or_gradients(spec, implementation):
    """Every chunk size from 1 to past N (2, 3, 4 do not divide N = 5) matches a single chunk."""
    tokens = 5
    problem = random_problem(seed=7, tokens=tokens)
    chunk_sizes = range(1, tokens + 2)
    # One jit for all chunk sizes: one compilation instead of one per size.
    all_sizes = jax.jit(lambda p: [chunked_objective(p, spec, chunk_size, implementation) for chunk_size in chunk_sizes])
    results = dict(zip(chunk_sizes, all_sizes(problem)))
    (whole_value, whole_losses), whole_grads = results[tokens]
    for chunk_size, ((value, losses), grads) in results.items():
        message = f"chunk_size={chunk_size}"
        np.testing.assert_allclose(losses, whole_losses, rtol=1e-6, atol=1e-6, err_msg=message)
        np.testing.assert_allclose(value, whole_value, rtol=1e-6, atol=1e-6, err_msg=message)
        for grad, whole_grad in zip(grads, whole_grads):
            np.testing.assert_allclose(grad, whole_grad, rtol=1e-6, atol=1e-6, err_msg=message)


@pytest.mark.parametrize("spec", ONE_PER_KIND, ids=repr)
def test_chunked_equals_autodiff_of_token_divergence_on_full_logits(spec):
    """The custom_vjp (per-chunk recomputation) agrees with plain autodiff through full logits."""
    problem = random_problem(seed=8, tokens=9)
    (_, losses), grads = chunked_objective(problem, spec, chunk_size=4)
    t_logits = jnp.asarray(problem["teacher_hidden"] @ problem["teacher_unembed"].T)

    def full_objective(s_hidden, s_unembed):
        per_token = token_divergence(s_hidden @ s_unembed.T, t_logits, problem["targets"], spec)
        return jnp.sum(problem["weights"] * per_token), per_token

    (_, full_losses), full_grads = jax.value_and_grad(full_objective, argnums=(0, 1), has_aux=True)(
        problem["student_hidden"], problem["student_unembed"]
    )
    np.testing.assert_allclose(losses, full_losses, rtol=1e-5, atol=1e-6)
    for grad, full_grad in zip(grads[:2], full_grads):
        np.testing.assert_allclose(grad, full_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", ONE_PER_KIND, ids=repr)
def test_weighted_loss_equals_per_token_losses_and_computes_nothing_extra_undifferentiated(spec):
    problem = random_problem(seed=11, tokens=9)
    (value, losses), grads = chunked_objective(problem, spec, chunk_size=4, implementation="weighted")
    (want_value, want_losses), want_grads = chunked_objective(problem, spec, chunk_size=4)
    np.testing.assert_allclose(value, want_value, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-6, atol=1e-6)
    for grad, want in zip(grads, want_grads):
        np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-6)
    arrays = [problem[n] for n in ("student_hidden", "student_unembed", "teacher_hidden", "teacher_unembed")]
    plain = jax.jit(lambda *a: chunked_weighted_loss(*a, problem["targets"], problem["weights"], spec, chunk_size=4))
    np.testing.assert_allclose(plain(*arrays)[0], want_value, rtol=1e-6, atol=1e-6)
    # without differentiation no gradient is formed: no dot with a [V, D] result is compiled
    hlo = plain.lower(*arrays).compile().as_text()
    vocab, width = problem["student_unembed"].shape
    assert f"f32[{vocab},{width}]{{1,0}} dot(" not in hlo


def test_weighted_loss_scales_with_the_cotangent_and_checks_weights():
    problem = random_problem(seed=12, tokens=6)
    spec = Divergence("forward_kl")
    args = [problem[n] for n in ("student_hidden", "student_unembed", "teacher_hidden", "teacher_unembed")]

    def total(hidden, scale):
        return scale * chunked_weighted_loss(hidden, *args[1:], problem["targets"], problem["weights"], spec,
                                             chunk_size=4)[0]

    once = jax.grad(total)(args[0], 1.0)
    np.testing.assert_allclose(jax.grad(total)(args[0], 3.0), 3.0 * once, rtol=1e-6)
    with pytest.raises(ValueError, match=r"weights must be \[N\]"):
        chunked_weighted_loss(*args, problem["targets"], problem["weights"][:-1], spec)
    value, losses = chunked_weighted_loss(jnp.zeros((0, args[0].shape[1])), args[1], jnp.zeros((0, args[2].shape[1])),
                                          args[3], jnp.zeros((0,), jnp.int32), jnp.zeros((0,)), spec)
    assert float(value) == 0.0 and losses.shape == (0,)


def test_chunked_accepts_bf16_and_returns_fp32_losses_and_input_dtype_grads():
    problem = random_problem(seed=9, tokens=5)
    names = ("student_hidden", "student_unembed", "teacher_hidden", "teacher_unembed")
    bf16 = [jnp.asarray(problem[name], jnp.bfloat16) for name in names]
    spec = Divergence("forward_kl")

    def losses_of(*arrays):
        return chunked_token_losses(*arrays, problem["targets"], spec, chunk_size=2)

    losses = losses_of(*bf16)
    assert losses.dtype == jnp.float32
    np.testing.assert_allclose(
        losses, losses_of(*(x.astype(jnp.float32) for x in bf16)), rtol=1e-5, atol=1e-5
    )
    grads = jax.grad(lambda *student: jnp.sum(losses_of(*student, *bf16[2:])), argnums=(0, 1))(*bf16[:2])
    assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.bfloat16]


def test_chunked_nll_needs_no_teacher_and_empty_input_gives_empty_output():
    problem = random_problem(seed=10, tokens=4)
    spec = Divergence("nll")
    without = chunked_token_losses(
        problem["student_hidden"],
        problem["student_unembed"],
        None,
        None,
        problem["targets"],
        spec,
        chunk_size=3,
    )
    with_teacher = chunked_token_losses(
        problem["student_hidden"],
        problem["student_unembed"],
        problem["teacher_hidden"],
        problem["teacher_unembed"],
        problem["targets"],
        spec,
        chunk_size=3,
    )
    np.testing.assert_array_equal(without, with_teacher)
    empty = chunked_token_losses(
        jnp.zeros((0, 4)), problem["student_unembed"], None, None, jnp.zeros((0,), jnp.int32), spec
    )
    assert empty.shape == (0,) and empty.dtype == jnp.float32


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(student_hidden=np.zeros((6, 3))), "student_hidden width 3 != student_unembed width 4"),
        (dict(student_unembed=np.zeros((VOCAB, 4, 1))), r"student_unembed \[V, D\]"),
        (dict(teacher_hidden=None), "needs teacher_hidden and teacher_unembed"),
        (dict(teacher_hidden=np.zeros((5, 5))), "teacher_hidden has 5 tokens, student_hidden 6"),
        (
            dict(teacher_unembed=np.zeros((VOCAB + 1, 5))),
            "teacher_unembed vocab 12 != student_unembed vocab 11",
        ),
        (dict(targets=np.zeros(5, np.int32)), r"targets must be \[N\]"),
        (dict(chunk_size=0), "chunk_size must be an integer >= 1"),
        (dict(spec=Divergence("topk", top_k=VOCAB)), "must be < vocab size 11"),
    ],
)
def test_chunked_rejects_bad_inputs(change, message):
    args = {k: v for k, v in random_problem(seed=11).items() if k != "weights"}
    args.update(spec=Divergence("forward_kl"), chunk_size=4)
    args.update(change)
    with pytest.raises(ValueError, match=message):
        chunked_token_losses(**args)


def test_chunked_rejects_float_targets():
    args = {k: v for k, v in random_problem(seed=12).items() if k != "weights"}
    args["targets"] = args["targets"].astype(np.float32)
    with pytest.raises(TypeError, match="integer token ids"):
        chunked_token_losses(**args, spec=Divergence("nll"))


def test_no_vocab_sized_buffer_grows_with_tokens():
    """Compiled value_and_grad at Qwen3's vocabulary: temp memory is bounded by the chunk, not N."""
    vocab, width, chunk = 151936, 64, 512

    def temp_bytes(spec: Divergence, tokens: int) -> int:
        def objective(s_hidden, s_unembed, t_hidden, t_unembed, targets):
            return jnp.sum(
                chunked_token_losses(
                    s_hidden, s_unembed, t_hidden, t_unembed, targets, spec, chunk_size=chunk
                )
            )

        shapes = [(tokens, width), (vocab, width), (tokens, width), (vocab, width)]
        args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes] + [
            jax.ShapeDtypeStruct((tokens,), jnp.int32)
        ]
        step = jax.jit(jax.value_and_grad(objective, argnums=(0, 1)))
        return step.lower(*args).compile().memory_analysis().temp_size_in_bytes

    tokens = 4096
    full_logits_bytes = tokens * vocab * 4
    for spec in (Divergence("forward_kl"), Divergence("topk", top_k=64), Divergence("nll")):
        temp = temp_bytes(spec, tokens)
        assert (
            temp < 0.6 * full_logits_bytes
        ), f"{spec}: temp {temp / 1e9:.2f} GB vs [N, V] {full_logits_bytes / 1e9:.2f} GB"
        growth = temp - temp_bytes(spec, tokens // 2)
        assert growth < 0.01 * full_logits_bytes, f"{spec}: temp grew {growth / 1e9:.2f} GB when N doubled"
    assert temp_bytes(Divergence("forward_kl"), tokens) < 0.3 * full_logits_bytes


# ---------------------------------------------------------------- properties


@settings(max_examples=40, deadline=None)
@given(
    logits=arrays(np.float32, (2, 3, 9), elements=st.floats(-20, 20, width=32)),
    spec=st.sampled_from(
        [
            Divergence("forward_kl", temperature=0.5),
            Divergence("reverse_kl"),
            Divergence("jsd", beta=0.0),
            Divergence("jsd", beta=0.3, temperature=3.0),
            Divergence("jsd", beta=1.0),
            Divergence("sampled", temperature=2.0),
            Divergence("topk", top_k=3),
        ]
    ),
)
def test_divergences_are_nonnegative_and_zero_when_student_equals_teacher(logits, spec):
    student, teacher = logits
    targets = jnp.array([0, 4, 8])
    if spec.kind != "sampled":  # a single-sample estimate can be negative; its expectation cannot
        assert np.all(np.asarray(_jitted_divergence(student, teacher, targets, spec)) >= -1e-5)
    np.testing.assert_allclose(_jitted_divergence(teacher, teacher, targets, spec), 0.0, atol=1e-5)


_jitted_divergence = jax.jit(token_divergence, static_argnums=3)


# ---------------------------------------------------------------- reduce_losses


def reference_reduction(per_token, weights, sequence_ids, num_sequences, reduction):
    per_token, weights = np.asarray(per_token, np.float64), np.asarray(weights, np.float64)
    if reduction == "token_mean":
        total, count = np.sum(weights * per_token), np.sum(weights)
        return total / max(count, 1.0), total, count
    sums = np.zeros(num_sequences)
    mass = np.zeros(num_sequences)
    np.add.at(sums, sequence_ids, weights * per_token)
    np.add.at(mass, sequence_ids, weights)
    counted = mass > 0
    total, count = sums[counted].sum(), counted.sum()
    return total / max(count, 1), total, count


REDUCTION_CASE = dict(
    per_token=np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0], np.float32),
    weights=np.array([1.0, 1.0, 0.0, 0.5, 0.0, 0.0, 2.0, 1.0], np.float32),
    sequence_ids=np.array([0, 0, 0, 1, 2, 2, 3, 3], np.int32),  # sequence 2 is all padding
)


@pytest.mark.parametrize("reduction", ["token_mean", "sequence_sum"])
def test_reduce_losses_matches_numpy(reduction):
    loss, sums = reduce_losses(**REDUCTION_CASE, num_sequences=np.int64(4), reduction=reduction)
    expected_loss, expected_total, expected_count = reference_reduction(
        **REDUCTION_CASE, num_sequences=4, reduction=reduction
    )
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)
    np.testing.assert_allclose(sums.total, expected_total, rtol=1e-6)
    np.testing.assert_allclose(sums.count, expected_count, rtol=1e-6)
    assert (reduction == "sequence_sum") == (float(sums.count) == 3.0)  # padding-only sequence not counted


@pytest.mark.parametrize("reduction", ["token_mean", "sequence_sum"])
def test_loss_sums_aggregate_exactly_across_micro_batches(reduction):
    step = jax.jit(reduce_losses, static_argnums=(3, 4))
    _, whole = step(*REDUCTION_CASE.values(), 4, reduction)
    # Micro-batches split at a sequence boundary; each numbers its own sequences from 0.
    first = {k: v[:3] for k, v in REDUCTION_CASE.items()}
    second = {k: v[3:] for k, v in REDUCTION_CASE.items()}
    second["sequence_ids"] = second["sequence_ids"] - 1
    _, part_one = step(*first.values(), 1, reduction)
    _, part_two = step(*second.values(), 3, reduction)
    combined = part_one + part_two
    assert isinstance(combined, LossSums) and len(jax.tree.leaves(combined)) == 2
    np.testing.assert_allclose(combined.total, whole.total, rtol=1e-6)
    np.testing.assert_allclose(combined.count, whole.count, rtol=1e-6)
    np.testing.assert_allclose(combined.mean(), whole.mean(), rtol=1e-6)


def test_reduce_losses_with_no_weighted_tokens_is_zero_not_nan():
    zeros = np.zeros(3, np.float32)
    for reduction in ("token_mean", "sequence_sum"):
        loss, sums = reduce_losses(np.ones(3, np.float32), zeros, np.zeros(3, np.int32), 1, reduction)
        assert float(loss) == 0.0 and float(sums.count) == 0.0


def test_reduce_losses_rejects_bad_input():
    ones, ids = np.ones(3, np.float32), np.zeros(3, np.int32)
    with pytest.raises(ValueError, match="must all be"):
        reduce_losses(ones, np.ones(2, np.float32), ids, 1, "token_mean")
    with pytest.raises(ValueError, match="num_sequences must be"):
        reduce_losses(ones, ones, ids, 0, "token_mean")
    with pytest.raises(ValueError, match="reduction must be one of"):
        reduce_losses(ones, ones, ids, 1, "mean")
