"""Injection: the block format, pure placement into system / last user message, specs, rebuilding contexts."""

import dataclasses

import pytest

from expint_jax.experience.inject import (
    EXPERIENCE_HEADER,
    GLOBAL_HEADER,
    GLOBAL_INSTRUCTION,
    STEP_HEADER,
    STEPWISE_SYSTEM_NOTE,
    GlobalInjection,
    NoInjection,
    StepwiseInjection,
    annotate_injections,
    apply_global,
    apply_stepwise,
    context_before_turn,
    format_experience_block,
    format_global_block,
    inject,
    make_injection,
)
from expint_jax.experience.select import AllSelector, BM25Selector
from expint_jax.records import EXP_SELECTIONS, FORCED_ANSWER_TURN, Message, Trajectory

POOL = {"G0": "When a search fails, rephrase it.", "G3": "When numbers matter, compute them."}

HISTORY = (
    Message("system", "You are an agent."),
    Message("user", "What is 2+2?"),
    Message("assistant", "<tool_call>...</tool_call>"),
    Message("user", "<tool_response>\n4\n</tool_response>"),
)


def test_block_text_and_concatenation():
    block = format_experience_block(POOL)
    assert block == (
        f"\n\n{EXPERIENCE_HEADER}\nG0: When a search fails, rephrase it.\nG3: When numbers matter, compute them."
    )
    assert format_experience_block({}) == ""
    assert format_experience_block({"G7": "x"}).startswith("\n\n")


def test_block_rejects_non_text_items():
    with pytest.raises(TypeError, match="G1"):
        format_experience_block({"G1": 3})


def test_apply_global_appends_to_system_only_and_is_pure():
    original = list(HISTORY)
    out = apply_global(original, "<B>")
    assert out[0] == Message("system", "You are an agent.<B>")
    assert out[1:] == HISTORY[1:]
    assert original == list(HISTORY) and isinstance(out, tuple)


def test_apply_stepwise_appends_to_last_user_message_only():
    out = apply_stepwise(HISTORY, "<B>")
    assert out[3].content == "<tool_response>\n4\n</tool_response><B>"
    assert out[:3] == HISTORY[:3]
    assert apply_stepwise(HISTORY[:2], "<B>")[1].content == "What is 2+2?<B>"


def test_missing_target_message_is_a_clear_error():
    with pytest.raises(ValueError, match="system message"):
        apply_global(HISTORY[1:], "<B>")
    with pytest.raises(ValueError, match="user message"):
        apply_stepwise(HISTORY[:1], "<B>")


def test_inject_applies_only_non_empty_blocks():
    assert inject(HISTORY) == HISTORY
    both = inject(HISTORY, "<G>", "<S>")
    assert both[0].content.endswith("<G>") and both[3].content.endswith("<S>")
    assert inject([Message("user", "q")], step_block="<S>") == (Message("user", "q<S>"),)


def test_specs_have_kinds_and_freeze_their_pool():
    pool = dict(POOL)
    spec = GlobalInjection(pool)
    pool["G9"] = "added later"
    assert "G9" not in spec.pool and spec.block == spec.system_block == format_global_block(POOL)
    with pytest.raises(TypeError):
        spec.pool["G1"] = "x"  # type: ignore[index]
    assert (NoInjection().kind, spec.kind, StepwiseInjection(POOL, AllSelector()).kind) == ("none", "global", "stepwise")


def test_stepwise_block_for_rejects_unknown_ids():
    spec = StepwiseInjection(POOL, AllSelector())
    assert spec.block_for(["G3"]) == format_experience_block({"G3": POOL["G3"]})
    assert spec.block_for([]) == ""
    with pytest.raises(KeyError, match="G5"):
        spec.block_for(["G3", "G5"])


def test_make_injection():
    assert isinstance(make_injection("none"), NoInjection)
    assert isinstance(make_injection("global", POOL), GlobalInjection)
    assert isinstance(make_injection("stepwise", POOL, AllSelector()), StepwiseInjection)
    with pytest.raises(ValueError, match="selector"):
        make_injection("stepwise", POOL)
    with pytest.raises(ValueError, match="pool"):
        make_injection("global")
    with pytest.raises(ValueError, match="unknown injection kind 'everywhere'"):
        make_injection("everywhere", POOL)


def _two_turn_trajectory(**injected) -> Trajectory:
    messages = HISTORY + (Message("assistant", "<answer>4</answer>"),)
    return Trajectory(task_id="t", messages=messages, **injected)


def test_context_before_turn_stepwise():
    traj = _two_turn_trajectory(injection="stepwise", step_injections=("<S0>", ""), step_experience_ids=(("G0",), ()))
    assert context_before_turn(traj, 0) == (HISTORY[0], Message("user", "What is 2+2?<S0>"))
    assert context_before_turn(traj, 1) == HISTORY  # "" means nothing was injected before turn 1


