"""Judges: decide whether a predicted answer matches the gold answer.

Two judges share one interface (``judge(question, gold, prediction) -> Verdict`` and
``judge_batch``):

* ``ExactMatchJudge`` -- normalized matching, no model. The rules (``answers_match``), in order:
    1. gold is a calendar date ("14 March 2011", "March 14, 2011", "2011-03-14") -> the
       prediction must state exactly one date, and the same one;
    2. gold is a number, optionally with a currency sign, a scale word ("4.2 million"), a percent
       sign or one unit word ("12 apples") -> ``parse_number(prediction)`` must equal it within
       ``rel_tol`` / ``abs_tol``;
    3. otherwise the texts are compared after ``normalize_text`` (NFKC, lowercase, punctuation to
       spaces, articles a/an/the dropped, whitespace collapsed); with ``containment=True`` the
       gold's tokens may also appear as one contiguous run inside the prediction, provided the
       prediction has at most ``max_extra_tokens`` tokens more than the gold (so "The director
       is Mara Velquist" matches "Mara Velquist", an essay that mentions it does not).
* ``LLMJudge`` -- the paper's evaluation protocol: a prompt with the question, the gold answer
  and the prediction; the model replies ``Correct`` or ``Incorrect``. Replies are parsed by
  ``parse_verdict``; an unparseable reply or a failed request is retried up to ``max_attempts``
  calls per item; after that the documented fallback is ``ExactMatchJudge`` and the verdict's
  ``method`` says ``"fallback_exact_match"``.

A missing prediction (``None`` or blank) is always incorrect with ``method="no_prediction"`` and
costs no model call.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import re
import unicodedata
from collections.abc import Sequence
from typing import Literal, Protocol

from expint_jax.records import Message, SamplingParams
from expint_jax.llm.base import ChatBackend

Method = Literal["exact_match", "llm", "fallback_exact_match", "no_prediction"]

# ---------------------------------------------------------------------------------------------
# Text normalization
# ---------------------------------------------------------------------------------------------

_ARTICLES = frozenset({"a", "an", "the"})


def normalize_text(text: str) -> str:
    """Lowercase, punctuation and symbols to spaces, articles dropped, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if unicodedata.category(ch)[0] in "PS" else ch for ch in text)
    return " ".join(token for token in text.split() if token not in _ARTICLES)


# ---------------------------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------------------------

_SCALE_WORDS = {"thousand": 1e3, "million": 1e6, "billion": 1e9, "trillion": 1e12}
_DIGITS = r"(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
# A minus sign counts only where it cannot be a hyphen inside a word or a date ("2011-03-14").
_NUMBER = re.compile(
    rf"""
    (?<![\w.])(?P<sign>[-−])?
    (?:
        (?P<whole>\d+)\s+(?P<mixed_num>\d+)/(?P<mixed_den>\d+)(?![\d/])      # mixed number 1 3/4
      | (?P<num>\d+)/(?P<den>\d+)(?![\d/])                                   # fraction 3/4
      | (?P<mantissa>{_DIGITS})
        (?:
            [eE](?P<exp>[-+]?\d+)                                            # 1.2e5
          | \s*(?:x|×|\*)\s*10\s*(?:\^|\*\*)\s*(?P<exp10>[-+−]?\d+)           # 1.2 x 10^5
        )?
        (?:\s*(?P<scale>thousand|million|billion|trillion)\b)?
    )
    """,
    re.VERBOSE | re.IGNORECASE,
)


def extract_numbers(text: str) -> list[float]:
    """Every number stated in ``text``, in order ("$1,234.50" -> 1234.5, "3/4" -> 0.75)."""
    values = []
    for m in _NUMBER.finditer(unicodedata.normalize("NFKC", text)):
        if m.group("whole") is not None:
            den = int(m.group("mixed_den"))
            if den == 0:
                continue
            value = int(m.group("whole")) + int(m.group("mixed_num")) / den
        elif m.group("num") is not None:
            den = int(m.group("den"))
            if den == 0:
                continue
            value = int(m.group("num")) / den
        else:
            value = float(m.group("mantissa").replace(",", ""))
            exponent = m.group("exp") or m.group("exp10")
            if exponent is not None:
                value *= 10.0 ** int(exponent.replace("−", "-"))
            if m.group("scale"):
                value *= _SCALE_WORDS[m.group("scale").lower()]
        if m.group("sign"):
            value = -value
        values.append(value)
    return values


def parse_number(text: str) -> float | None:
    """The number an answer states, or None when it states none or is ambiguous.

    If the text contains "=", the last number after the last "=" is taken ("3 * 4 = 12" -> 12).
    Otherwise all numbers in the text must agree ("12 apples" -> 12; "1987 or 1988" -> None).
    """
    if "=" in text:
        after = extract_numbers(text.rsplit("=", 1)[1])
        return after[-1] if after else None
    values = extract_numbers(text)
    if not values or any(not math.isclose(v, values[0], rel_tol=1e-12, abs_tol=0.0) for v in values):
        return None
    return values[0]


