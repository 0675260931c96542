"""Distillation views with Qwen3's thinking off: both sides train each turn right after the prompt it
was sampled from (the empty think block closing the assistant header), on the same tokens as with
thinking on."""

import numpy as np

from expint_jax.distill.views import build_example
from expint_jax.experience.inject import context_before_turn
from expint_jax.models.chat import EMPTY_THINK, ChatFormat
from tests.distill.conftest import make_trajectory


def _teacher_context(example, t: int) -> np.ndarray:
    """The teacher tokens visible at packed position ``t``: its trunk prefix, then its own branch."""
    branch = example.teacher_branch[t]
    if branch == 0:
        return example.teacher_ids[:t + 1]
    start = np.flatnonzero(example.teacher_branch == branch)[0]
    return np.concatenate([example.teacher_ids[:example.teacher_attach[t] + 1], example.teacher_ids[start:t + 1]])


def test_views_with_thinking_off_train_each_turn_after_its_generation_prompt(chat):
    off_chat = ChatFormat(chat.tokenizer, enable_thinking=False)
    trajectory = make_trajectory(3, "stepwise")  # turns 0 and 1 on branches, turn 2 on the trunk
    on, off = build_example(trajectory, chat), build_example(trajectory, off_chat)
    np.testing.assert_array_equal(off.targets, on.targets)
    np.testing.assert_array_equal(off.loss_turn, on.loss_turn)
    block = off_chat.text_ids(EMPTY_THINK)
    assert len(off.student_ids) == len(on.student_ids) + 3 * len(block)
    assistant_at = [i for i, m in enumerate(trajectory.messages) if m.role == "assistant"]
    for k, index in enumerate(assistant_at):
        first = np.flatnonzero(off.loss_turn == k)[0]
        s, t = off.student_loss_index[first], off.teacher_loss_index[first]
        # Student: its context for turn k is the plain prompt the turn was generated from.
        student_prompt = off_chat.encode_prompt(trajectory.messages[:index])
        assert off.student_ids[:s + 1].tolist() == student_prompt.tolist()
        # Teacher: the same prompt with the experience it acted with (context_before_turn).
        teacher_prompt = off_chat.encode_prompt(context_before_turn(trajectory, k))
        assert _teacher_context(off, t).tolist() == teacher_prompt.tolist()
        assert student_prompt[-len(block):].tolist() == teacher_prompt[-len(block):].tolist() == block
