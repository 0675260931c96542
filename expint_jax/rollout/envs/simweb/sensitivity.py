"""The designed-in experience effects of the scripted SimWeb agent: the one place they are written down.

The reference agent (``reference_agent.py``) makes seeded mistakes (``Mistakes``). With a
``Sensitivity`` on its config, the experience text in the *current request's* context changes
those rates; without one (the default) the agent ignores experience entirely, as it always did.
What counts as context is exactly what ``expint_jax.experience.inject`` puts there: the items of
an experience block in the system message (global injection) and in the last user message (this
step's step-wise block). A block is a header line naming experiences (``**Accumulated
experiences:**``, ``**Experiences relevant to this step:**``, ``**Relevant experiences:**``)
followed by item lines (``G3: text`` or ``[G3]. text``); the reading is deliberately loose so that
wording changes in the injection module do not silently switch the organism off (a test pins it
to the injection module's own output). Earlier steps' step-wise blocks are not in the request,
so they have no effect on later steps.

Items are recognised by their leading ``Label:`` through the table shared with the offline
writer (``lessons.py``); unknown items have no effect of their own but count as shown.

Designed effects (``designed_effects()`` prints them with the configured numbers):
  1. Prevention. A mistake's rate falls from its base ``p`` towards ``guided`` when the lesson
     preventing it is shown: ``p - max(0, p - guided) * w``.
     answer_early <- "Open the source", wrong_link <- "Match names exactly",
     skip_hop <- "Cover every part". An instance lesson with the matching label
     ("Answer source", "Look-alike", "Every part") acts the same way, but only on a question that
     names an entity the lesson names; on any other task it is inert.
  2. Dilution. ``w = min(1, attention_span / n)`` with ``n`` the number of experience items in the
     request (global and step-wise together): a long block weakens every item in it.
  3. Premature answering (the paper's global failure). The finishing lesson ("Answer promptly:
     when the fact is found, answer at once") shown *before any page has been read* makes the agent
     answer at once: at its first turn it answers with no tool call with probability
     ``premature * w`` (a guess: the first option of a compare question, else "unknown"), and
     after its first search its answer_early rate ``r`` becomes ``r + (1 - r) * premature * w``.
     Once a page has been read, the finishing lesson has no effect. Global injection shows it at
     every turn, the first included; a step-wise selector shows it only when it picks it.
  4. Nothing else: no other lesson changes behaviour, the agent never copies an answer out of a
     lesson, and lessons never raise a mistake's rate except as in 3.

Randomness: every mistake draw consumes one number of the rollout's stream whatever the context
(the rate only moves the threshold), and the first-turn premature draw uses a separate stream, so
context changes which mistakes happen, never the random numbers behind the others.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from expint_jax.records import Message
from expint_jax.rollout.envs.simweb.lessons import FINISHING, LESSONS_BY_KEY, MISTAKE_LESSONS, names_entity, recognise

# A short line naming experiences and ending in a colon (any emphasis around it) opens a block.
BLOCK_HEADER = re.compile(r"^\W*(?:[\w-]+ ){0,5}experiences(?: [\w-]+){0,5}:\W*$", re.IGNORECASE | re.MULTILINE)
_ITEM = re.compile(r"^\s*(?:\[[^\]\n]{1,40}\]\.?|[A-Za-z]{0,4}\d{1,6}[:.])\s+(?P<text>\S.*)$")


@dataclasses.dataclass(frozen=True)
class Sensitivity:
    """How strongly lessons in context act on the agent (see the module docstring)."""

    guided: float = 0.05  # a mistake's rate with its lesson shown at full attention
    premature: float = 0.6  # chance the finishing lesson, before any page is read, makes it answer at once
    attention_span: int = 4  # items shown up to this many act fully; beyond, each acts span / n

    def __post_init__(self) -> None:
        for name in ("guided", "premature"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"Sensitivity.{name} must be a probability in [0, 1], got {p}")
        if self.attention_span < 1:
            raise ValueError(f"Sensitivity.attention_span must be >= 1, got {self.attention_span}")


@dataclasses.dataclass(frozen=True)
class Context:
    """What one request's experience text means to the agent: items shown, lesson keys in effect."""

    shown: int = 0
    keys: frozenset[str] = frozenset()

    def weight(self, key: str, sensitivity: Sensitivity) -> float:
        if key not in self.keys:
            return 0.0
        return min(1.0, sensitivity.attention_span / self.shown)


EMPTY = Context()


def experience_items(text: str) -> list[str]:
    """The item texts of every experience block in ``text`` (the item lines after each header)."""
    items: list[str] = []
    for header in BLOCK_HEADER.finditer(text):
        for line in text[header.end():].lstrip("\n").split("\n"):
            match = _ITEM.match(line)
            if match is None:
                break
            items.append(match.group("text").strip())
    return items


def read_context(items: Sequence[str], names: Sequence[str]) -> Context:
    """The context made by the experience ``items`` shown, for a question about ``names``."""
    keys = set()
    for text in items:
        lesson = recognise(text)
        if lesson is None:
            continue
        if lesson.granularity == "instance" and not names_entity(text, names):
            continue  # tied to another task: inert here
        keys.add(lesson.key)
    return Context(len(items), frozenset(keys))


def request_context(messages: Sequence[Message], names: Sequence[str], *, step: bool = True) -> Context:
    """The context of a request: blocks in the system message and (if ``step``) the last user message."""
    texts = [m.content for m in messages if m.role == "system"][:1]
    users = [m.content for m in messages if m.role == "user"]
    if step and users:
        texts.append(users[-1])
    return read_context([item for text in texts for item in experience_items(text)], names)


def mistake_rate(kind: str, base: float, context: Context, sensitivity: Sensitivity | None, *,
                 pages_read: bool) -> float:
    """The rate of mistake ``kind`` (base ``base``) at a step with ``context`` (effects 1-3)."""
    if sensitivity is None:
        return base
    rate = base - max(0.0, base - sensitivity.guided) * context.weight(MISTAKE_LESSONS[kind], sensitivity)
    if kind == "answer_early" and not pages_read:
        rate += (1.0 - rate) * sensitivity.premature * context.weight(FINISHING, sensitivity)
    return rate


def premature_rate(context: Context, sensitivity: Sensitivity | None) -> float:
    """The chance of answering with no tool call at the first turn (effect 3)."""
    if sensitivity is None:
        return 0.0
    return sensitivity.premature * context.weight(FINISHING, sensitivity)


def designed_effects(sensitivity: Sensitivity = Sensitivity()) -> str:
    """The designed effects as a Markdown table, with ``sensitivity``'s numbers, for reports."""
    s = sensitivity
    rows = [("mistake or behaviour", "lesson in context (label)", "effect")]
    for kind, key in MISTAKE_LESSONS.items():
        rows.append((kind, LESSONS_BY_KEY[key].label,
                     f"rate p -> p - max(0, p - {s.guided}) * w (instance lessons: only on their own entity)"))
    rows.append(("premature answer (no page read yet)", LESSONS_BY_KEY[FINISHING].label,
                 f"first turn: answer with no tool call w.p. {s.premature} * w; after the first search: "
                 f"answer_early r -> r + (1 - r) * {s.premature} * w"))
    rows.append(("dilution", "any n items shown", f"w = min(1, {s.attention_span} / n) for every item"))
    rows.append(("everything else", "other lessons", "none (they only count towards n)"))
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, width)) + " |" for row in rows]
    lines.insert(1, "| " + " | ".join("-" * w for w in width) + " |")
    return "\n".join(lines)
