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
* ``LLMJudge`` -- grading by a chat model, in one of the release's judge families
  (``JudgeFamily``; the prompts are ours, the instructions, fields and output format theirs):
    - ``"equivalence"`` (default; the release's WebWalkerQA / GAIA evaluation judge): question,
      labelled answer, predicted answer -> the single word ``Correct`` or ``Incorrect``;
    - ``"teacher"`` (the release's web judge for extraction-time rewards): a teacher marking a
      quiz; the gold answer is given as the question's context; the reply is an ``EXPLANATION:``
      then ``GRADE: CORRECT`` or ``GRADE: INCORRECT``;
    - ``"browsecomp"`` (the release's BrowseComp-ZH / -EN judge, the official BrowseComp grader):
      a JSON object ``{extracted_final_answer, reasoning, correct: "yes"|"no", confidence,
      strict}`` (``parse_browsecomp_reply``);
    - ``"ours"``: this package's original one-prompt Correct/Incorrect judge.
  ``family_for_dataset`` picks the family the release's evaluator uses for a dataset name.
  Parsing (``parsing=``): ``"release"`` (default) reads replies as the release does: for
  ``equivalence`` the reply is Correct iff it is the word "correct" or starts with "a" (the
  release shares one test with its A/B prompts), anything else is Incorrect; for ``teacher`` the
  text after the first ``GRADE:`` (markdown bold removed) must be exactly ``CORRECT``, anything
  else, a missing grade included, is Incorrect; for ``browsecomp`` the reply must be a JSON object
  whose ``correct`` is "yes" (Correct) or another string (Incorrect), and a reply that is not such
  an object is asked again (the release retries a failed ``json.loads``). ``parsing="lenient"``
  (ours) ignores ``<think>``, takes the last grade, finds a JSON object inside fenced or
  surrounding text, and asks again when a reply decides nothing. Surrounding whitespace never
  matters (the release's client strips it for the web judge; for the evaluation judges we take a
  trailing newline that would turn a "Correct" wrong for an accident).
  A failed request, or an undecided reply, is asked again up to ``max_attempts`` calls per item
  (default the family's: 3 for the teacher, as the release's LLM client; 5 for the evaluation
  judges, as the release's evaluator); after that ``on_exhausted="incorrect"`` (the release: the
  item is scored as an error, i.e. wrong) gives ``method="judge_failed"``, and
  ``on_exhausted="exact_match"`` (ours) falls back to ``ExactMatchJudge`` with
  ``method="fallback_exact_match"``.
  Sampling: temperature 0 throughout. The teacher's 8,192 tokens are the release's; the release
  leaves the evaluation judges' temperature and length to the server, we pin them (``params=``).
  The release enforces the BrowseComp JSON with a response-format schema; the backend interface
  has none, so our prompt spells the object out and the parser checks it.

A missing prediction (``None`` or blank) is always incorrect with ``method="no_prediction"`` and
costs no model call.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import re
import unicodedata
from collections.abc import Callable, Sequence
from typing import Literal, Protocol

from expint_jax.records import Message, SamplingParams
from expint_jax.llm.base import ChatBackend

Method = Literal["exact_match", "llm", "fallback_exact_match", "judge_failed", "no_prediction"]
Parsing = Literal["release", "lenient"]
OnExhausted = Literal["incorrect", "exact_match"]

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


# The release's judge families. Prompts in our words; the fields, labels and reply formats are the
# release's because its parsing depends on them.

TEACHER_PROMPT = """You are a teacher marking one answer of a quiz.
You get a question, the context that the question is about, and a student's answer. Using the \
context, mark the student's answer either CORRECT or INCORRECT.
Think it through step by step and write that reasoning down, so that your mark is sound; do not \
begin by announcing what the right answer is.

Lay out your reply like this:
QUESTION: the question
CONTEXT: the context of the question
STUDENT ANSWER: the student's answer
EXPLANATION: your step-by-step reasoning
GRADE: CORRECT or INCORRECT

Mark the answer on whether its facts are right, and nothing else. Differences from the true answer \
in punctuation or wording do not count against it, and an answer may say more than the true answer \
provided nothing it says conflicts with it. Start now.

QUESTION: {question}
CONTEXT: {gold}
STUDENT ANSWER: {prediction}"""

EQUIVALENCE_PROMPT = """You are assisting with an evaluation. Decide whether the predicted answer \
is equivalent to the labelled answer.

Question: {question}

Labelled answer: {gold}

Predicted answer: {prediction}

Does the predicted answer say the same thing as the labelled answer? Answer "Correct" when the two \
are equivalent and "Incorrect" when they are not, with no other text.

**IMPORTANT:** your whole reply is the one word "Correct" or "Incorrect"."""

BROWSECOMP_PROMPT = """Using the precise and unambiguous [correct_answer] below, decide whether the \
[response] to the [question] is correct.

[question]: {question}

[response]: {prediction}

[correct_answer]: {gold}

Reply with one JSON object and nothing else. Its fields, all required:
- "extracted_final_answer": the exact final answer the [response] gives; the string "None" when \
it gives no exact final answer.
- "reasoning": why the extracted_final_answer does or does not agree with [correct_answer], \
looking only for meaningful differences between the two. Leave out the problem's background, do \
not try to solve the problem, and do not argue for any answer other than [correct_answer]; only \
say whether the answers agree.
- "correct": "yes" when the extracted_final_answer agrees with [correct_answer], or lies within a \
small margin of error on a numerical problem; "no" otherwise, that is whenever there is any \
inconsistency, ambiguity or non-equivalence, or the extracted answer is wrong.
- "confidence": the confidence score, from 0 to 100, that the [response] states; 100 when it \
states none.
- "strict": true."""


def _without_think(reply: str) -> str:
    return _THINK.sub(" ", reply).strip()


_RELEASE_GRADE = re.compile(r"GRADE:\s*(.*?)(?=\n\s*\w+:|\Z)", re.S)
_LENIENT_GRADE = re.compile(r"GRADE\s*:\s*\W*(not\s+correct|incorrect|correct)\b", re.I)


def parse_teacher_grade(reply: str, *, parsing: Parsing = "release") -> bool | None:
    """The teacher judge's mark.

    ``release``: markdown bold removed, the text after the first ``GRADE:`` up to the next
    ``LABEL:`` line or the end must be exactly ``CORRECT`` (any case); anything else, a missing
    grade included, is Incorrect (never None). ``lenient``: the last ``GRADE:`` outside
    ``<think>`` whose first word is CORRECT / INCORRECT / NOT CORRECT; None when there is none.
    """
    if parsing == "release":
        match = _RELEASE_GRADE.search(reply.strip().replace("**", ""))
        return match is not None and match.group(1).strip().upper() == "CORRECT"
    grades = _LENIENT_GRADE.findall(_without_think(reply).replace("**", ""))
    return grades[-1].lower() == "correct" if grades else None


def parse_equivalence(reply: str, *, parsing: Parsing = "release") -> bool | None:
    """The equivalence judge's verdict.

    ``release``: Correct iff the reply is the word "correct" or starts with "a" (any case), else
    Incorrect (never None). ``lenient``: ``parse_verdict``.
    """
    if parsing == "release":
        text = reply.strip().lower()
        return text == "correct" or text.startswith("a")
    return parse_verdict(reply)


@dataclasses.dataclass(frozen=True)
class BrowseCompGrade:
    """The BrowseComp grader's JSON reply."""

    extracted_final_answer: str
    reasoning: str
    correct: bool
    confidence: float | None  # None when the reply gives no number


def _grade_from_object(obj: object) -> BrowseCompGrade | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("correct"), str):
        return None
    confidence = obj.get("confidence")
    if isinstance(confidence, str):
        numbers = extract_numbers(confidence)
        confidence = numbers[0] if numbers else None
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)):
        confidence = None
    return BrowseCompGrade(str(obj.get("extracted_final_answer", "")), str(obj.get("reasoning", "")),
                           obj["correct"].strip().lower() == "yes", None if confidence is None else float(confidence))


