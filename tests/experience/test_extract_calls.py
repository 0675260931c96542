"""``ask_all``: retries, and any parser exception treated as an unparseable answer."""

import logging

from expint_jax.experience.extract.calls import Ask, AskPolicy, ask_all
from expint_jax.experience.extract.parsers import ParseError, parse_operations
from expint_jax.experience.extract.stats import RunStats
from expint_jax.records import Completion, Message, SamplingParams

POLICY = AskPolicy(SamplingParams(temperature=0.0, max_tokens=64), max_retries=1, batch_size=2)


class ScriptedBackend:
    """Answers each conversation with ``answer(conversation)``; records what it was sent."""

    def __init__(self, answer):
        self.answer, self.sent = answer, []

    def chat(self, conversations, params):
        self.sent += [list(c) for c in conversations]
        return [Completion(self.answer(c)) for c in conversations]


def asks(*keys):
    return [Ask(key, (Message("user", f"question {key}"),)) for key in keys]


def test_a_parser_raising_anything_is_an_unparseable_answer(caplog):
    def fragile(text):
        if text == "boom":
            raise KeyError("parser bug")
        if text == "bad":
            raise ParseError("not a list")
        return text

    backend = ScriptedBackend(lambda c: "boom" if "a" in c[0].content else "bad" if "b" in c[0].content else "ok")
    got, stats = {}, RunStats()
    with caplog.at_level(logging.INFO):
        failed = ask_all(backend, asks("a", "b", "c"), fragile, got.__setitem__, stage="critique",
                         policy=POLICY, stats=stats)
    assert got == {"c": "ok"}
    assert failed == {"a": "unparseable answer (KeyError in the parser)", "b": "unparseable answer (not a list)"}
    assert stats.calls["critique"] == 5 and stats.retries["critique"] == 2 and stats.failures["critique"] == 4
    # Both were retried with the bad answer and a reason; the parser bug is logged with its traceback.
    retried = [c for c in backend.sent if len(c) == 3]
    assert [c[1].content for c in retried] == ["boom", "bad"]
    assert "could not be used: it could not be parsed." in retried[0][2].content
    assert "could not be used: not a list." in retried[1][2].content
    bugs = [r for r in caplog.records if "the parser raised KeyError" in r.getMessage()]
    assert len(bugs) == 2 and all(r.levelno == logging.WARNING and r.exc_info for r in bugs)


def test_a_runaway_integer_is_retried_then_reported():
    backend = ScriptedBackend(lambda c: "1" * 5000 if len(c) == 1 else '[{"operation": "NONE"}]')
    got = {}
    failed = ask_all(backend, asks("x"), parse_operations, got.__setitem__, stage="group_update",
                     policy=POLICY, stats=RunStats())
    assert failed == {} and [op.kind for op in got["x"].operations] == ["NONE"]
