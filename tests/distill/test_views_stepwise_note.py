"""The step-wise system note (issue 12, item 1) is teacher-only context in the tree-packed views.

Under step-wise injection every call's system prompt ends with ``STEPWISE_SYSTEM_NOTE`` (the
release's paragraph announcing per-step experiences). A trajectory keeps it in
``global_injection``: the teacher's trunk and every branch see it, the student never does, and the
packed teacher still scores each turn exactly as its own request would.
"""

import dataclasses

import numpy as np
import pytest
from flax import nnx

from expint_jax.distill.views import build_example
from expint_jax.experience.inject import STEPWISE_SYSTEM_NOTE, StepwiseInjection, annotate_injections
from expint_jax.experience.select import BM25Selector
from tests.distill.conftest import LESSONS, make_trajectory
from expint_jax.models.config import tiny
from expint_jax.models.qwen3 import Qwen3
from tests.distill.test_views import _packed_teacher_log_probs, _per_turn_teacher_log_probs


@pytest.fixture(scope="module")
def model():
    return Qwen3(tiny(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16), rngs=nnx.Rngs(0))


def _contains(haystack: np.ndarray, needle: list[int]) -> bool:
    return any(np.array_equal(haystack[i:i + len(needle)], needle) for i in range(len(haystack) - len(needle) + 1))


def test_the_note_is_in_every_teacher_context_and_never_in_the_student_view(model, chat):
    plain = dataclasses.replace(make_trajectory(3, "none"), injection="none")
    [trajectory] = annotate_injections([plain], StepwiseInjection(LESSONS, BM25Selector(k=2, k_min=1)))
    assert trajectory.global_injection == "\n\n" + STEPWISE_SYSTEM_NOTE
    example = build_example(trajectory, chat)
    note = chat.text_ids(" chosen for the step you are at")
    assert _contains(example.teacher_ids, note) and not _contains(example.student_ids, note)
    np.testing.assert_array_equal(example.student_ids, chat.encode(plain.messages).token_ids)
    np.testing.assert_allclose(_packed_teacher_log_probs(model, example),
                               _per_turn_teacher_log_probs(model, chat, trajectory), atol=1e-5, rtol=0)
