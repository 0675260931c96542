"""The release's judge families (issue 12, item 7): the teacher web judge, the equivalence judge and
the BrowseComp JSON grader -- their prompts, their reply parsing (release and lenient), retries,
what happens when the judge never answers, and which family each dataset gets."""

import json

import pytest

from expint_jax.records import Completion
from expint_jax.rollout.judge import (
    BROWSECOMP_PROMPT,
    EQUIVALENCE_PROMPT,
    JUDGE_FAMILIES,
    TEACHER_PROMPT,
    JudgeInput,
    LLMJudge,
    family_for_dataset,
    parse_browsecomp_reply,
    parse_equivalence,
    parse_teacher_grade,
)


class ScriptedBackend:
    def __init__(self, replies):
        self.replies, self.calls, self.params = list(replies), [], []

    def chat(self, conversations, params):
        self.calls.append([list(c) for c in conversations])
        self.params.append(params)
        out = []
        for _ in conversations:
            reply = self.replies.pop(0)
            out.append(reply if isinstance(reply, Completion) else Completion(text=reply))
        return out


ERROR = Completion(text="", finish_reason="error", error="HTTP 503")


def _browsecomp(correct="yes", answer="Port Kessa", confidence=90):
    return json.dumps({"extracted_final_answer": answer, "reasoning": "they agree", "correct": correct,
                       "confidence": confidence, "strict": True})


# --- prompts --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["equivalence", "teacher", "browsecomp", "ours"])
def test_every_family_prompt_carries_question_gold_and_prediction(name):
    backend = ScriptedBackend(["x"] * 5)
    LLMJudge(backend, family=name, max_attempts=1).judge("Who founded {Kessa}?", "Ilse {gold} Marr", "Ilse Marr")
    prompt = backend.calls[0][0][0].content
    # braces in the texts neither break the template nor get filled in
    assert "Who founded {Kessa}?" in prompt and "Ilse {gold} Marr" in prompt and "Ilse Marr" in prompt
    assert "{question}" not in prompt and "{prediction}" not in prompt


def test_the_prompts_carry_the_release_formats_in_our_words():
    # the teacher: the gold answer is the question's context; explanation first, then the grade
    for label in ("QUESTION: {question}", "CONTEXT: {gold}", "STUDENT ANSWER: {prediction}", "EXPLANATION:",
                  "GRADE: CORRECT or INCORRECT"):
        assert label in TEACHER_PROMPT
    assert "teacher" in TEACHER_PROMPT and "step by step" in TEACHER_PROMPT
    assert '"Correct"' in EQUIVALENCE_PROMPT and '"Incorrect"' in EQUIVALENCE_PROMPT
    for field in ("extracted_final_answer", "reasoning", "correct", "confidence", "strict"):
        assert f'"{field}"' in BROWSECOMP_PROMPT
    # not the release's sentences
    assert "You are a teacher grading a quiz." not in TEACHER_PROMPT
    assert "Please determine if the predicted answer is equivalent" not in EQUIVALENCE_PROMPT
    assert "Judge whether the following [response] to [question] is correct" not in BROWSECOMP_PROMPT


# --- parsing --------------------------------------------------------------------------------------


@pytest.mark.parametrize("reply, release, lenient", [
    ("EXPLANATION: the dates agree.\nGRADE: CORRECT", True, True),
    ("EXPLANATION: no.\nGRADE: INCORRECT", False, False),
    ("**EXPLANATION:** fine\n**GRADE:** CORRECT", True, True),
    ("GRADE: correct\n", True, True),
    ("GRADE: CORRECT\nNOTE: double-checked", True, True),
    ("GRADE: CORRECT.", False, True),  # the release wants the bare word
    ("GRADE: INCORRECT\nGRADE: CORRECT", False, True),  # the release reads the first grade, lenient the last
    # a draft grade inside <think>: the release reads "INCORRECT</think>", lenient skips the draft
    ("<think>draft GRADE: INCORRECT</think>\nEXPLANATION: the year matches\nGRADE: CORRECT", False, True),
    ("The student is right.", False, None),  # no grade: wrong for the release, ask again when lenient
])
def test_parse_teacher_grade(reply, release, lenient):
    assert parse_teacher_grade(reply) is release
    assert parse_teacher_grade(reply, parsing="lenient") is lenient


@pytest.mark.parametrize("reply, release, lenient", [
    ("Correct", True, True),
    ("  correct\n", True, True),
    ("Incorrect", False, False),
    ("Correct.", False, True),  # the release compares the word itself
    ("A", True, None),  # the release's shared test also accepts an "A" option
    ("I am not sure", False, None),
    ("<think>hmm</think>\nCorrect", False, True),
])
def test_parse_equivalence(reply, release, lenient):
    assert parse_equivalence(reply) is release
    assert parse_equivalence(reply, parsing="lenient") is lenient