_CORRECT_LINE = re.compile(r"^\W*correct\W*:\s*\W*(yes|no)\b", re.I | re.M)


def parse_browsecomp_reply(reply: str, *, parsing: Parsing = "release") -> BrowseCompGrade | None:
    """The grader's reply, or None when it is not a usable grade (the judge then asks again).

    ``release``: the whole reply must be one JSON object with a string ``correct``; "yes" (any
    case) is Correct, any other string Incorrect. ``lenient``: ``<think>`` dropped, the first JSON
    object with a string ``correct`` anywhere in the reply (fenced or not), else a plain-text
    ``correct: yes|no`` line (the official grader's text format).
    """
    if parsing == "release":
        try:
            return _grade_from_object(json.loads(reply.strip()))
        except json.JSONDecodeError:
            return None
    text = _without_think(reply)
    decoder = json.JSONDecoder()
    for start in (i for i, ch in enumerate(text) if ch == "{"):
        try:
            obj, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        grade = _grade_from_object(obj)
        if grade is not None:
            return grade
    line = _CORRECT_LINE.search(text)
    if line is None:
        return None
    answer = re.search(r"^\W*extracted_final_answer\W*:\s*(.*)$", text, re.I | re.M)
    return BrowseCompGrade(answer.group(1).strip() if answer else "", "", line.group(1).lower() == "yes", None)


def _parse_browsecomp(reply: str, *, parsing: Parsing = "release") -> bool | None:
    grade = parse_browsecomp_reply(reply, parsing=parsing)
    return None if grade is None else grade.correct


def _parse_ours(reply: str, *, parsing: Parsing = "release") -> bool | None:
    return parse_verdict(reply)


