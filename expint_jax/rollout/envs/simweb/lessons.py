"""The SimWeb lesson table: the one list of lesson keys shared by the offline writer and the agent.

Contract:
  * Every lesson the offline writer (``writer.py``) writes starts with a ``Label:`` listed here,
    and the experience-sensitive reference agent (``sensitivity.py``) recognises an injected item
    by that label alone (case and spacing ignored, ``recognise``). The writer and the agent can
    therefore never disagree about what a lesson means, and a rewording that keeps the label
    keeps the lesson's effect.
  * ``PRINCIPLE_LESSONS``: abstract "Label: When [condition], [strategy]." rules (no URL, number
    or entity name). ``Lesson.prevents`` names the ``Mistakes`` field a lesson counters, if any;
    ``Lesson.finishing`` marks the finishing lesson, which helps nothing in the organism and
    harms when seen before any page is read (see ``sensitivity.py`` for the designed effects).
  * ``INSTANCE_LABELS``: the labels of instance lessons (tied to one site and task: they name the
    site, the entity, the URL and the answer), each mapped to the principle key whose mistake it
    counters, or None. An instance lesson acts only on a question naming one of the entities the
    lesson names (``names_entity``).
  * ``MISTAKE_LESSONS``: mistake kind -> key of the principle lesson that prevents it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class Lesson:
    key: str  # stable name, also the writer's contrast name
    label: str  # the text's leading "Label:", how the agent recognises it
    text: str
    prevents: str | None = None  # the ``Mistakes`` field this lesson counters
    finishing: bool = False  # "answer once the fact is found": harmful before any page is read


# Wording: each lesson describes its situation in the words of the observations it applies to
# ("search results", "snippet", "directory links", "key facts"), as a good writer would, so that a
# lexical step-wise selector can find it at the right step; the finishing lesson avoids words that
# questions and search results use ("the", "of", "was"), so a selector has no reason to show it
# before a page has been read.


def _lesson(key: str, label: str, rule: str, prevents: str | None = None, finishing: bool = False) -> Lesson:
    return Lesson(key, label, f"{label}: {rule}", prevents, finishing)


PRINCIPLE_LESSONS: tuple[Lesson, ...] = (
    _lesson("answered_without_tools", "Tool first",
            "When a question asks for a specific fact, search for it and read a source before answering, never "
            "answer from memory."),
    _lesson("answered_from_snippets", "Open the source",
            "When search results show only a snippet, visit the most relevant result and read the fact on its page "
            "before answering.", prevents="answer_early"),
    _lesson("gave_up", "Keep navigating",
            "When the pages read so far lack the answer, explore the site's listing pages before concluding that "
            "the information is unavailable."),
    _lesson("followed_directory", "Follow the directory",
            "When a search result is a directory or listing page, visit it and follow the link that names the "
            "target before answering."),
    _lesson("read_every_entity", "Cover every part",
            "When the key facts of one page answer only part of a question, open the page of every other entity it "
            "involves before answering.", prevents="skip_hop"),
    _lesson("picked_lookalike", "Match names exactly",
            "When search results or directory links list similar names, open only the URL whose title matches the "
            "name in the question exactly.", prevents="wrong_link"),
    _lesson("rephrased_query", "Query reformulation",
            "When the first search does not surface the needed page, rephrase the query with other key terms from "
            "the question."),
    _lesson("broken_link", "Use listed links",
            "When a page cannot be opened, return to the search results or a link list and copy a URL exactly as "
            "it is listed."),
    _lesson("ran_out_of_calls", "Change approach",
            "When repeated searches keep returning the same pages, navigate from the site's root page instead of "
            "searching again."),
    _lesson("answer_promptly", "Answer promptly",
            "Once an opened page's key facts give a value asked for, answer at once; do not keep searching.",
            finishing=True),
)
LESSONS_BY_KEY = {lesson.key: lesson for lesson in PRINCIPLE_LESSONS}
FINISHING = next(lesson.key for lesson in PRINCIPLE_LESSONS if lesson.finishing)
MISTAKE_LESSONS = {lesson.prevents: lesson.key for lesson in PRINCIPLE_LESSONS if lesson.prevents}

# Instance lesson labels -> the principle key whose mistake they counter (None: no designed effect).
INSTANCE_LABELS: dict[str, str | None] = {
    "Answer source": "answered_from_snippets",  # the answer is stated on <URL>: open it
    "Look-alike": "picked_lookalike",  # <target> is not <twin>; its page is <URL>
    "Every part": "read_every_entity",  # the question needs the pages <URL>, <URL>
    "Useful query": None,
    "Navigation": None,
    "Wrong answer": None,
}

_LABEL = re.compile(r"^\s*([^:\n]{1,60}):")


def _norm(label: str) -> str:
    return " ".join(label.casefold().split())


_PRINCIPLE_BY_LABEL = {_norm(lesson.label): lesson.key for lesson in PRINCIPLE_LESSONS}
_INSTANCE_BY_LABEL = {_norm(label): key for label, key in INSTANCE_LABELS.items()}


@dataclasses.dataclass(frozen=True)
class Recognised:
    key: str  # a ``PRINCIPLE_LESSONS`` key
    granularity: str  # "principle" | "instance"


def recognise(text: str) -> Recognised | None:
    """The lesson an item's text is, by its leading label; None for text this table does not know."""
    match = _LABEL.match(text)
    if match is None:
        return None
    label = _norm(match.group(1))
    if label in _PRINCIPLE_BY_LABEL:
        return Recognised(_PRINCIPLE_BY_LABEL[label], "principle")
    key = _INSTANCE_BY_LABEL.get(label)
    return Recognised(key, "instance") if key is not None else None


def names_entity(text: str, names: Sequence[str]) -> bool:
    """Whether ``text`` names one of ``names`` as a whole word run (a twin never contains its original)."""
    return any(re.search(rf"(?<!\w){re.escape(name)}(?!\w)", text) for name in names if name)
