"""Prompts of the extraction stages, in two families: ``principle`` and ``instance`` lessons.

Every prompt is a (system, user) pair. The user message starts with the stage's title line
(``SUMMARY_TITLE`` ...), so logs and test fakes can tell the stages apart. The families differ
only in what a good lesson is (``LessonStyle``); the stage instructions are shared.

  * principle: abstract, domain-agnostic rules shaped "Name: When [condition], [strategy]." of at
    most 32 words, with no URLs, numbers, quoted strings or names of people, places, sites or
    works: lessons that transfer to unseen questions.
  * instance: concrete lessons tied to one trajectory: which page held the answer, which query
    found it, which value was right, which source misled. Specific names, URLs and values are
    the point.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence

from expint_jax.records import Message, Trajectory

SUMMARY_TITLE = "## Task: summarize one agent rollout"
CRITIQUE_TITLE = "## Task: compare rollouts of one question and propose lessons"
GROUP_UPDATE_TITLE = "## Task: decide how a proposed lesson changes the lesson bank"
RECONCILE_TITLE = "## Task: reconcile all proposed changes to the lesson bank"
CONSOLIDATE_TITLE = "## Task: shrink the lesson bank"

SYSTEM = (
    "You maintain a bank of short lessons for a research agent that answers questions by searching "
    "and reading web pages through tools. Lessons are shown to the agent in later attempts, so they "
    "must be correct, non-redundant and immediately actionable. Follow the requested output format "
    "exactly."
)


@dataclasses.dataclass(frozen=True)
class LessonStyle:
    granularity: str
    definition: str
    good_examples: tuple[str, ...]
    bad_examples: tuple[str, ...]


PRINCIPLE = LessonStyle(
    granularity="principle",
    definition=(
        "A lesson is a general principle for solving tasks of this kind, not a fact about this task. "
        "Write each as 'Name: When [condition], [strategy].' in at most 32 words. It must make sense "
        "for a question about an entirely different topic: no URLs or domains, no numbers or dates, no "
        "quoted text, no names of people, organizations, places, websites, products or documents."
    ),
    good_examples=(
        "Pointer following: When search results only show snippets, open the most relevant page and read it "
        "before answering.",
        "Query reformulation: When a search returns nothing relevant, rephrase it with the question's key "
        "descriptors instead of repeating it.",
    ),
    bad_examples=(
        "The founding year of Acme Corp is listed on https://acme.example.org/about.",
        "Search for 'Acme annual report 2021' first.",
    ),
)

INSTANCE = LessonStyle(
    granularity="instance",
    definition=(
        "A lesson is a concrete, checkable note about this very task that would have let the agent "
        "succeed directly: which page (exact URL) holds the answer, which query surfaced it, which value "
        "is correct, or which source is misleading. Be specific: keep entity names, URLs, queries and "
        "values exactly as they appear. Write each as 'Name: sentence.' in at most 40 words."
    ),
    good_examples=(
        "Acme founding year: The founding year of Acme Corp (1987) is stated on https://acme.example.org/about, "
        "not on the press page.",
        "Useful query: Searching 'Acme Corp history' surfaces the company's about page first.",
    ),
    bad_examples=(
        "Always verify information carefully.",
        "When a search fails, try again.",
    ),
)

STYLES: dict[str, LessonStyle] = {s.granularity: s for s in (PRINCIPLE, INSTANCE)}

OPERATION_FORMAT = (
    'Answer with a JSON list only, for example:\n'
    '[{"operation": "ADD", "id": null, "content": "Name: sentence."},\n'
    ' {"operation": "UPDATE", "id": "G3", "content": "Name: improved sentence."},\n'
    ' {"operation": "DELETE", "id": "G5", "content": null},\n'
    ' {"operation": "NONE", "id": null, "content": null}]\n'
    "ADD creates a new lesson, UPDATE rewrites an existing one (give its id), DELETE removes an existing "
    "one that is wrong or superseded (give its id), NONE changes nothing."
)


def style(granularity: str) -> LessonStyle:
    try:
        return STYLES[granularity]
    except KeyError:
        raise ValueError(f"no prompt family for granularity {granularity!r}; known: {sorted(STYLES)}") from None


def _style_block(s: LessonStyle) -> str:
    good = "\n".join(f"- {e}" for e in s.good_examples)
    bad = "\n".join(f"- {e}" for e in s.bad_examples)
    return f"### What a lesson is\n{s.definition}\nGood lessons:\n{good}\nNot acceptable:\n{bad}"


def format_pool(pool: Mapping[str, str]) -> str:
    return "\n".join(f"[{item_id}]. {text}" for item_id, text in pool.items()) or "(the bank is empty)"


def _clip(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    return text[:max_chars] + f" [... {len(text) - max_chars} characters cut]"


def render_trajectory(trajectory: Trajectory, max_message_chars: int) -> str:
    """The rollout's steps as readable text: everything after the task (the first user message)."""
    turns = []
    seen_task = False
    for message in trajectory.messages:
        if message.role == "system" or (message.role == "user" and not seen_task):
            seen_task = seen_task or message.role == "user"
            continue
        speaker = "AGENT" if message.role == "assistant" else "ENVIRONMENT"
        turns.append(f"[{speaker}]\n{_clip(message.content.strip(), max_message_chars)}")
    return "\n\n".join(turns) or "(no steps)"