def test_parse_browsecomp_reply():
    grade = parse_browsecomp_reply(_browsecomp())
    assert grade.correct and grade.extracted_final_answer == "Port Kessa" and grade.confidence == 90.0
    assert grade.reasoning == "they agree"
    assert parse_browsecomp_reply(_browsecomp(correct="No")).correct is False
    assert parse_browsecomp_reply(_browsecomp(correct="maybe")).correct is False  # any other string: wrong
    assert parse_browsecomp_reply(_browsecomp(confidence="85%")).confidence == 85.0
    fenced = "Here is my judgement:\n```json\n" + _browsecomp() + "\n```"
    for unusable in (fenced, "correct: yes", json.dumps({"reasoning": "x"}), json.dumps(["yes"]),
                     json.dumps({"correct": True})):
        assert parse_browsecomp_reply(unusable) is None  # the release's json.loads / key lookup fails
    assert parse_browsecomp_reply(fenced, parsing="lenient").correct
    plain = "extracted_final_answer: Port Kessa\nreasoning: same\ncorrect: no\nconfidence: 100"
    lenient = parse_browsecomp_reply(plain, parsing="lenient")
    assert lenient.correct is False and lenient.extracted_final_answer == "Port Kessa"
    assert parse_browsecomp_reply("<think>{\"correct\": \"yes\"}</think> no verdict", parsing="lenient") is None


# --- the judge ------------------------------------------------------------------------------------


def test_the_default_judge_is_the_release_equivalence_judge():
    backend = ScriptedBackend(["Correct", "Incorrect", "not sure"])
    judge = LLMJudge(backend)
    assert judge.family.name == "equivalence" and judge.parsing == "release" and judge.max_attempts == 5
    verdicts = judge.judge_batch([JudgeInput("q1", "a", "a"), JudgeInput("q2", "b", "x"), JudgeInput("q3", "c", "y")])
    assert [(v.correct, v.method, v.attempts) for v in verdicts] == [(True, "llm", 1), (False, "llm", 1),
                                                                     (False, "llm", 1)]
    assert len(backend.calls) == 1  # every release reply decides: nothing is asked again
    assert backend.params[0].temperature == 0.0


def test_the_teacher_judge_grades_with_an_explanation():
    backend = ScriptedBackend(["EXPLANATION: both name Ilse Marr.\nGRADE: CORRECT", "Looks right to me."])
    judge = LLMJudge(backend, family="teacher")
    assert judge.max_attempts == 3 and judge.params.max_tokens == 8192 and judge.params.temperature == 0.0
    right = judge.judge("Who founded Kessa?", "Ilse Marr", "It was Ilse Marr.")
    assert right.correct and right.reply.startswith("EXPLANATION:")
    assert "CONTEXT: Ilse Marr" in backend.calls[0][0][0].content
    ungraded = judge.judge("Who founded Kessa?", "Ilse Marr", "Ilse Marr")
    assert not ungraded.correct and ungraded.method == "llm" and len(backend.calls) == 2


def test_the_browsecomp_judge_asks_again_until_the_reply_is_json():
    backend = ScriptedBackend(["I think yes", ERROR, _browsecomp()])
    verdict = LLMJudge(backend, family="browsecomp").judge("q", "Port Kessa", "The port is Port Kessa.")
    assert (verdict.correct, verdict.method, verdict.attempts) == (True, "llm", 3)
    assert json.loads(verdict.reply)["extracted_final_answer"] == "Port Kessa"  # the grade stays readable


def test_a_judge_that_never_answers_scores_wrong_as_the_release():
    backend = ScriptedBackend([ERROR] * 5)
    verdict = LLMJudge(backend).judge("q", "Port Kessa", "port kessa")
    assert (verdict.correct, verdict.method, verdict.attempts) == (False, "judge_failed", 5)
    assert len(backend.calls) == 5
    bad_json = ScriptedBackend(["no json"] * 5)
    verdict = LLMJudge(bad_json, family="browsecomp").judge("q", "Port Kessa", "port kessa")
    assert (verdict.correct, verdict.method, verdict.reply) == (False, "judge_failed", "no json")


def test_on_exhausted_exact_match_is_our_documented_switch():
    backend = ScriptedBackend([ERROR] * 2)
    verdict = LLMJudge(backend, on_exhausted="exact_match", max_attempts=2).judge("q", "Port Kessa", "port kessa")
    assert (verdict.correct, verdict.method, verdict.attempts) == (True, "fallback_exact_match", 2)


def test_family_for_dataset_follows_the_release_evaluator():
    assert family_for_dataset("browsecomp_zh") == "browsecomp"
    assert family_for_dataset("BrowseComp-EN") == "browsecomp"
    assert family_for_dataset("gaia") == family_for_dataset("webwalker") == "equivalence"
    assert family_for_dataset("something_else") == "equivalence"  # the release's fallback
    assert family_for_dataset("extraction") == "teacher"
    judge = LLMJudge.for_dataset(ScriptedBackend([]), "browsecomp_zh", parsing="lenient")
    assert judge.family is JUDGE_FAMILIES["browsecomp"] and judge.parsing == "lenient"


def test_llm_judge_refuses_unknown_options():
    for options, message in [({"family": "gpt"}, "family"), ({"parsing": "strict"}, "parsing"),
                             ({"on_exhausted": "retry"}, "on_exhausted")]:
        with pytest.raises(ValueError, match=message):
            LLMJudge(ScriptedBackend([]), **options)