def test_context_before_turn_global_and_none():
    traj = _two_turn_trajectory(injection="global", global_injection="<G>")
    expected = (Message("system", "You are an agent.<G>"),) + HISTORY[1:]
    assert context_before_turn(traj, 1) == expected
    assert context_before_turn(_two_turn_trajectory(), 1) == HISTORY


def test_context_before_turn_out_of_range():
    with pytest.raises(IndexError, match="2 assistant turns; turn 2"):
        context_before_turn(_two_turn_trajectory(), 2)


def test_annotate_injections_matches_what_the_agent_would_select():
    pool = {"G0": "When a page lists films, open the film page.", "G1": "If a search fails, search the site name.",
            "G2": "When asked for a year, quote the page's year.", "G3": "Prefer the official site."}
    messages = (Message("system", "sys"), Message("user", "Which year was the film festival founded?"),
                Message("assistant", "<tool_call>\n{\"name\": \"search\", \"arguments\": {\"query\": \"festival\"}}\n</tool_call>"),
                Message("user", "<tool_response>\nfilm page lists films\n</tool_response>"),
                Message("assistant", "<answer>1950</answer>"))
    plain = Trajectory(task_id="t", messages=messages)
    selector = BM25Selector(k=2, k_min=1)
    spec = StepwiseInjection(pool, selector)
    [annotated] = annotate_injections([plain], spec)
    assert annotated.messages == plain.messages and annotated.injection == "stepwise"
    for k, position in enumerate([2, 4]):
        expected = selector.select(messages[:position], pool)
        assert annotated.step_experience_ids[k] == expected.ids
        assert annotated.step_injections[k] == spec.block_for(expected.ids)
        assert context_before_turn(annotated, k)[-1].content.endswith(spec.block_for(expected.ids))
    [global_view] = annotate_injections([annotated], GlobalInjection(pool))
    assert global_view.global_injection == format_global_block(pool) and global_view.step_injections == ()
    assert EXP_SELECTIONS not in global_view.metadata
    [none] = annotate_injections([annotated], NoInjection())
    assert none.injection == "none" and context_before_turn(none, 1) == messages[:4]


def test_global_block_tells_the_agent_to_use_its_experiences_then_lists_them():
    # The release's global agent: an instruction to solve the problem with the accumulated
    # experiences, a header, then one "G0: text" line per item (evaluation/run_multi_react.py).
    block = format_global_block(POOL)
    assert block == (f"\n\n{GLOBAL_INSTRUCTION}\n\n{GLOBAL_HEADER}\n"
                     "G0: When a search fails, rephrase it.\nG3: When numbers matter, compute them.")
    assert "accumulated experiences" in GLOBAL_INSTRUCTION and format_global_block({}) == ""
    assert "this step" in STEP_HEADER  # the step-wise block names its items as this step's


def test_stepwise_spec_carries_the_system_note_and_make_injection_can_switch_it_off():
    spec = make_injection("stepwise", POOL, AllSelector())
    assert spec.system_block == "\n\n" + STEPWISE_SYSTEM_NOTE
    for topic in ("before each of your replies", "tools", "verify", "answer"):
        assert topic in STEPWISE_SYSTEM_NOTE.lower()
    assert make_injection("stepwise", POOL, AllSelector(), stepwise_system_note=False).system_block == ""
    assert NoInjection().system_block == ""


def test_annotate_stepwise_puts_the_system_note_in_the_teacher_context_only():
    [annotated] = annotate_injections([_two_turn_trajectory()], StepwiseInjection(POOL, AllSelector()))
    assert annotated.global_injection == "\n\n" + STEPWISE_SYSTEM_NOTE
    assert annotated.messages == _two_turn_trajectory().messages  # the student's view is unchanged
    for k in range(2):
        assert context_before_turn(annotated, k)[0].content == HISTORY[0].content + "\n\n" + STEPWISE_SYSTEM_NOTE
    assert [e["round"] for e in annotated.metadata[EXP_SELECTIONS]] == [1, 2]


class _CountingSelector(AllSelector):
    def __init__(self):
        object.__setattr__(self, "histories", [])

    def select_batch(self, histories, pool):
        self.histories.extend(histories)
        return super().select_batch(histories, pool)


def test_annotate_gives_a_forced_answer_turn_no_block_and_no_selection():
    # The agent's forced-answer request carries no step-wise block; annotating must agree.
    forced = dataclasses.replace(_two_turn_trajectory(), termination="max_context",
                                 metadata={FORCED_ANSWER_TURN: 1})
    selector = _CountingSelector()
    [annotated] = annotate_injections([forced], StepwiseInjection(POOL, selector))
    assert annotated.step_injections[0] != "" and annotated.step_injections[1] == ""
    assert annotated.step_experience_ids[1] == () and len(selector.histories) == 1
    assert context_before_turn(annotated, 1)[-1] == HISTORY[-1]
    assert [e["round"] for e in annotated.metadata[EXP_SELECTIONS]] == [1]