def numbers_close(a: float, b: float, *, rel_tol: float = 1e-9, abs_tol: float = 1e-9) -> bool:
    return math.isclose(a, b, rel_tol=rel_tol, abs_tol=abs_tol)


def is_numeric_answer(text: str) -> bool:
    """True for an answer that is one number plus at most one word ("$4,200,000", "12 apples", "25%")."""
    text = unicodedata.normalize("NFKC", text)
    matches = list(_NUMBER.finditer(text))
    if len(matches) != 1:
        return False
    rest = text[: matches[0].start()] + " " + text[matches[0].end() :]
    return len(normalize_text(rest).split()) <= 1


# ---------------------------------------------------------------------------------------------
# Dates
# ---------------------------------------------------------------------------------------------

_MONTHS = {
    name: i
    for i, names in enumerate(
        [("january", "jan"), ("february", "feb"), ("march", "mar"), ("april", "apr"), ("may",),
         ("june", "jun"), ("july", "jul"), ("august", "aug"), ("september", "sep", "sept"),
         ("october", "oct"), ("november", "nov"), ("december", "dec")],
        start=1,
    )
    for name in names
}
_MONTH = "(?P<month>" + "|".join(sorted(_MONTHS, key=len, reverse=True)) + r")\.?"
_DATE_FORMS = (
    re.compile(rf"\b(?P<day>\d{{1,2}})(?:st|nd|rd|th)?\s+(?:of\s+)?{_MONTH},?\s+(?P<year>\d{{4}})\b", re.I),
    re.compile(rf"\b{_MONTH}\s+(?P<day>\d{{1,2}})(?:st|nd|rd|th)?,?\s+(?P<year>\d{{4}})\b", re.I),
    re.compile(r"\b(?P<year>\d{4})-(?P<month_num>\d{1,2})-(?P<day>\d{1,2})\b"),
)


def extract_dates(text: str) -> list[datetime.date]:
    """Every full calendar date (day, month and year) stated in ``text``, deduplicated, in order."""
    found: list[tuple[int, datetime.date]] = []
    for form in _DATE_FORMS:
        for m in form.finditer(text):
            month = _MONTHS[m.group("month").lower()] if "month" in m.groupdict() and m.group("month") \
                else int(m.group("month_num"))
            try:
                found.append((m.start(), datetime.date(int(m.group("year")), month, int(m.group("day")))))
            except ValueError:  # "31 February" is not a date
                continue
    dates: list[datetime.date] = []
    for _, date in sorted(found, key=lambda item: item[0]):
        if date not in dates:
            dates.append(date)
    return dates


def parse_date(text: str) -> datetime.date | None:
    """The one date an answer states, or None when it states none or several."""
    dates = extract_dates(text)
    return dates[0] if len(dates) == 1 else None


def _is_only_a_date(text: str) -> bool:
    for form in _DATE_FORMS:
        text = form.sub(" ", text)
    return not normalize_text(text)


# ---------------------------------------------------------------------------------------------
# Matching
# ---------------------------------------------------------------------------------------------


def answers_match(
    prediction: str,
    gold: str,
    *,
    containment: bool = False,
    max_extra_tokens: int = 10,
    rel_tol: float = 1e-9,
    abs_tol: float = 1e-9,
) -> bool:
    """Whether ``prediction`` states ``gold``; the rules are in the module docstring."""
    gold_date = parse_date(gold)
    if gold_date is not None and _is_only_a_date(gold):
        return parse_date(prediction) == gold_date
    if is_numeric_answer(gold):
        predicted = parse_number(prediction)
        return predicted is not None and numbers_close(predicted, parse_number(gold), rel_tol=rel_tol, abs_tol=abs_tol)
    gold_tokens = normalize_text(gold).split()
    predicted_tokens = normalize_text(prediction).split()
    if not gold_tokens:
        return not predicted_tokens
    if predicted_tokens == gold_tokens:
        return True
    if not containment or len(predicted_tokens) - len(gold_tokens) > max_extra_tokens:
        return False
    width = len(gold_tokens)
    return any(predicted_tokens[i : i + width] == gold_tokens for i in range(len(predicted_tokens) - width + 1))


# ---------------------------------------------------------------------------------------------
# Judges
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class JudgeInput:
    question: str
    gold: str
    prediction: str | None


@dataclasses.dataclass(frozen=True)
class Verdict:
    """One judgement. ``method`` says which path decided; ``attempts`` counts model calls."""

    correct: bool
    method: Method
    attempts: int = 0
    reply: str | None = None  # the model's last reply, for LLM paths

    @property
    def reward(self) -> float:
        return 1.0 if self.correct else 0.0


class Judge(Protocol):
    def judge(self, question: str, gold: str, prediction: str | None) -> Verdict: ...

    def judge_batch(self, items: Sequence[JudgeInput]) -> list[Verdict]: ...