@dataclasses.dataclass(frozen=True)
class JudgeFamily:
    """One grading protocol: the prompt (placeholders ``{question}``, ``{gold}``, ``{prediction}``),
    how a reply is read (``parse(reply, parsing=...)`` -> True / False / None = ask again), the
    sampling and the number of calls per item."""

    name: str
    prompt: str
    parse: Callable[..., bool | None]
    params: SamplingParams
    max_attempts: int


JUDGE_FAMILIES: dict[str, JudgeFamily] = {
    "equivalence": JudgeFamily("equivalence", EQUIVALENCE_PROMPT, parse_equivalence,
                               SamplingParams(temperature=0.0, max_tokens=1024), max_attempts=5),
    "teacher": JudgeFamily("teacher", TEACHER_PROMPT, parse_teacher_grade,
                           SamplingParams(temperature=0.0, max_tokens=8192), max_attempts=3),
    "browsecomp": JudgeFamily("browsecomp", BROWSECOMP_PROMPT, _parse_browsecomp,
                              SamplingParams(temperature=0.0, max_tokens=2048), max_attempts=5),
    "ours": JudgeFamily("ours", JUDGE_PROMPT, _parse_ours, SamplingParams(temperature=0.0, max_tokens=64),
                        max_attempts=3),
}


def family_for_dataset(dataset: str) -> str:
    """The family the release grades ``dataset`` with: BrowseComp (any variant) -> ``browsecomp``;
    extraction-time web rewards (``"extraction"``, ``"web_extraction"``) -> ``teacher``; GAIA,
    WebWalkerQA and anything else -> ``equivalence`` (the release's evaluator falls back to it)."""
    name = dataset.strip().lower().replace("-", "_")
    if name.startswith("browsecomp"):
        return "browsecomp"
    if name in ("extraction", "web_extraction", "teacher"):
        return "teacher"
    return "equivalence"


class LLMJudge:
    """Grading by a chat model in one ``JudgeFamily``, with bounded retries (module docstring)."""

    def __init__(
        self,
        backend: ChatBackend,
        *,
        family: JudgeFamily | str = "equivalence",
        parsing: Parsing = "release",
        params: SamplingParams | None = None,
        max_attempts: int | None = None,
        on_exhausted: OnExhausted = "incorrect",
        fallback: ExactMatchJudge = ExactMatchJudge(containment=True),
        prompt: str | None = None,
    ):
        if isinstance(family, str):
            if family not in JUDGE_FAMILIES:
                raise ValueError(f"LLMJudge.family must be one of {sorted(JUDGE_FAMILIES)}, got {family!r}")
            family = JUDGE_FAMILIES[family]
        if parsing not in ("release", "lenient"):
            raise ValueError(f"LLMJudge.parsing must be 'release' or 'lenient', got {parsing!r}")
        if on_exhausted not in ("incorrect", "exact_match"):
            raise ValueError(f"LLMJudge.on_exhausted must be 'incorrect' or 'exact_match', got {on_exhausted!r}")
        max_attempts = family.max_attempts if max_attempts is None else max_attempts
        if max_attempts < 1:
            raise ValueError(f"LLMJudge.max_attempts must be >= 1, got {max_attempts}")
        prompt = family.prompt if prompt is None else prompt
        for field in ("{question}", "{gold}", "{prediction}"):
            if field not in prompt:
                raise ValueError(f"LLMJudge prompt must contain the placeholder {field}")
        self.backend = backend
        self.family = family
        self.parsing: Parsing = parsing
        self.params = family.params if params is None else params
        self.max_attempts = max_attempts
        self.on_exhausted: OnExhausted = on_exhausted
        self.fallback = fallback
        self.prompt = prompt

    @classmethod
    def for_dataset(cls, backend: ChatBackend, dataset: str, **options) -> "LLMJudge":
        """The judge the release's evaluator uses for ``dataset`` (``family_for_dataset``)."""
        return cls(backend, family=family_for_dataset(dataset), **options)

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
                decision = self.family.parse(completion.text, parsing=self.parsing)
                if decision is not None:
                    verdicts[i] = Verdict(decision, "llm", attempts=attempt, reply=completion.text)
        out = []
        for i, verdict in enumerate(verdicts):
            if verdict is None:
                item = items[i]
                if self.on_exhausted == "incorrect":
                    verdict = Verdict(False, "judge_failed", attempts=self.max_attempts, reply=last_reply.get(i))
                else:
                    verdict = Verdict(self.fallback.matches(item.prediction, item.gold), "fallback_exact_match",
                                      attempts=self.max_attempts, reply=last_reply.get(i))
            out.append(verdict)
        return out

    def _render(self, item: JudgeInput) -> str:
        # One pass over the template, not str.format: braces in a question or an answer, or a
        # placeholder-like text inside one, must neither break the prompt nor be filled in.
        values = {"question": item.question, "gold": item.gold, "prediction": item.prediction}
        return _PLACEHOLDER.sub(lambda m: values[m.group(1)], self.prompt)


_PLACEHOLDER = re.compile(r"\{(question|gold|prediction)\}")
