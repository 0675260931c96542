"""Teacher/student views: tree-packed step-wise scoring equals scoring each turn's context alone."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from expint_jax.distill.views import ViewBudget, build_example, tree_attention_mask
from expint_jax.experience.inject import STEP_HEADER, context_before_turn
from expint_jax.models.config import tiny
from expint_jax.models.qwen3 import Qwen3
from expint_jax.records import Message
from tests.distill.conftest import make_trajectory


@pytest.fixture(scope="module")
def model():
    return Qwen3(tiny(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16), rngs=nnx.Rngs(0))


BUCKET = 512  # pad sequences so few shapes compile


@jax.jit
def _target_log_probs(model, ids, positions, mask, index, targets):
    """log p(targets) at positions ``index`` (logits only at those positions, never [T, vocab])."""
    hidden = model.hidden_states(ids, positions, attention_mask=mask)[0, index]
    return jnp.take_along_axis(jax.nn.log_softmax(model.logits(hidden), -1), targets[:, None], -1)[:, 0]


def _score(model, ids, positions, mask, index, targets):
    steps = len(ids)
    width = -(-steps // BUCKET) * BUCKET
    pad = width - steps
    full_mask = np.zeros((1, width, width), bool)
    full_mask[0, :steps, :steps] = mask
    return np.asarray(_target_log_probs(model, jnp.asarray(np.pad(ids, (0, pad)))[None],
                                        jnp.asarray(np.pad(positions, (0, pad)))[None], jnp.asarray(full_mask),
                                        jnp.asarray(index), jnp.asarray(targets)))


def _packed_teacher_log_probs(model, example):
    valid = jnp.ones((1, len(example.teacher_ids)), bool)
    mask = tree_attention_mask(jnp.asarray(example.teacher_branch)[None], jnp.asarray(example.teacher_attach)[None], valid)
    return _score(model, example.teacher_ids, example.teacher_positions, np.asarray(mask[0]),
                  example.teacher_loss_index, example.targets)


def _per_turn_teacher_log_probs(model, chat, trajectory):
    """Reference: each assistant turn scored in its own sequence, built without any packing."""
    assistants = [m for m in trajectory.messages if m.role == "assistant"]
    out = []
    for k, message in enumerate(assistants):
        encoded = chat.encode(context_before_turn(trajectory, k) + (message,))
        idx = np.flatnonzero(encoded.loss_mask & (encoded.turn_index == k))
        steps = len(encoded.token_ids)
        causal = np.tril(np.ones((steps, steps), bool))
        out.append(_score(model, encoded.token_ids, np.arange(steps), causal, idx - 1, encoded.token_ids[idx]))
    return np.concatenate(out)


@pytest.mark.parametrize("turns", [1, 3, 10])
def test_tree_packed_stepwise_scoring_equals_per_turn_scoring(model, chat, turns):
    trajectory = make_trajectory(turns, "stepwise")
    example = build_example(trajectory, chat)
    assert example.num_turns == turns and example.truncated_turns == 0
    branches = sum(1 for block in trajectory.step_injections if block)
    assert len(np.unique(example.teacher_branch)) == branches + 1
    np.testing.assert_allclose(_packed_teacher_log_probs(model, example),
                               _per_turn_teacher_log_probs(model, chat, trajectory), atol=1e-5, rtol=0)


def test_student_view_is_the_plain_conversation(model, chat):
    trajectory = make_trajectory(3, "stepwise")
    example = build_example(trajectory, chat)
    plain = chat.encode(trajectory.messages)
    np.testing.assert_array_equal(example.student_ids, plain.token_ids)
    np.testing.assert_array_equal(example.targets, plain.token_ids[plain.loss_mask])
    np.testing.assert_array_equal(example.student_loss_index + 1, np.flatnonzero(plain.loss_mask))
    student_text = chat.tokenizer.decode(example.student_ids.tolist())
    blocks = [block for block in trajectory.step_injections if block]
    assert blocks and STEP_HEADER in blocks[0]  # the teacher's blocks carry the header the student must not see
    assert STEP_HEADER not in student_text and not any(block.strip() in student_text for block in blocks)


def test_global_view_scores_like_the_injected_conversation(model, chat):
    trajectory = make_trajectory(3, "global")
    example = build_example(trajectory, chat)
    assert (example.teacher_branch == 0).all() and len(example.teacher_ids) > len(example.student_ids)
    np.testing.assert_allclose(_packed_teacher_log_probs(model, example),
                               _per_turn_teacher_log_probs(model, chat, trajectory), atol=1e-5, rtol=0)


def test_merge_at_the_join_is_split_on_token_ids(model, chat):
    # A user message ending in spaces and a newline: the block's leading "\n\n" merges with it.
    trajectory = make_trajectory(2, "stepwise")
    messages = list(trajectory.messages)
    messages[1] = Message("user", messages[1].content + " \n")
    trajectory = dataclasses.replace(trajectory, messages=tuple(messages))
    user_alone = chat.text_ids(messages[1].content)
    user_injected = chat.text_ids(messages[1].content + trajectory.step_injections[0])
    assert user_injected[:len(user_alone)] != user_alone  # the tokenizer really merges across the join
    example = build_example(trajectory, chat)
    np.testing.assert_allclose(_packed_teacher_log_probs(model, example),
                               _per_turn_teacher_log_probs(model, chat, trajectory), atol=1e-5, rtol=0)


def test_budget_truncates_whole_turns_or_drops(chat):
    trajectory = make_trajectory(6, "stepwise")
    full = build_example(trajectory, chat)
    budget = ViewBudget(max_student_tokens=len(full.student_ids) - 1, max_teacher_tokens=10**6)
    cut = build_example(trajectory, chat, budget)
    assert cut.num_turns < 6 and cut.truncated_turns == 6 - cut.num_turns
    assert len(cut.student_ids) <= budget.max_student_tokens
    assert build_example(trajectory, chat, dataclasses.replace(budget, overflow="drop")) is None
    no_turns = dataclasses.replace(trajectory, messages=trajectory.messages[:2], step_injections=())
    assert build_example(no_turns, chat) is None


def test_tree_mask_matches_brute_force():
    trunk = 7
    branches = [(2, 3), (5, 4)]  # (attach index, length)
    branch, attach = [0] * trunk, list(range(trunk))
    for b, (at, length) in enumerate(branches, start=1):
        branch += [b] * length
        attach += [at] * length
    total = len(branch)
    valid = np.ones(total + 2, bool)
    valid[-2:] = False
    branch += [0, 0]
    attach += [total, total + 1]
    mask = np.asarray(tree_attention_mask(jnp.asarray([branch]), jnp.asarray([attach]), jnp.asarray([valid])))[0]
    for i in range(total + 2):
        for j in range(total + 2):
            if not (valid[i] and valid[j]):
                want = False
            elif branch[i] == 0:
                want = branch[j] == 0 and j <= i
            else:
                want = (branch[j] == 0 and j <= attach[i]) or (branch[j] == branch[i] and j <= i)
            assert mask[i, j] == want, (i, j)


def test_no_injection_teacher_layout_equals_student_layout(chat):
    trajectory = make_trajectory(3, "none")
    example = build_example(trajectory, chat)
    np.testing.assert_array_equal(example.teacher_ids, example.student_ids)
    np.testing.assert_array_equal(example.teacher_positions, np.arange(len(example.student_ids)))
    np.testing.assert_array_equal(example.teacher_attach, np.arange(len(example.student_ids)))
    assert not example.teacher_branch.any()  # one trunk, no branch
    np.testing.assert_array_equal(example.teacher_loss_index, example.student_loss_index)
    assert example.num_turns == 3 and example.num_loss_tokens > 0


def test_language_modelling_example_targets_every_next_token(chat):
    from expint_jax.distill.views import build_lm_example

    plain = dataclasses.replace(make_trajectory(3, "stepwise"), step_injections=(), step_experience_ids=())
    example = build_lm_example(plain, chat)
    ids = chat.encode(plain.messages).token_ids
    assert np.array_equal(example.student_ids, ids) and np.array_equal(example.teacher_ids, ids)
    assert np.array_equal(example.targets, ids[1:]) and np.array_equal(example.student_loss_index, np.arange(len(ids) - 1))
    assert np.array_equal(example.teacher_loss_index, example.student_loss_index)
    short = build_lm_example(plain, chat, ViewBudget(max_student_tokens=10))
    assert np.array_equal(short.student_ids, ids[:10]) and len(short.targets) == 9
    assert build_lm_example(plain, chat, ViewBudget(max_student_tokens=10, overflow="drop")) is None
    with pytest.raises(ValueError, match="carries experience"):
        build_lm_example(make_trajectory(2, "stepwise"), chat)
