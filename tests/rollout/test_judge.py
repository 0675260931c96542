"""Judges: answer normalization, number/date parsing, exact match, and the LLM Correct/Incorrect protocol."""

import datetime
import logging

import pytest

from expint_jax.records import Completion
from expint_jax.llm.http import RetryPolicy
from expint_jax.rollout.judge import (
    ExactMatchJudge,
    JudgeInput,
    LLMJudge,
    answers_match,
    extract_dates,
    is_numeric_answer,
    normalize_text,
    parse_number,
    parse_verdict,
)
from expint_jax.llm.openai import OpenAICompatible
from tests.fakes.http_server import Reply, ScriptedServer, sequence


def test_normalize_text():
    assert normalize_text("  The Director: Mara  Velquist! ") == "director mara velquist"
    assert normalize_text("An apple, a day") == "apple day"
    assert normalize_text("Ｚｏｈｅ — Guild") == "zohe guild"  # NFKC folds full-width letters


@pytest.mark.parametrize("text, value", [
    ("1987", 1987), ("$4,200,000", 4_200_000), ("It cost $1,234.50 in total.", 1234.5), ("3/4", 0.75),
    ("1 3/4", 1.75), ("1.2e5", 120000), ("2.5 × 10^3", 2500), ("4.2 million", 4_200_000), ("-3", -3),
    ("12 apples", 12), ("x = 3 * 4 = 12", 12), ("1987 and again 1987", 1987),
])
def test_parse_number(text, value):
    assert parse_number(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["", "no digits", "1987 or 1988", "3/0"])
def test_parse_number_refuses_missing_or_ambiguous(text):
    assert parse_number(text) is None


def test_numeric_answers_and_dates():
    assert is_numeric_answer("$4,200,000") and is_numeric_answer("12 apples") and is_numeric_answer("25%")
    assert not is_numeric_answer("Founded in 1987 by Ada") and not is_numeric_answer("Port Kessa")
    march14 = datetime.date(2011, 3, 14)
    assert extract_dates("held on 14 March 2011, i.e. March 14, 2011 (2011-03-14)") == [march14]
    assert extract_dates("31 February 2011") == []


@pytest.mark.parametrize("prediction, gold, containment, expected", [
    ("mara velquist", "Mara Velquist", False, True),
    ("The director is Mara Velquist.", "Mara Velquist", False, False),
    ("The director is Mara Velquist.", "Mara Velquist", True, True),
    ("Velquist", "Mara Velquist", True, False),
    ("Mara Velquist " + "word " * 11, "Mara Velquist", True, False),  # too much extra text
    ("4200000 dollars", "$4,200,000", False, True),
    ("$4.2 million", "$4,200,000", False, True),
    ("4,200,001", "$4,200,000", False, False),
    ("1987 or 1988", "1987", True, False),
    ("March 14, 2011", "14 March 2011", False, True),
    ("2011", "14 March 2011", False, False),
    ("", "", False, True),
])
def test_answers_match(prediction, gold, containment, expected):
    assert answers_match(prediction, gold, containment=containment) is expected


def test_exact_match_judge_verdicts():
    judge = ExactMatchJudge(containment=True)
    verdict = judge.judge("q?", "Port Kessa", "It is in Port Kessa.")
    assert verdict.correct and verdict.method == "exact_match" and verdict.reward == 1.0
    assert judge.judge("q?", "Port Kessa", None).method == "no_prediction"
    assert judge.judge("q?", "Port Kessa", "   ").reward == 0.0
    verdicts = judge.judge_batch([JudgeInput("q", "1", "1"), JudgeInput("q", "1", "2")])
    assert [v.correct for v in verdicts] == [True, False]


@pytest.mark.parametrize("reply, verdict", [
    ("Correct", True), ("Incorrect", False), ("**Correct.**", True), ("incorrect\nbecause the year differs", False),
    ("The predicted answer is correct.", True), ("This is not correct.", False),
    ("<think>Could be correct, but the year differs.</think>\nIncorrect", False),
    ("Correct or Incorrect?", None), ("I am unsure.", None), ("", None),
])
def test_parse_verdict(reply, verdict):
    assert parse_verdict(reply) is verdict


class ScriptedBackend:
    """Answers each conversation with the next scripted reply; records every call."""

    def __init__(self, replies):
        self.replies = list(replies)
        self.calls = []

    def chat(self, conversations, params):
        self.calls.append([list(c) for c in conversations])
        out = []
        for _ in conversations:
            reply = self.replies.pop(0)
            out.append(reply if isinstance(reply, Completion) else Completion(text=reply))
        return out


def test_llm_judge_sends_question_gold_and_prediction():
    backend = ScriptedBackend(["Correct"])
    verdict = LLMJudge(backend).judge("Who directs X?", "Mara Velquist", "M. Velquist")
    assert verdict.correct and verdict.method == "llm" and verdict.attempts == 1 and verdict.reply == "Correct"
    (conversation,) = backend.calls[0]
    prompt = conversation[0].content
    assert "Who directs X?" in prompt and "Mara Velquist" in prompt and "M. Velquist" in prompt
    assert backend.calls[0][0][0].role == "user"


def test_llm_judge_retries_unparseable_and_failed_replies():
    error = Completion(text="", finish_reason="error", error="HTTP 500")
    backend = ScriptedBackend(["hmm, let me think", error, "Incorrect"])
    verdict = LLMJudge(backend, parsing="lenient", max_attempts=3).judge("q", "1987", "1988")
    assert not verdict.correct and verdict.method == "llm" and verdict.attempts == 3
    assert len(backend.calls) == 3