def outcome(trajectory: Trajectory) -> str:
    if trajectory.reward is None:
        return "not judged"
    verdict = "correct" if trajectory.reward >= 1 else "incorrect" if trajectory.reward <= 0 else "partly correct"
    return f"{verdict} (reward {trajectory.reward:g})"


def _user(title: str, *sections: str) -> tuple[Message, Message]:
    return Message("system", SYSTEM), Message("user", "\n\n".join((title, *sections)))


def summary_messages(question: str, trajectory: Trajectory, max_message_chars: int) -> tuple[Message, ...]:
    reference = trajectory.ground_truth if trajectory.ground_truth is not None else "(unknown)"
    return _user(
        SUMMARY_TITLE,
        f"### Question\n{question}",
        f"### Reference answer\n{reference}",
        f"### Outcome\n{outcome(trajectory)}; the agent answered: {trajectory.prediction or '(no answer)'}",
        f"### Rollout\n{render_trajectory(trajectory, max_message_chars)}",
        "### Instructions\nWrite a compact summary (at most 200 words) covering: (1) the actions the agent "
        "took, in order, with their key arguments; (2) what each tool result contributed; (3) information "
        "it missed, ignored or misread; (4) why the final answer was right or wrong.",
    )


def critique_messages(question: str, reference: str | None, summaries: Sequence[tuple[str, str]],
                      pool: Mapping[str, str], lesson_style: LessonStyle, max_lessons: int) -> tuple[Message, ...]:
    rollouts = "\n\n".join(f"#### Rollout {k + 1}: {verdict}\n{summary}"
                           for k, (verdict, summary) in enumerate(summaries))
    return _user(
        CRITIQUE_TITLE,
        f"### Question\n{question}",
        f"### Reference answer\n{reference if reference is not None else '(unknown)'}",
        f"### Rollout summaries\n{rollouts}",
        f"### Current lessons\n{format_pool(pool)}",
        _style_block(lesson_style),
        f"### Instructions\nContrast the successful and failed rollouts: what made the difference? Propose 2 to "
        f"{max_lessons} new lessons that are not already covered by the current lessons. Put them between "
        "<Experiences> and </Experiences>, one lesson per line, nothing else inside the tags.",
    )


def group_update_messages(proposal: str, pool: Mapping[str, str], lesson_style: LessonStyle) -> tuple[Message, ...]:
    return _user(
        GROUP_UPDATE_TITLE,
        f"### Proposed lesson\n{proposal}",
        f"### Current lessons\n{format_pool(pool)}",
        _style_block(lesson_style),
        "### Instructions\nCompare the proposed lesson with the current lessons. If it is new, ADD it (you may "
        "improve its wording). If it refines or corrects an existing lesson, UPDATE that lesson with a merged "
        "text. If it shows an existing lesson is wrong, DELETE that lesson (and ADD the proposal if useful). If "
        "it is already covered, answer NONE.\n" + OPERATION_FORMAT,
    )


def reconcile_messages(operations: Sequence[Mapping[str, object]], pool: Mapping[str, str],
                       lesson_style: LessonStyle, max_pool_size: int) -> tuple[Message, ...]:
    listing = json.dumps(list(operations), indent=1, ensure_ascii=False)
    return _user(
        RECONCILE_TITLE,
        f"### Current lessons\n{format_pool(pool)}",
        f"### Proposed operations (from different questions, made independently)\n{listing}",
        _style_block(lesson_style),
        "### Instructions\nProduce one consistent list of operations to apply to the current lessons: merge "
        "several UPDATEs of the same id into one UPDATE whose text combines them; when an id is both updated "
        "and deleted, keep the DELETE; drop ADDs that repeat each other or an existing lesson (merge them into "
        f"one); the bank must end with at most {max_pool_size} lessons.\n" + OPERATION_FORMAT,
    )


def consolidate_messages(pool: Mapping[str, str], lesson_style: LessonStyle, max_pool_size: int) -> tuple[Message, ...]:
    return _user(
        CONSOLIDATE_TITLE,
        f"### Current lessons ({len(pool)}, the limit is {max_pool_size})\n{format_pool(pool)}",
        _style_block(lesson_style),
        f"### Instructions\nRewrite the bank into at most {max_pool_size} lessons: merge lessons that say the "
        "same thing, drop the least useful ones, keep the wording of lessons you keep. Answer with a JSON "
        'list only, e.g. [{"id": "G0", "content": "Name: sentence."}, {"id": "G4", "content": "Name: merged '
        'sentence."}]. Give each lesson the id of the current lesson it continues (for a merge, one of the '
        "merged ids), or null if it continues none.",
    )


def retry_instruction(reason: str) -> Message:
    """Sent after an answer that could not be used, before asking again."""
    return Message("user", f"Your answer could not be used: {reason}. Answer again, following the "
                           "requested format exactly and writing nothing else.")
