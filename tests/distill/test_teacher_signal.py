"""Teacher signal from the rollout: ``from_rollout`` equals ``recompute`` with the top-k + tail divergence.

Fast: the loss on recorded buckets equals the loss on the teacher's logits (values, gradients);
alignment, collation and the sidecar on hand-built signals; and the step on sequences the sampler
generated (a small vocabulary, no tokenizer) with the signal it recorded equals the step that runs
the teacher on them.

Slow, end to end: the tests roll a tiny random Qwen3 (real vocabulary, offline Qwen3 tokenizer) out as
the teacher through the real ``ReActAgent`` on SimWeb with step-wise injection, sampling at
temperature 1 with ``top_logprobs``; the trajectories go through the sidecar file and the views,
and the step run on their recorded signal (no teacher) equals the step that runs the teacher on
the same examples, in fp32. A random model writes random tokens, which the agent strips (a leading
space) or the views re-tokenize differently (merges, broken UTF-8) most of the time: such examples
are skipped and counted. So the teacher's output layer favours the ten digit tokens (Qwen's
pre-tokenizer splits digits one by one, so digit text re-tokenizes as sampled); the rest of the
model, its context included, is random, and it still samples from its full distribution.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from expint_jax.distill.batch import SignalBatch, bucket_shape, collate
from expint_jax.distill.losses import Divergence, TeacherTopK, chunked_token_losses, chunked_weighted_loss
from expint_jax.distill.optim import OptimizerConfig, make_optimizer
from expint_jax.distill.pipeline import BatchingConfig, build_examples, load_examples
from expint_jax.distill.step import StepConfig, init_train_state, make_eval_step, make_train_step
from expint_jax.distill.teacher_signal import SignalMismatch, align_signal
from expint_jax.distill.trainer import TrainerConfig, train
from expint_jax.distill.views import DistillExample, build_example
from expint_jax.experience.inject import StepwiseInjection
from expint_jax.experience.select import BM25Selector
from expint_jax.llm.local import LocalEngine
from expint_jax.llm.sampler import Temperature, generate
from expint_jax.llm.sampler.sampling import top_k_distribution
from expint_jax.models.config import tiny
from expint_jax.models.qwen3 import Qwen3
from expint_jax.parallel.placement import shard_batch
from expint_jax.records import SamplingParams
from expint_jax.rollout.agent import AgentConfig, ReActAgent
from expint_jax.rollout.envs.simweb.env import SimWebConfig, SimWebEnv
from expint_jax.storage import write_jsonl
from expint_jax.token_signal import (
    SignalFileError,
    TopLogprobs,
    TrajectorySignal,
    read_signals,
    signal_path,
    write_signals,
)
from tests.distill.conftest import make_trajectory

K = 8  # recorded top-k
POOL = {
    "G0": "When a search result is the entity's own page, visit it before answering.",
    "G1": "When a question names a site, start from its root URL and follow the links.",
    "G2": "When two values must be compared, read both pages before computing.",
}


# ------------------------------------------------------------------------------ the loss


def _recorded(teacher_logits: jax.Array, k: int) -> TeacherTopK:
    return TeacherTopK(*top_k_distribution(teacher_logits, k))


@pytest.mark.parametrize("recorded_k", [5, 9])  # the divergence's k, and more (folded into the tail)
def test_recorded_buckets_give_the_topk_loss_and_gradient_of_the_teacher_logits(recorded_k):
    vocab, dim, n = 300, 16, 70
    keys = jax.random.split(jax.random.key(0), 4)
    student_hidden = jax.random.normal(keys[0], (n, dim))
    unembed = jax.random.normal(keys[1], (vocab, dim))
    teacher_hidden = 3 * jax.random.normal(keys[2], (n, dim))
    teacher_unembed = jax.random.normal(keys[3], (vocab, dim))
    targets = jnp.arange(n) % vocab
    weights = (jnp.arange(n) % 7 != 0).astype(jnp.float32)
    spec = Divergence("topk", top_k=5)
    recorded = _recorded(teacher_hidden @ teacher_unembed.T, recorded_k)

    def total(teacher, teacher_w):
        return lambda h, u: chunked_weighted_loss(h, u, teacher, teacher_w, targets, weights, spec, chunk_size=32)[0]

    want, want_grads = jax.value_and_grad(total(teacher_hidden, teacher_unembed), argnums=(0, 1))(student_hidden,
                                                                                                 unembed)
    got, got_grads = jax.value_and_grad(total(recorded, None), argnums=(0, 1))(student_hidden, unembed)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
    per_token = chunked_token_losses(student_hidden, unembed, recorded, None, targets, spec, chunk_size=32)
    np.testing.assert_allclose(per_token, chunked_token_losses(student_hidden, unembed, teacher_hidden,
                                                               teacher_unembed, targets, spec, chunk_size=32),
                               rtol=1e-5, atol=1e-7)


def test_recorded_buckets_are_refused_where_they_do_not_apply():
    h, u = jnp.ones((4, 8)), jnp.ones((50, 8))
    recorded = _recorded(jnp.ones((4, 50)), 3)
    targets = jnp.zeros(4, jnp.int32)
    with pytest.raises(ValueError, match="serves the 'topk' divergence only"):
        chunked_token_losses(h, u, recorded, None, targets, Divergence("forward_kl"))
    with pytest.raises(ValueError, match="at temperature 1"):
        chunked_token_losses(h, u, recorded, None, targets, Divergence("topk", top_k=3, temperature=2.0))
    with pytest.raises(ValueError, match="top 3 tokens; Divergence.top_k=4 needs"):
        chunked_token_losses(h, u, recorded, None, targets, Divergence("topk", top_k=4))
    with pytest.raises(ValueError, match="teacher='from_rollout' needs the 'topk' divergence"):
        StepConfig(Divergence("forward_kl"), teacher="from_rollout")
    with pytest.raises(ValueError, match="StepConfig.teacher must be one of"):
        StepConfig(teacher="rollout")
    config = StepConfig(Divergence("topk"), teacher="from_rollout")
    assert not config.needs_teacher and not config.tracks_kl


# ------------------------------------------------------------------------------ alignment


def _signal_for(example, extra=(7, 9), positions_past=1, rng=None):
    """A signal per turn whose generated ids are the turn's content plus ``extra`` (an eos, a cut
    stop string...), with ``positions_past`` rows beyond them (at most one)."""
    rng = rng or np.random.default_rng(0)
    turns = []
    for k in range(example.num_turns):
        content = example.targets[example.loss_turn == k][:-1]
        generated = np.concatenate([content, np.asarray(extra, np.int32)]).astype(np.int32)
        m = len(generated) + positions_past
        top = -np.sort(rng.random((m, 3)).astype(np.float32), axis=1) * 5
        turns.append(TopLogprobs(generated, rng.integers(0, 100, (m, 3)).astype(np.int32), top,
                                 rng.random(m).astype(np.float32)))
    return TrajectorySignal(example.task_id, tuple(turns))


def test_align_signal_keeps_the_rows_of_the_stored_prefix_up_to_its_im_end(chat):
    example = build_example(make_trajectory(3, "stepwise"), chat)
    signal = _signal_for(example)
    aligned = align_signal(example, signal)
    assert aligned.signal_k == 3
    for k, turn in enumerate(signal.turns):
        rows = len(example.targets[example.loss_turn == k])  # content tokens and the <|im_end|>
        np.testing.assert_array_equal(aligned.teacher_top_ids[aligned.loss_turn == k], turn.top_ids[:rows])
        np.testing.assert_array_equal(aligned.teacher_top_logprobs[aligned.loss_turn == k], turn.top_logprobs[:rows])
        np.testing.assert_array_equal(aligned.teacher_tail_logmass[aligned.loss_turn == k], turn.tail_logmass[:rows])
    # Nothing generated after the content, but the engine scored the position after it: aligned.
    assert isinstance(align_signal(example, _signal_for(example, extra=())), type(example))


def test_align_signal_says_why_a_turn_does_not_align(chat):
    example = build_example(make_trajectory(2, "stepwise"), chat)
    good = _signal_for(example)
    first, second = good.turns
    edited = dataclasses.replace(second, token_ids=np.concatenate([[5], second.token_ids[1:]]).astype(np.int32))
    cases = {
        "no signal was recorded": (first, None),
        "differ from the generated ones at token 0": (first, edited),
        "no distribution at its <|im_end|>": (first, _signal_for(example, extra=(), positions_past=0).turns[1]),
        "the signal covers 1 turns": (first,),
    }
    for reason, turns in cases.items():
        mismatch = align_signal(example, TrajectorySignal(example.task_id, turns))
        assert isinstance(mismatch, SignalMismatch) and reason in str(mismatch), (reason, mismatch)
    records = [("a:1", make_trajectory(2, "stepwise", task_id="a")), ("b:1", make_trajectory(2, "stepwise", task_id="b"))]
    signals = [dataclasses.replace(good, task_id="a"), TrajectorySignal("b", (first, None))]
    data = build_examples(records, chat, signals=signals)
    assert [e.task_id for e in data.examples] == ["a"] and data.signal_k == 3
    assert (data.counts.records, data.counts.kept, data.counts.skipped_no_signal) == (2, 1, 1)
    with pytest.raises(ValueError, match="the signal file does not belong"):
        build_examples(records, chat, signals=signals[::-1])


def test_collate_with_signals_pads_them_and_rejects_a_mix(chat):
    examples = [align_signal(e, _signal_for(e)) for e in
                (build_example(make_trajectory(t, "global", task_id=f"t{t}"), chat) for t in (1, 3))]
    batch = collate(examples, bucket_shape(examples, rows=3, bucket=128, loss_bucket=64))
    assert isinstance(batch, SignalBatch) and batch.shape.signal_k == 3 and batch.teacher_top_ids.shape == (3, 128, 3)
    n = examples[0].num_loss_tokens
    np.testing.assert_array_equal(batch.teacher_top_ids[0, :n], examples[0].teacher_top_ids)
    assert not batch.teacher_top_logprobs[0, n:].any() and not batch.teacher_top_ids[2].any()
    plain = build_example(make_trajectory(2, "global"), chat)
    with pytest.raises(ValueError, match="mix rollout signals of k"):
        bucket_shape([examples[0], plain], rows=2)


# ------------------------------------------------------------------------------ sidecar


def test_sidecar_round_trips_exactly_and_names_a_bad_file(tmp_path, chat):
    example = build_example(make_trajectory(3, "stepwise"), chat)
    full = _signal_for(example)
    signals = [full, TrajectorySignal("none", ()), TrajectorySignal("partial", (None, full.turns[1]))]
    path = signal_path(tmp_path / "accepted.jsonl")
    assert path.name == "accepted.signal.npz"
    write_signals(path, signals)
    assert read_signals(path) == signals
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(SignalFileError, match="bad.npz: not a teacher-signal file"):
        read_signals(tmp_path / "bad.npz")
    other_k = dataclasses.replace(full.turns[0], top_ids=full.turns[0].top_ids[:, :2],
                                  top_logprobs=full.turns[0].top_logprobs[:, :2])
    with pytest.raises(ValueError, match="different k"):
        write_signals(path, [TrajectorySignal("t", (other_k, full.turns[1]))])


# ------------------------------------------------------------------------------ sampler -> step


SMALL = tiny(vocab_size=512, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
             head_dim=8, tie_word_embeddings=False)


def _peaked(model):
    """Weights x5 (norms untouched): a random model at init scale is nearly uniform and ignores its context."""
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree_util.tree_map_with_path(lambda path, x: x if "norm" in str(path) else 5 * x, params))
    return model


def _sampled_examples(teacher, rows=4, new_tokens=10):
    """The teacher samples after ``experience + question`` (temperature 1, recording top-8); each row
    is an example whose student sees ``question`` only and whose targets are every generated token
    plus one more (the ``<|im_end|>`` stand-in, scored by the row one past the last token)."""
    rng = np.random.default_rng(0)
    graphdef, state = nnx.split(teacher)
    experience = [rng.integers(0, 512, 12) for _ in range(rows)]
    questions = [rng.integers(0, 512, 5 + 2 * r) for r in range(rows)]
    generations = generate(graphdef, state, [np.concatenate(p) for p in zip(experience, questions)],
                           strategy=Temperature(1.0), max_new_tokens=[new_tokens - r for r in range(rows)],
                           eos_ids=(3,), seed=11, top_logprobs=K)
    examples = []
    for r, (exp, question, generation) in enumerate(zip(experience, questions, generations)):
        signal = generation.top_logprobs
        targets = np.append(signal.token_ids, 1).astype(np.int32)  # 1 plays <|im_end|>
        student = np.concatenate([question, targets]).astype(np.int32)
        teacher_ids = np.concatenate([exp, student]).astype(np.int32)
        n = len(targets)
        examples.append(DistillExample(
            task_id=f"r{r}", student_ids=student, teacher_ids=teacher_ids,
            teacher_positions=np.arange(len(teacher_ids), dtype=np.int32),
            teacher_branch=np.zeros(len(teacher_ids), np.int32),
            teacher_attach=np.arange(len(teacher_ids), dtype=np.int32),
            student_loss_index=(len(question) - 1 + np.arange(n)).astype(np.int32),
            teacher_loss_index=(len(exp) + len(question) - 1 + np.arange(n)).astype(np.int32),
            targets=targets, loss_turn=np.zeros(n, np.int32), num_turns=1, truncated_turns=0,
            teacher_top_ids=signal.top_ids, teacher_top_logprobs=signal.top_logprobs,
            teacher_tail_logmass=signal.tail_logmass))
    return examples


def test_step_on_the_sampled_signal_equals_the_step_running_the_teacher():
    teacher = _peaked(Qwen3(SMALL, rngs=nnx.Rngs(0)))
    examples = _sampled_examples(teacher)
    assert len({e.num_loss_tokens for e in examples}) > 1  # rows of different lengths (eos, limits)
    batch = shard_batch(collate(examples, bucket_shape(examples, rows=4, bucket=32, loss_bucket=16)), None)
    graphdef, params = nnx.split(_peaked(Qwen3(SMALL, rngs=nnx.Rngs(1))), nnx.Param)
    divergence = Divergence("topk", top_k=5)  # fewer than the recorded 8: the rest is folded into the tail
    recomputed = make_eval_step(graphdef, StepConfig(divergence, chunk_size=16, track_kl=False))(
        params, nnx.state(teacher, nnx.Param), batch)
    recorded = make_eval_step(graphdef, StepConfig(divergence, chunk_size=16, teacher="from_rollout"))(
        params, None, batch)
    assert float(recomputed["loss"]) > 1e-2  # a real divergence between the student and the teacher
    np.testing.assert_allclose(float(recorded["loss"]), float(recomputed["loss"]), rtol=1e-5)
    assert float(recorded["tokens"]) == float(recomputed["tokens"]) == sum(e.num_loss_tokens for e in examples)
    assert "kl" not in recorded  # the full teacher distribution is not known


# ------------------------------------------------------------------------------ end to end (slow)


def _digit_teacher():
    """A random tiny Qwen3 whose output rows favour the digit tokens 15..24 (module docstring)."""
    model = Qwen3(tiny(tie_word_embeddings=False), rngs=nnx.Rngs(0))
    head = np.zeros(model.lm_head.get_value().shape, np.float32)
    head[15:25] = 4.0 * np.random.default_rng(0).standard_normal((10, head.shape[1]))  # logits ~ N(0, 32^2)
    model.lm_head[...] = jnp.asarray(head)
    return model


@pytest.fixture(scope="module")
def teacher_rollouts(chat):
    """The teacher (π_k with step-wise experience) rolls out at temperature 1, recording top-8 + tail."""
    teacher = _digit_teacher()
    engine = LocalEngine(teacher, chat.tokenizer, max_batch_size=8)
    env = SimWebEnv(SimWebConfig(seed=3, tasks_per_level=1))
    config = AgentConfig(max_llm_calls=2, max_no_action_turns=2,
                         sampling=SamplingParams(temperature=1.0, max_tokens=8, top_logprobs=K))
    agent = ReActAgent(engine, config, StepwiseInjection(POOL, BM25Selector(k=2, k_min=1)))
    pairs = agent.run_batch_with_signal(env.tasks()[:3], env, n=2, seed=0)
    return teacher, pairs


@pytest.mark.slow
def test_agent_returns_each_turns_signal_with_every_generated_id(teacher_rollouts):
    _, pairs = teacher_rollouts
    for trajectory, signal in pairs:
        assert signal.task_id == trajectory.task_id and len(signal.turns) == trajectory.num_assistant_turns
        for turn in signal.turns:
            assert turn.k == K and turn.num_positions == len(turn.token_ids) + 1 <= 8 + 1
            assert np.all(np.diff(turn.top_logprobs, axis=1) <= 0) and np.all(turn.tail_logmass < 0)


@pytest.fixture(scope="module")
def aligned_examples(teacher_rollouts, chat, tmp_path_factory):
    """The rollouts through the sidecar and the views, as the loop stores and loads them."""
    _, pairs = teacher_rollouts
    directory = tmp_path_factory.mktemp("rollouts")
    write_jsonl(directory / "accepted.jsonl", [t.to_json() for t, _ in pairs])
    write_signals(signal_path(directory / "accepted.jsonl"), [s for _, s in pairs])
    data = load_examples([directory / "accepted.jsonl"], chat, with_signal=True)
    counts = data.counts
    assert counts.records == len(pairs) and counts.kept + counts.skipped_no_signal == counts.records
    assert counts.kept >= 4, counts  # enough aligned examples to compare on (fixed seeds: deterministic)
    return data


def _student():
    return Qwen3(tiny(tie_word_embeddings=False), rngs=nnx.Rngs(1))


def _batch(examples):
    return shard_batch(collate(examples, bucket_shape(examples, rows=len(examples), bucket=64, loss_bucket=16)), None)


@pytest.mark.slow
def test_from_rollout_loss_equals_recompute_loss_on_the_same_trajectories(teacher_rollouts, aligned_examples):
    teacher, _ = teacher_rollouts
    examples = aligned_examples.examples
    batch = _batch(examples)
    graphdef, params = nnx.split(_student(), nnx.Param)
    divergence = Divergence("topk", top_k=5)  # < the recorded 8: the rest is folded into the tail
    recomputed = make_eval_step(graphdef, StepConfig(divergence, chunk_size=64, track_kl=False))(
        params, nnx.state(teacher, nnx.Param), batch)
    recorded = make_eval_step(graphdef, StepConfig(divergence, chunk_size=64, teacher="from_rollout"))(
        params, None, batch)
    assert float(recomputed["loss"]) > 1.0  # a real divergence between the student and the teacher
    np.testing.assert_allclose(float(recorded["loss"]), float(recomputed["loss"]), rtol=1e-5)
    assert float(recorded["tokens"]) == float(recomputed["tokens"]) == sum(e.num_loss_tokens for e in examples)
    assert "kl" not in recorded  # the full teacher distribution is not known


@pytest.mark.slow
def test_from_rollout_train_step_equals_recompute_train_step(teacher_rollouts, aligned_examples):
    teacher, _ = teacher_rollouts
    batch = _batch(aligned_examples.examples)
    results = {}
    for mode in ("recompute", "from_rollout"):
        tx, schedule = make_optimizer(OptimizerConfig(learning_rate=1e-3, total_steps=10, warmup_steps=0))
        graphdef, state = init_train_state(_student(), tx)
        config = StepConfig(Divergence("topk", top_k=K), chunk_size=64, track_kl=False, teacher=mode)
        given = nnx.state(teacher, nnx.Param) if mode == "recompute" else None
        state, metrics = make_train_step(graphdef, tx, schedule, config)(state, given, batch)
        results[mode] = metrics, jax.tree.map(np.asarray, state.params)
    (train_r, params_r), (train_f, params_f) = results["recompute"], results["from_rollout"]
    np.testing.assert_allclose(float(train_f["loss"]), float(train_r["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(train_f["grad_norm"]), float(train_r["grad_norm"]), rtol=1e-4)
    for got, want in zip(jax.tree.leaves(params_f), jax.tree.leaves(params_r)):
        # AdamW's first step divides by |g|: a ~1e-7 gradient difference moves a tiny component by a
        # visible fraction of the learning rate (1e-3); 1e-5 is 1 % of it.
        np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.slow
def test_training_from_rollout_without_a_teacher_equals_training_with_it(teacher_rollouts, aligned_examples,
                                                                        tmp_path):
    teacher, _ = teacher_rollouts
    finals = {}
    for mode in ("recompute", "from_rollout"):
        student = _student()
        config = TrainerConfig(step=StepConfig(Divergence("topk", top_k=K), chunk_size=64, teacher=mode),
                               batching=BatchingConfig(rows=2, min_bucket=32), epochs=2, progress_bar=False,
                               optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=0))
        result = train(config, student, teacher if mode == "recompute" else None, aligned_examples,
                       aligned_examples, output_dir=tmp_path / mode)
        finals[mode] = result, jax.tree.map(np.asarray, nnx.state(student, nnx.Param))
    (recomputed, params_r), (recorded, params_f) = finals["recompute"], finals["from_rollout"]
    assert recorded.steps == recomputed.steps and "kl" in recomputed.eval_metrics and "kl" not in recorded.eval_metrics
    np.testing.assert_allclose(recorded.eval_metrics["loss"], recomputed.eval_metrics["loss"], rtol=1e-4)
    for got, want in zip(jax.tree.leaves(params_f), jax.tree.leaves(params_r)):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_trainer_refuses_from_rollout_data_without_a_signal(chat, tmp_path):
    data = build_examples([("x:1", make_trajectory(2, "global"))], chat)
    config = TrainerConfig(step=StepConfig(Divergence("topk", top_k=4), teacher="from_rollout"), progress_bar=False)
    with pytest.raises(ValueError, match="carry no rollout teacher signal"):
        train(config, Qwen3(tiny(), rngs=nnx.Rngs(0)), None, data, output_dir=tmp_path)