def test_llm_judge_falls_back_to_exact_match_after_max_attempts():
    backend = ScriptedBackend(["maybe", "maybe", "perhaps"])
    verdict = LLMJudge(backend, parsing="lenient", on_exhausted="exact_match", max_attempts=2).judge(
        "q", "Port Kessa", "port kessa")
    assert verdict.correct and verdict.method == "fallback_exact_match" and verdict.attempts == 2
    assert verdict.reply == "maybe" and len(backend.calls) == 2


def test_llm_judge_batches_pending_items_per_round_and_skips_missing_predictions():
    backend = ScriptedBackend(["Correct", "unsure", "Incorrect", "Incorrect"])
    items = [JudgeInput("q1", "a", "a"), JudgeInput("q2", "b", None), JudgeInput("q3", "c", "x"),
             JudgeInput("q4", "d", "y")]
    verdicts = LLMJudge(backend, parsing="lenient").judge_batch(items)
    assert [len(call) for call in backend.calls] == [3, 1]  # round 1: three items; round 2: the unsure one
    assert [(v.correct, v.method) for v in verdicts] == [
        (True, "llm"), (False, "no_prediction"), (False, "llm"), (False, "llm")]
    assert "q3" in backend.calls[1][0][0].content


def test_llm_judge_validation():
    with pytest.raises(ValueError, match="max_attempts"):
        LLMJudge(ScriptedBackend([]), max_attempts=0)
    with pytest.raises(ValueError, match="{gold}"):
        LLMJudge(ScriptedBackend([]), prompt="{question} {prediction}")


def _chat_reply(text: str) -> Reply:
    return Reply(json_body={"choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]})


def test_llm_judge_through_the_openai_backend_and_a_flaky_server():
    fast = RetryPolicy(max_attempts=2, timeout_s=2.0, backoff_s=0.01, max_backoff_s=0.02)
    script = sequence([
        Reply(status=500, text="overloaded"), _chat_reply("Correct"),  # call 1: retried by the HTTP layer
        Reply(status=503), Reply(status=503),  # call 2: fails for good -> the judge asks again
        _chat_reply("no idea"),  # call 3: unparseable
    ])
    with ScriptedServer(script) as server:
        backend = OpenAICompatible(server.url, "judge-model", retry=fast, max_concurrency=1)
        judge = LLMJudge(backend, parsing="lenient", on_exhausted="exact_match", max_attempts=2)
        assert judge.judge("q", "1987", "It was 1987.").method == "llm"
        fallback = judge.judge("q", "1987", "It was 1987.")
        assert fallback.method == "fallback_exact_match" and fallback.correct and fallback.attempts == 2
        assert len(server.requests) == 5
        assert server.requests[1].json["messages"][0]["role"] == "user"
        assert server.requests[1].json["temperature"] == 0.0


class Recording:
    """Passes calls through to a backend and keeps every completion it returned."""

    def __init__(self, backend):
        self.backend, self.completions = backend, []

    def chat(self, conversations, params):
        out = self.backend.chat(conversations, params)
        self.completions += out
        return out


def test_llm_judge_over_a_broken_server_never_reveals_the_api_key(caplog, monkeypatch):
    key = "sk-judge-secret-4242"
    monkeypatch.setenv("JUDGE_API_KEY", key)
    echo = lambda request: request.headers["Authorization"]  # noqa: E731 - a server that echoes the key back
    replies = iter([
        lambda r: Reply(delay_s=1.0, json_body={}),  # call 1: a time-out, then a truncated body
        lambda r: Reply(text=f'{{"choices": [{{"message": {{"content": "{echo(r)} Correct"}}}}]}}', truncate_to=40),
        lambda r: Reply(text=f"<html>bad gateway, {echo(r)}</html>"),  # call 2: a non-JSON body, then a 500
        lambda r: Reply(status=500, text=f"upstream rejected {echo(r)}"),
        lambda r: _chat_reply("Correct"),  # call 3
    ])
    fast = RetryPolicy(max_attempts=2, timeout_s=0.3, backoff_s=0.01, max_backoff_s=0.02)
    with ScriptedServer(lambda request: next(replies)(request)) as server:
        backend = Recording(OpenAICompatible(server.url, "judge", api_key_env="JUDGE_API_KEY", retry=fast,
                                             max_concurrency=1))
        with caplog.at_level(logging.DEBUG):
            verdict = LLMJudge(backend, max_attempts=3).judge("q", "1987", "It was 1987.")
        assert all(r.headers["Authorization"] == f"Bearer {key}" for r in server.requests)  # the key was used
    assert (verdict.method, verdict.correct, verdict.attempts) == ("llm", True, 3)
    errors = [c.error for c in backend.completions if c.error]  # each names its last attempt's failure
    assert len(errors) == 2 and "truncated response body" in errors[0] and "HTTP 500" in errors[1]
    retries = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retries) == 2 and "timed out" in retries[0] and "invalid JSON" in retries[1]
    assert "upstream rejected Bearer ***" in errors[1] and "bad gateway, Bearer ***" in retries[1]  # echoes redacted
    shown = errors + [r.getMessage() for r in caplog.records] + [repr(backend.backend)]
    assert not [text for text in shown if key in text]