def _has_prediction(prediction: str | None) -> bool:
    return prediction is not None and bool(prediction.strip())


@dataclasses.dataclass(frozen=True)
class ExactMatchJudge:
    """Normalized matching (``answers_match``) with fixed options."""

    containment: bool = False
    max_extra_tokens: int = 10
    rel_tol: float = 1e-9
    abs_tol: float = 1e-9

    def matches(self, prediction: str, gold: str) -> bool:
        return answers_match(prediction, gold, containment=self.containment, max_extra_tokens=self.max_extra_tokens,
                             rel_tol=self.rel_tol, abs_tol=self.abs_tol)

    def judge(self, question: str, gold: str, prediction: str | None) -> Verdict:
        if not _has_prediction(prediction):
            return Verdict(False, "no_prediction")
        return Verdict(self.matches(prediction, gold), "exact_match")

    def judge_batch(self, items: Sequence[JudgeInput]) -> list[Verdict]:
        return [self.judge(item.question, item.gold, item.prediction) for item in items]


JUDGE_PROMPT = """You are grading the answer to a question against the gold answer.

Question: {question}
Gold answer: {gold}
Predicted answer: {prediction}

The predicted answer is Correct if it states the same fact as the gold answer; differences in \
formatting, capitalization, wording or extra detail that does not contradict the gold answer do \
not matter. It is Incorrect if it is wrong, vague, hedges between several answers, or leaves out \
the part of the gold answer that the question asks for.

Reply with exactly one word: Correct or Incorrect."""

_THINK = re.compile(r"<think>.*?(?:</think>|$)", re.S | re.I)
_VERDICT_WORD = re.compile(r"\b(not\s+correct|incorrect|correct)\b", re.I)


def parse_verdict(reply: str) -> bool | None:
    """``True`` for Correct, ``False`` for Incorrect, ``None`` when the reply says neither or both.

    Reasoning inside ``<think>`` is ignored. A first line that is just a verdict word ("Correct.",
    "**Incorrect**") decides; otherwise exactly one kind of verdict word must occur in the reply
    ("not correct" counts as Incorrect).
    """
    text = _THINK.sub(" ", reply).strip()
    first_line = normalize_text(text.split("\n", 1)[0])
    if first_line in ("correct", "incorrect"):
        return first_line == "correct"
    kinds = {word.lower() == "correct" for word in _VERDICT_WORD.findall(text)}
    return kinds.pop() if len(kinds) == 1 else None


class LLMJudge:
    """Correct/Incorrect grading by a chat model, with bounded retries and an exact-match fallback."""

    def __init__(
        self,
        backend: ChatBackend,
        *,
        params: SamplingParams = SamplingParams(temperature=0.0, max_tokens=64),
        max_attempts: int = 3,
        fallback: ExactMatchJudge = ExactMatchJudge(containment=True),
        prompt: str = JUDGE_PROMPT,
    ):
        if max_attempts < 1:
            raise ValueError(f"LLMJudge.max_attempts must be >= 1, got {max_attempts}")
        for field in ("{question}", "{gold}", "{prediction}"):
            if field not in prompt:
                raise ValueError(f"LLMJudge prompt must contain the placeholder {field}")
        self.backend = backend
        self.params = params
        self.max_attempts = max_attempts
        self.fallback = fallback
        self.prompt = prompt

    def judge(self, question: str, gold: str, prediction: str | None) -> Verdict:
        return self.judge_batch([JudgeInput(question, gold, prediction)])[0]

    def judge_batch(self, items: Sequence[JudgeInput]) -> list[Verdict]:
        """One backend call per round for every item still undecided; at most ``max_attempts`` rounds."""
        verdicts: list[Verdict | None] = [
            None if _has_prediction(item.prediction) else Verdict(False, "no_prediction") for item in items
        ]
        last_reply: dict[int, str] = {}
        for attempt in range(1, self.max_attempts + 1):
            pending = [i for i, v in enumerate(verdicts) if v is None]
            if not pending:
                break
            conversations = [[Message("user", self._render(items[i]))] for i in pending]
            for i, completion in zip(pending, self.backend.chat(conversations, self.params), strict=True):
                if completion.finish_reason == "error":
                    continue
                last_reply[i] = completion.text
                decision = parse_verdict(completion.text)
                if decision is not None:
                    verdicts[i] = Verdict(decision, "llm", attempts=attempt, reply=completion.text)
        out = []
        for i, verdict in enumerate(verdicts):
            if verdict is None:
                item = items[i]
                verdict = Verdict(self.fallback.matches(item.prediction, item.gold), "fallback_exact_match",
                                  attempts=self.max_attempts, reply=last_reply.get(i))
            out.append(verdict)
        return out

    def _render(self, item: JudgeInput) -> str:
        return self.prompt.format(question=item.question, gold=item.gold, prediction=item.prediction)
